"""Stand-in for Molmo's remote configuration classes (tests only; not allenai's code).

Two layouts, as the two checkpoints ship them:

* `MolmoConfig`, the flat keys of allenai/Molmo-7B-O-0924's config.json (hidden_size, num_hidden_layers,
  num_attention_heads, ...); the vision tower's settings are not config keys but are fixed in the
  modeling file;
* `MolmoEConfig`, the OLMo-style keys of allenai/MolmoE-1B-0924's (d_model, n_layers, n_heads,
  moe_num_experts, moe_top_k, max_sequence_length, a `vision_backbone` dict), where hidden_size and
  num_hidden_layers are read-only properties, not keys.

Neither sets `eos_token_id`: the real configs have none, so transformers' generation knows no end token
(min_new_tokens is ignored, a finished row keeps generating) and only a stop string ends an answer.
Plain `PretrainedConfig` only, so the same file loads under transformers 4.48 and 5.x.
"""

from transformers import PretrainedConfig


class MolmoConfig(PretrainedConfig):
    model_type = "molmo"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 512,
        embedding_size: int | None = None,
        hidden_size: int = 32,
        intermediate_size: int = 64,
        num_hidden_layers: int = 3,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 1024,
        layer_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        qkv_bias: bool = False,
        use_position_ids: bool = True,
        weight_tying: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.qkv_bias = qkv_bias
        self.use_position_ids = use_position_ids
        self.weight_tying = weight_tying
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class MolmoEConfig(PretrainedConfig):
    """MolmoE's OLMo-style keys; the modeling file reads the sizes through `text_dims`."""

    model_type = "molmo"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 512,
        embedding_size: int | None = None,
        d_model: int = 32,
        n_layers: int = 3,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        mlp_hidden_size: int = 32,
        moe_num_experts: int = 4,
        moe_top_k: int = 2,
        block_type: str = "moe",
        max_sequence_length: int = 1024,
        layer_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        include_bias: bool = False,
        use_position_ids: bool = True,
        weight_tying: bool = False,
        init_std: float = 0.02,
        vision_backbone: dict | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.mlp_hidden_size = mlp_hidden_size
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.block_type = block_type
        self.max_sequence_length = max_sequence_length
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.include_bias = include_bias
        self.use_position_ids = use_position_ids
        self.weight_tying = weight_tying
        self.init_std = init_std
        self.vision_backbone = vision_backbone
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers
