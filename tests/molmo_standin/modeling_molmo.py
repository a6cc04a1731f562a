"""Stand-in for Molmo's remote modeling code (tests only; written for this project, not allenai's code).

It reproduces the interface the vlmstates Molmo adapter relies on, with tiny dimensions:

* module paths: `model.model.transformer.{wte, blocks, ln_f, ff_out}` (ff_out is the LM head), and
  `model.model.vision_backbone.{image_vit, image_pooling_2d, image_projector}`;
* the vision backbone's data flow: crops of patches `[B, crops, patches, pixels]` (a crop of all -1 is
  batch padding and yields zero features), two ViT layers concatenated, 2x2 attention pooling with a
  mean query, then `image_projector` applied to `[B, crops, pooled tokens, D]`;
* the language model's inputs: `input_ids` padded with -1, the image features added to the embeddings at
  `image_input_idx` (-1 = unused), position ids from the cumulative attention mask, each block returning
  `(hidden, cache)`, `output_hidden_states` as [block inputs..., ln_f(last block output)];
* `generate_from_batch(batch, GenerationConfig, tokenizer=...)` with Molmo's handling of its batch: with no
  attention mask it derives one from `input_ids != -1`, positions from its cumulative sum, and takes the
  first answer token's logits at column `valid_tokens - 1` of each row (right padding in mind). It then
  runs a real greedy loop with a key/value cache (a prefill step, then one-token decode steps), stopping at
  eos or a stop string.

Its own ViT replaces the hard-coded CLIP ViT-L/14-336 of the real code. Only torch and plain
`PreTrainedModel` are used, so it loads under transformers 4.48 and 5.x alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_molmo import MolmoConfig


@dataclass(frozen=True)
class VisionBackboneConfig:
    """Fixed in the code, as the real 7B-O fixes its CLIP settings (preprocessor_config.json repeats them)."""

    image_patch_size: int = 4
    image_num_patch: tuple[int, int] = (4, 4)  # patches per crop side: a crop is 16x16 pixels
    image_emb_dim: int = 24
    image_num_heads: int = 2
    image_num_layers: int = 2
    image_mlp_dim: int = 48
    vit_layers: tuple[int, ...] = (-1, -2)
    image_pooling_h: int = 2
    image_pooling_w: int = 2
    image_norm_eps: float = 1e-5

    @property
    def pixels_per_patch(self) -> int:
        return self.image_patch_size * self.image_patch_size * 3

    @property
    def tokens_per_crop(self) -> int:
        h, w = self.image_num_patch
        return (h // self.image_pooling_h) * (w // self.image_pooling_w)


VISION = VisionBackboneConfig()


def _min_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


# -- language model --------------------------------------------------------------------------------
class RMSLayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float):
    """q, k: [B, heads, T, head_dim]; position_ids: [B, T]."""
    head_dim = q.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=q.device, dtype=torch.float32) / head_dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, head_dim]
    cos, sin = angles.cos(), angles.sin()
    q32, k32 = q.float(), k.float()
    return (q32 * cos + _rotate_half(q32) * sin).to(q.dtype), (k32 * cos + _rotate_half(k32) * sin).to(k.dtype)


class MolmoBlock(nn.Module):
    """Pre-norm decoder block with a fused q/k/v projection, RoPE, grouped kv heads and a SwiGLU MLP."""

    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = d // self.n_heads
        self.fused_dims = (d, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim)
        self.attn_norm = RMSLayerNorm(d, config.layer_norm_eps)
        self.ff_norm = RMSLayerNorm(d, config.layer_norm_eps)
        self.att_proj = nn.Linear(d, sum(self.fused_dims), bias=config.qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, 2 * config.intermediate_size, bias=False)
        self.ff_out = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x, attention_bias, position_ids, layer_past=None, use_cache=False):
        batch, length, _ = x.shape
        q, k, v = self.att_proj(self.attn_norm(x)).split(self.fused_dims, dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, k, position_ids, self.config.rope_theta)
        if layer_past is not None:
            k = torch.cat((layer_past[0], k), dim=-2)
            v = torch.cat((layer_past[1], v), dim=-2)
        present = (k, v) if use_cache else None
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        x = x + self.attn_out(att.transpose(1, 2).reshape(batch, length, -1))
        value, gate = self.ff_proj(self.ff_norm(x)).chunk(2, dim=-1)
        x = x + self.ff_out(F.silu(gate) * value)
        return x, present


# -- vision backbone -------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, in_dim: int, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(in_dim, dim)
        self.wk = nn.Linear(in_dim, dim)
        self.wv = nn.Linear(in_dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        n, tq, _ = queries.shape
        tk = keys.shape[1]
        q = self.wq(queries).view(n, tq, self.heads, -1).transpose(1, 2)
        k = self.wk(keys).view(n, tk, self.heads, -1).transpose(1, 2)
        v = self.wv(keys).view(n, tk, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(n, tq, -1))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, v: VisionBackboneConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(v.image_emb_dim, eps=v.image_norm_eps)
        self.attention = _Attention(v.image_emb_dim, v.image_emb_dim, v.image_num_heads)
        self.ffn_norm = nn.LayerNorm(v.image_emb_dim, eps=v.image_norm_eps)
        self.feed_forward = nn.Sequential(
            nn.Linear(v.image_emb_dim, v.image_mlp_dim), nn.GELU(), nn.Linear(v.image_mlp_dim, v.image_emb_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x)
        x = x + self.attention(h, h)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionTransformer(nn.Module):
    """A tiny ViT standing in for CLIP: class token, learned positions, pre-LN, returns every layer."""

    def __init__(self, v: VisionBackboneConfig):
        super().__init__()
        patches = v.image_num_patch[0] * v.image_num_patch[1]
        self.class_embedding = nn.Parameter(torch.zeros(v.image_emb_dim))
        self.positional_embedding = nn.Parameter(torch.zeros(patches + 1, v.image_emb_dim))
        self.patch_embedding = nn.Linear(v.pixels_per_patch, v.image_emb_dim, bias=False)
        self.pre_ln = nn.LayerNorm(v.image_emb_dim, eps=v.image_norm_eps)
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(v) for _ in range(v.image_num_layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embedding(x)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat((cls, x), dim=1) + self.positional_embedding.to(x.dtype)
        x = self.pre_ln(x)
        hidden = []
        for block in self.resblocks:
            x = block(x)
            hidden.append(x)
        return hidden


class ImageProjectorMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w3 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoVisionBackbone(nn.Module):
    def __init__(self, config: MolmoConfig, v: VisionBackboneConfig = VISION):
        super().__init__()
        self.v = v
        stacked = v.image_emb_dim * len(v.vit_layers)
        self.image_vit = VisionTransformer(v)
        self.pad_embed = nn.Parameter(torch.zeros(2, stacked))
        self.image_pooling_2d = _Attention(stacked, v.image_emb_dim, v.image_num_heads)
        self.image_projector = ImageProjectorMLP(v.image_emb_dim, config.intermediate_size, config.hidden_size)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, crops, patches, pixels] -> [B, crops, patches, len(vit_layers) * D]."""
        batch, crops, patches, pixels = images.shape
        flat = images.reshape(batch * crops, patches, pixels)
        real_crop = (flat != -1).all(dim=2).all(dim=1)[:, None, None]
        hidden = self.image_vit(flat.to(self.image_vit.patch_embedding.weight.dtype))
        features = torch.cat([hidden[layer] for layer in self.v.vit_layers], dim=-1)[:, 1:]
        return (features * real_crop).reshape(batch, crops, patches, -1)

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        v = self.v
        batch, crops = images.shape[:2]
        features = self.encode_image(images)
        all_pad = (image_masks == 0).to(features.dtype)[..., None]
        partial_pad = ((image_masks < 1) & (image_masks != 0)).to(features.dtype)[..., None]
        features = features + self.pad_embed[0].to(features.dtype) * all_pad
        features = features + self.pad_embed[1].to(features.dtype) * partial_pad
        h, w = v.image_num_patch
        ph, pw = v.image_pooling_h, v.image_pooling_w
        windows = features.reshape(batch, crops, h // ph, ph, w // pw, pw, -1)
        windows = windows.permute(0, 1, 2, 4, 3, 5, 6).reshape(-1, ph * pw, features.shape[-1])
        pooled = self.image_pooling_2d(windows.mean(dim=1, keepdim=True), windows)
        pooled = pooled.reshape(batch, crops, v.tokens_per_crop, -1)
        return self.image_projector(pooled)  # [B, crops, tokens, d_model]


# -- the model -------------------------------------------------------------------------------------
@dataclass
class MolmoOutput:
    last_hidden_state: torch.Tensor
    past_key_values: list | None
    hidden_states: tuple | None


class Molmo(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_size or config.vocab_size, config.hidden_size),
                blocks=nn.ModuleList(MolmoBlock(config) for _ in range(config.num_hidden_layers)),
                ln_f=RMSLayerNorm(config.hidden_size, config.layer_norm_eps),
                ff_out=nn.Linear(config.hidden_size, config.embedding_size or config.vocab_size, bias=False),
            )
        )
        self.vision_backbone = MolmoVisionBackbone(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        image_input_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: list | None = None,
        use_cache: bool = False,
        last_logits_only: bool = False,
        output_hidden_states: bool = False,
        append_last_valid_logits: torch.Tensor | None = None,
    ) -> MolmoOutput:
        batch, length = input_ids.shape
        past = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
        if attention_mask is None:
            attention_mask = input_ids != -1 if past_key_values is None else input_ids.new_ones(batch, past + length)
        mask = attention_mask[:, : past + length].bool()
        if position_ids is None:
            position_ids = torch.clamp(torch.cumsum(mask.long(), dim=-1) - 1, min=0)[:, past : past + length]

        x = self.transformer.wte(input_ids * (input_ids != -1))
        if images is not None:
            features = self.vision_backbone(images, image_masks)
            crops, tokens = features.shape[1:3]
            if image_input_idx.shape != (batch, crops, tokens):
                raise ValueError(f"image_input_idx has shape {tuple(image_input_idx.shape)}, expected {(batch, crops, tokens)}")
            features = features.reshape(batch, crops * tokens, -1)
            index = image_input_idx.reshape(batch, crops * tokens).long()
            valid = index >= 0
            rows = torch.arange(batch, device=x.device)[:, None].expand_as(index)
            x = x.clone()
            x[rows[valid], index[valid]] += features[valid].to(x.dtype)

        causal = (torch.arange(length, device=x.device)[:, None] + past) >= torch.arange(past + length, device=x.device)
        allowed = causal[None, None] & mask[:, None, None, :]
        attention_bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        attention_bias = attention_bias.masked_fill(~allowed, _min_value(x.dtype))

        hidden_states = []
        present = [] if use_cache else None
        for index_block, block in enumerate(self.transformer.blocks):
            if output_hidden_states:
                hidden_states.append(x)
            layer_past = None if past_key_values is None else past_key_values[index_block]
            x, cache = block(x, attention_bias, position_ids, layer_past=layer_past, use_cache=use_cache)
            if use_cache:
                present.append(cache)
        if last_logits_only:
            if append_last_valid_logits is not None:
                x = x[torch.arange(batch, device=x.device), append_last_valid_logits.to(x.device)][:, None]
            else:
                x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden_states.append(x)
        return MolmoOutput(x, present, tuple(hidden_states) if output_hidden_states else None)


class MolmoForCausalLM(PreTrainedModel):
    config_class = MolmoConfig
    base_model_prefix = "model"
    _no_split_modules = ["MolmoBlock"]

    def __init__(self, config: MolmoConfig):
        super().__init__(config)
        self.model = Molmo(config)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return self.model.transformer.ff_out

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        image_input_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: list | None = None,
        use_cache: bool | None = None,
        last_logits_only: bool = False,
        output_hidden_states: bool | None = None,
        append_last_valid_logits: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            images=images,
            image_masks=image_masks,
            image_input_idx=image_input_idx,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=self.config.use_cache if use_cache is None else use_cache,
            last_logits_only=last_logits_only,
            output_hidden_states=bool(output_hidden_states),
            append_last_valid_logits=append_last_valid_logits,
        )
        return CausalLMOutputWithPast(
            logits=self.model.transformer.ff_out(out.last_hidden_state),
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
        )

    @torch.no_grad()
    def generate_from_batch(self, batch: dict, generation_config=None, **kwargs) -> torch.Tensor:
        """Greedy answers for a processed batch: [B, prompt + new tokens], as the real method returns."""
        if generation_config is None or not generation_config.use_cache:
            raise ValueError("generate_from_batch needs a GenerationConfig with use_cache=True")
        input_ids = batch["input_ids"]
        batch_size, length = input_ids.shape
        max_new_tokens = generation_config.max_new_tokens
        if max_new_tokens is None:
            raise ValueError("generation_config.max_new_tokens must be set")
        attention_mask = batch.get("attention_mask")
        position_ids = None
        append_last_valid_logits = None
        if self.config.use_position_ids and attention_mask is None:
            valid = input_ids != -1
            position_ids = torch.clamp(torch.cumsum(valid.long(), dim=-1) - 1, min=0)
            append_last_valid_logits = valid.long().sum(dim=-1) - 1
            attention_mask = torch.cat((valid, valid.new_ones(batch_size, max_new_tokens)), dim=1)
        expected = length + max_new_tokens if self.config.use_position_ids else length
        if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, expected):
            raise ValueError(f"attention_mask must have shape {(batch_size, expected)}, got {tuple(attention_mask.shape)}")
        return self._greedy(
            input_ids,
            attention_mask,
            position_ids,
            append_last_valid_logits,
            batch.get("images"),
            batch.get("image_masks"),
            batch.get("image_input_idx"),
            generation_config,
            kwargs.get("tokenizer"),
        )

    def _greedy(self, input_ids, attention_mask, position_ids, last_valid, images, image_masks, image_input_idx, config, tokenizer):
        stop_strings = config.stop_strings or []
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer= to generate_from_batch")
        eos = config.eos_token_id if config.eos_token_id is not None else self.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        filler = min(eos_ids) if eos_ids else 0
        min_new = config.min_new_tokens or 0

        out = self(
            input_ids,
            attention_mask=attention_mask,
            images=images,
            image_masks=image_masks,
            image_input_idx=image_input_idx,
            position_ids=position_ids,
            use_cache=True,
            last_logits_only=True,
            append_last_valid_logits=last_valid,
        )
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens: list[torch.Tensor] = []
        for step in range(config.max_new_tokens):
            logits = out.logits[:, -1].float()
            if step < min_new and eos_ids:
                logits[:, sorted(eos_ids)] = float("-inf")
            token = torch.where(done, torch.full_like(done, filler, dtype=torch.long), logits.argmax(dim=-1))
            new_tokens.append(token)
            for row in range(token.shape[0]):
                if done[row]:
                    continue
                if int(token[row]) in eos_ids:
                    done[row] = True
                elif stop_strings:
                    text = tokenizer.decode(torch.stack(new_tokens, dim=1)[row].tolist())
                    done[row] = any(s in text for s in stop_strings)
            if bool(done.all()) or step == config.max_new_tokens - 1:
                break
            if position_ids is not None:
                position_ids = position_ids[:, -1:] + 1
            out = self(
                token[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=out.past_key_values,
                use_cache=True,
                last_logits_only=True,
            )
        generated = torch.stack(new_tokens, dim=1) if new_tokens else input_ids[:, :0]
        return torch.cat((input_ids, generated), dim=1)
