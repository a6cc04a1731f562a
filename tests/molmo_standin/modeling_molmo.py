"""Stand-in for Molmo's remote modeling code (tests only; written for this project, not allenai's code).

It reproduces, with tiny dimensions, the interface the vlmstates Molmo adapter relies on and the
behaviours of the real code (transformers 4.48.3) that punish a wrong use of it:

* module paths: `model.model.transformer.{wte, blocks, ln_f, ff_out}` (ff_out is the LM head), and
  `model.model.vision_backbone.{image_vit, image_pooling_2d, image_projector}`; `wte` is a custom module
  (a base and an extra table) without `.weight`;
* the vision backbone's data flow: crops of patches `[B, crops, patches, pixels]` (a crop of all -1 is
  batch padding: it still runs through the ViT and yields zero features), two ViT layers concatenated,
  2x2 attention pooling with a mean query, then `image_projector` applied to `[B, crops, pooled tokens,
  D]`; the backbone returns a tuple (features, class tokens);
* the language model's inputs: `input_ids` padded with -1, the image features added to the embeddings at
  `image_input_idx` (negative = unused), each block returning `(hidden, cache)`, `output_hidden_states`
  as [block inputs..., ln_f(last block output)]. Without `position_ids`, positions are the cumulative sum
  of the whole attention mask given, so a mask wider than the sequence fails in the rotary embedding;
* `generate_from_batch(batch, GenerationConfig, tokenizer=...)`: with no attention mask it derives one
  from `input_ids != -1` (widened by max_new_tokens), positions from its cumulative sum, and takes the
  first answer token's logits at column `valid tokens - 1` of each row (right padding in mind), then
  calls transformers' `GenerationMixin.generate`, passing its own `position_ids` (a caller's is a
  TypeError). A given attention mask must span prompt + max_new_tokens, and then no positions are made.
  Generation keeps that mask as it is, advances the positions by one per step and drops the images after
  the prefill. The config has no eos token, so only a stop string ends a row, and a finished row keeps
  generating while others run;
* MolmoE's layout (`MolmoEConfig`: OLMo-style keys, `block_type: moe`): each block's MLP is a top-k
  mixture of experts.

Its own ViT replaces the hard-coded CLIP ViT-L/14-336 of the real code. Only torch, `PreTrainedModel` and
`GenerationMixin` are used, so it loads under transformers 4.48 and 5.x alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_molmo import MolmoConfig, MolmoEConfig


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


@dataclass(frozen=True)
class TextDims:
    """The language model's sizes, whichever layout the config has (7B-O's flat keys, MolmoE's OLMo keys)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp_hidden: int  # per expert in a MoE block
    experts: int  # 0: a dense MLP
    top_k: int
    eps: float
    theta: float
    qkv_bias: bool
    embedding_size: int
    std: float

    @property
    def projector_hidden(self) -> int:
        return self.mlp_hidden * max(1, self.top_k)


def text_dims(config) -> TextDims:
    if hasattr(config, "d_model"):  # MolmoE: OLMo-style keys
        moe = config.block_type == "moe"
        return TextDims(
            config.d_model,
            config.n_layers,
            config.n_heads,
            config.n_kv_heads or config.n_heads,
            config.mlp_hidden_size,
            config.moe_num_experts if moe else 0,
            config.moe_top_k if moe else 0,
            config.layer_norm_eps,
            config.rope_theta,
            config.include_bias,
            config.embedding_size or config.vocab_size,
            config.init_std,
        )
    return TextDims(
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads or config.num_attention_heads,
        config.intermediate_size,
        0,
        0,
        config.layer_norm_eps,
        config.rope_theta,
        config.qkv_bias,
        config.embedding_size or config.vocab_size,
        config.initializer_range,
    )


def _min_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


# -- language model --------------------------------------------------------------------------------
class Embedding(nn.Module):
    """A base table and a table of extra (special) tokens, looked up as one: no `.weight` to read."""

    EXTRA = 8

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(size - self.EXTRA, dim))
        self.new_embedding = nn.Parameter(torch.zeros(self.EXTRA, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, torch.cat((self.embedding, self.new_embedding), dim=0))


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
    """q, k: [B, heads, T, head_dim]; position_ids: [B, T]. Positions of another length than T fail in
    the reshape, as the real rotary embedding does with positions made from a too wide mask."""
    batch, _, length, head_dim = q.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=q.device, dtype=torch.float32) / head_dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T', head_dim/2]
    angles = torch.cat((angles, angles), dim=-1).reshape(batch, 1, length, head_dim)
    cos, sin = angles.cos(), angles.sin()
    q32, k32 = q.float(), k.float()
    return (q32 * cos + _rotate_half(q32) * sin).to(q.dtype), (k32 * cos + _rotate_half(k32) * sin).to(k.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ff_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.ff_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.ff_proj(x).chunk(2, dim=-1)
        return self.ff_out(F.silu(gate) * value)


class MixtureOfExperts(nn.Module):
    """Top-k routing per token (softmax over experts, the k largest kept as they are), every expert a SwiGLU.
    All experts run on all tokens (tiny sizes): the routing weights select, so rows cannot mix."""

    def __init__(self, dim: int, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [B, T, k]
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # [B, T, E, D]
        picked = outputs.gather(-2, chosen[..., None].expand(*chosen.shape, x.shape[-1]))
        return (picked * weights[..., None].to(x.dtype)).sum(dim=-2)


class MolmoBlock(nn.Module):
    """Pre-norm decoder block with a fused q/k/v projection, RoPE, grouped kv heads and a SwiGLU MLP (or a
    mixture of them)."""

    def __init__(self, dims: TextDims):
        super().__init__()
        self.theta = dims.theta
        d = dims.hidden
        self.n_heads, self.n_kv_heads = dims.heads, dims.kv_heads
        self.head_dim = d // self.n_heads
        self.fused_dims = (d, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim)
        self.attn_norm = RMSLayerNorm(d, dims.eps)
        self.ff_norm = RMSLayerNorm(d, dims.eps)
        self.att_proj = nn.Linear(d, sum(self.fused_dims), bias=dims.qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        if dims.experts:
            self.mlp = MixtureOfExperts(d, dims.mlp_hidden, dims.experts, dims.top_k)
        else:
            self.mlp = SwiGLU(d, dims.mlp_hidden)

    def forward(self, x, attention_bias, position_ids, layer_past=None, use_cache=False):
        batch, length, _ = x.shape
        q, k, v = self.att_proj(self.attn_norm(x)).split(self.fused_dims, dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, k, position_ids, self.theta)
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
        return x + self.mlp(self.ff_norm(x)), present


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
        dims = text_dims(config)
        self.image_projector = ImageProjectorMLP(v.image_emb_dim, dims.projector_hidden, dims.hidden)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, crops, patches, pixels] -> features [B, crops, patches, len(vit_layers) * D] and the
        class token [B, crops, D]. Every crop runs through the ViT, batch-padding crops (all -1) too."""
        batch, crops, patches, pixels = images.shape
        flat = images.reshape(batch * crops, patches, pixels)
        real_crop = (flat != -1).all(dim=2).all(dim=1)[:, None, None]
        hidden = self.image_vit(flat.to(self.image_vit.patch_embedding.weight.dtype))
        features = torch.cat([hidden[layer] for layer in self.v.vit_layers], dim=-1)
        cls_embed = hidden[-1][:, 0].reshape(batch, crops, -1)
        return (features[:, 1:] * real_crop).reshape(batch, crops, patches, -1), cls_embed

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image features [B, crops, tokens, d_model], class tokens [B, crops, D]): a tuple, as the real
        backbone returns, so that a caller taking the output for the features fails."""
        v = self.v
        batch, crops = images.shape[:2]
        features, cls_embed = self.encode_image(images)
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
        return self.image_projector(pooled), cls_embed


# -- the model -------------------------------------------------------------------------------------
@dataclass
class MolmoOutput:
    last_hidden_state: torch.Tensor
    past_key_values: list | None
    hidden_states: tuple | None


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.cumsum(mask.long(), dim=-1) - 1, min=0)


class Molmo(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        dims = text_dims(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=Embedding(dims.embedding_size, dims.hidden),
                blocks=nn.ModuleList(MolmoBlock(dims) for _ in range(dims.layers)),
                ln_f=RMSLayerNorm(dims.hidden, dims.eps),
                ff_out=nn.Linear(dims.hidden, dims.embedding_size, bias=False),
            )
        )
        self.vision_backbone = MolmoVisionBackbone(config)

    def _add_image_features(self, x, images, image_masks, image_input_idx):
        batch = x.shape[0]
        features, _ = self.vision_backbone(images, image_masks)
        crops, tokens = features.shape[1:3]
        if image_input_idx.shape != (batch, crops, tokens):
            raise ValueError(
                f"image_input_idx has shape {tuple(image_input_idx.shape)}, expected {(batch, crops, tokens)}"
            )
        features = features.reshape(batch, crops * tokens, -1)
        index = image_input_idx.reshape(batch, crops * tokens).long()
        valid = index >= 0
        rows = torch.arange(batch, device=x.device)[:, None].expand_as(index)
        x = x.clone()
        x[rows[valid], index[valid]] += features[valid].to(x.dtype)
        return x

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
        if position_ids is None:  # from the whole mask given: one wider than the sequence fails in the rotary
            position_ids = _positions(attention_mask)[:, past:]
        if attention_mask.shape[1] < past + length:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns for {past + length} tokens")
        mask = attention_mask[:, : past + length].bool()

        x = self.transformer.wte(input_ids * (input_ids != -1))
        if images is not None:
            x = self._add_image_features(x, images, image_masks, image_input_idx)

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


#: What only the prefill step takes; dropped from generation's arguments after it.
PREFILL_ONLY = ("images", "image_masks", "image_input_idx", "append_last_valid_logits")


class MolmoForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MolmoConfig
    base_model_prefix = "model"
    _no_split_modules = ["MolmoBlock"]

    def __init__(self, config):
        super().__init__(config)
        self.model = Molmo(config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """The cache is the blocks' own (key, value) tuples, not a transformers Cache."""
        return False

    def _init_weights(self, module):
        std = text_dims(self.config).std
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, Embedding):
            module.embedding.data.normal_(0.0, std)
            module.new_embedding.data.normal_(0.0, std)

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

    # -- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_from_batch(self, batch: dict, generation_config=None, **kwargs) -> torch.Tensor:
        """Greedy answers for a processed batch: [B, prompt + new tokens], through GenerationMixin.generate."""
        if generation_config is None or not generation_config.use_cache:
            raise ValueError("generate_from_batch needs a GenerationConfig with use_cache=True")
        input_ids = batch["input_ids"]
        batch_size, length = input_ids.shape
        max_new_tokens = generation_config.max_new_tokens
        if max_new_tokens is None:
            raise ValueError("generation_config.max_new_tokens must be set")
        attention_mask = batch.get("attention_mask")
        position_ids = last_valid = None
        if self.config.use_position_ids and attention_mask is None:
            valid = input_ids != -1
            position_ids = _positions(valid)
            last_valid = valid.long().sum(dim=-1) - 1  # the answer's first token from here: right padding
            attention_mask = torch.cat((valid, valid.new_ones(batch_size, max_new_tokens)), dim=1)
        width = length + max_new_tokens if self.config.use_position_ids else length
        if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, width):
            raise ValueError(f"attention_mask must have shape {(batch_size, width)}, got {tuple(attention_mask.shape)}")
        return self.generate(
            input_ids,
            generation_config,
            attention_mask=attention_mask,
            images=batch.get("images"),
            image_masks=batch.get("image_masks"),
            image_input_idx=batch.get("image_input_idx"),
            position_ids=position_ids,
            append_last_valid_logits=last_valid,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        """The whole prompt with the images first, then the last token with the cache."""
        first = past_key_values is None
        inputs = dict(
            input_ids=input_ids if first else input_ids[:, -1:],
            attention_mask=kwargs.get("attention_mask"),
            position_ids=kwargs.get("position_ids"),
            past_key_values=past_key_values,
            use_cache=True,
            last_logits_only=True,
        )
        if first:
            inputs.update({key: kwargs.get(key) for key in PREFILL_ONLY})
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """After transformers' update (the cache): the mask as given, positions one on, no images."""
        mask, positions = model_kwargs.get("attention_mask"), model_kwargs.get("position_ids")
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["attention_mask"] = mask
        model_kwargs["position_ids"] = None if positions is None else positions[:, -1:] + 1
        for key in PREFILL_ONLY:
            model_kwargs.pop(key, None)
        return model_kwargs


class MolmoEForCausalLM(MolmoForCausalLM):
    """The same model for MolmoE's config layout (transformers' auto classes want the matching config_class)."""

    config_class = MolmoEConfig
