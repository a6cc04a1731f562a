"""Stand-in for Molmo's remote `MolmoConfig` (tests only; not allenai's code).

Keys follow the flat layout of allenai/Molmo-7B-O-0924's config.json (hidden_size, num_hidden_layers,
num_attention_heads, ...); like that checkpoint, the vision tower's settings are not config keys but are
fixed in the modeling file. Plain `PretrainedConfig` only, so the same file loads under transformers 4.48
and 5.x.
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
