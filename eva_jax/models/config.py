"""Model hyperparameters: one frozen dataclass for every decoder family.

Family differences are feature fields (`norm_scale_plus_one`, `post_norms`, `embed_scale`,
`mlp_activation`, `qkv_bias`, the soft-caps, the sliding window), set by each family's entry in
`FAMILY_FEATURES`; the model code reads the features, never the family name. Named sizes are
factories (`gemma2_9b()`), never if-chains; each returns the published shape. `num_labels > 0`
turns the decoder into a sequence-classification (reward) model whose head is read at the last
real token.

Adding a family: its `FAMILY_FEATURES` entry and named sizes here, its table in
`eva_jax.models.hf_families`, its parity test.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp

MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ATTENTION_IMPLS = ("auto", "dense", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyperparameters. Sizes in units of elements; dtypes as jnp dtype names."""

  # A key of FAMILY_FEATURES: it picks the HF table; the model code reads only the features.
  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # Llama 3.1 frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_pos).
  rope_llama3_scaling: Optional[tuple[float, float, float, int]] = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  # Architecture features (the family factories set them).
  qkv_bias: bool = False
  # RMSNorm stores w and scales by (1 + w) (Gemma) instead of storing the scale itself.
  norm_scale_plus_one: bool = False
  # Extra norms on the attention and MLP outputs, before the residual add (Gemma 2).
  post_norms: bool = False
  # Embeddings multiplied by sqrt(hidden_size), rounded to the compute dtype (Gemma).
  embed_scale: bool = False
  # The gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh approximation).
  mlp_activation: str = "silu"
  # Attention window in tokens (a query at p sees keys at positions > p - window); None: global.
  sliding_window: Optional[int] = None
  # Per layer: True where the layer uses the window; None: every layer does (when windowed).
  sliding_layers: Optional[tuple[bool, ...]] = None
  # cap * tanh(x / cap) on attention scores / final logits; None: off.
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  # Queries scaled by query_pre_attn_scalar ** -0.5 (default head_dim ** -0.5).
  query_pre_attn_scalar: Optional[float] = None
  # 0: causal LM (logits [B, T, V]); >0: sequence classification (scores [B, num_labels]).
  num_labels: int = 0
  max_position_embeddings: int = 8192
  pad_token_id: Optional[int] = None
  bos_token_id: Optional[int] = None
  eos_token_ids: tuple[int, ...] = ()
  # Numerics: parameters are stored in param_dtype, matmuls run in dtype.
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Rematerialisation of each block in the backward pass: "none", "full", "dots"
  # (save matmul outputs, recompute the rest).
  remat: str = "none"
  # How the T tokens of training / scoring attend among themselves (`NoCache`): "dense" forms
  # the [B, K, G, T, T] scores; "splash" runs the splash-attention kernels (interpreted off TPU;
  # T padded up to a multiple of 128); "auto" is splash when compiling for TPU and T % 128 == 0,
  # dense otherwise. Caches (prefill, decode) always attend densely.
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.family not in FAMILY_FEATURES:
      raise ValueError(f"ModelConfig.family must be one of {tuple(FAMILY_FEATURES)}, got "
                       f"{self.family!r}")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"ModelConfig.mlp_activation must be one of {MLP_ACTIVATIONS}, got "
                       f"{self.mlp_activation!r}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"ModelConfig.sliding_window must be >= 1 or None, got "
                       f"{self.sliding_window}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})")
    if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
      raise ValueError(
          f"ModelConfig.sliding_layers has {len(self.sliding_layers)} entries for "
          f"{self.num_layers} layers")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"ModelConfig.remat must be 'none', 'full' or 'dots', got {self.remat!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, got "
                       f"{self.attention_impl!r}")

  @property
  def is_reward_model(self) -> bool:
    return self.num_labels > 0

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def layer_windows(self) -> tuple[int, ...]:
    """Per layer attention window in tokens; 0 means global attention."""
    if self.sliding_window is None:
      return (0,) * self.num_layers
    if self.sliding_layers is None:
      return (self.sliding_window,) * self.num_layers
    return tuple(self.sliding_window if s else 0 for s in self.sliding_layers)

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def flops_per_token(self, seq_len: int) -> float:
    """Forward matmul FLOPs per token (2 per multiply-add), attention included.

    Multiply by 3 for a training step (forward + backward)."""
    d, f, h, k, dh = (self.hidden_size, self.intermediate_size, self.num_heads,
                      self.num_kv_heads, self.head_dim)
    per_layer = 2 * (d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f)
    per_layer += 2 * 2 * h * dh * seq_len  # q·k and p·v over the context
    out = 2 * d * max(self.vocab_size if not self.is_reward_model else self.num_labels, 1)
    return self.num_layers * per_layer + out


def _alternating_windows(num_layers: int) -> dict:
  # Layer 0 is local, layer 1 global, and so on (transformers' Gemma2 layer_types).
  return dict(sliding_layers=tuple(i % 2 == 0 for i in range(num_layers)))


# Per family: (num_layers -> the feature fields every size of the family shares).
FAMILY_FEATURES: dict[str, Callable[[int], dict]] = {
    "llama": lambda n: {},
    "qwen2": lambda n: dict(qkv_bias=True),
    "mistral": lambda n: {},
    "gemma2": lambda n: dict(
        norm_scale_plus_one=True, post_norms=True, embed_scale=True, mlp_activation="gelu_tanh",
        tie_embeddings=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        **_alternating_windows(n)),
}


def family_config(family: str, **fields) -> ModelConfig:
  """A ModelConfig of `family`: its features, overridden by `fields` (sizes and the rest)."""
  if family not in FAMILY_FEATURES:
    raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILY_FEATURES)})")
  features = FAMILY_FEATURES[family](fields["num_layers"])
  return ModelConfig(family=family, **{**features, **fields})


def _gemma2(**kw) -> ModelConfig:
  defaults = dict(vocab_size=256000, head_dim=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                  sliding_window=4096, pad_token_id=0, bos_token_id=2, eos_token_ids=(1, 107))
  return family_config("gemma2", **{**defaults, **kw})


def gemma2_2b(**kw) -> ModelConfig:
  return _gemma2(hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8,
                 num_kv_heads=4, query_pre_attn_scalar=256, **kw)


def gemma2_9b(**kw) -> ModelConfig:
  return _gemma2(hidden_size=3584, intermediate_size=14336, num_layers=42, num_heads=16,
                 num_kv_heads=8, query_pre_attn_scalar=256, **kw)


def gemma2_27b(**kw) -> ModelConfig:
  return _gemma2(hidden_size=4608, intermediate_size=36864, num_layers=46, num_heads=32,
                 num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144, **kw)


def _llama3(**kw) -> ModelConfig:
  defaults = dict(vocab_size=128256, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                  max_position_embeddings=131072, bos_token_id=128000,
                  eos_token_ids=(128001, 128009), rope_llama3_scaling=(8.0, 1.0, 4.0, 8192))
  return family_config("llama", **{**defaults, **kw})


def llama3_8b(**kw) -> ModelConfig:
  """Llama 3.1 8B (the Llama 3.0 8B shape is the same, without the RoPE scaling)."""
  return _llama3(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, **kw)


def llama3_70b(**kw) -> ModelConfig:
  return _llama3(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                 num_kv_heads=8, **kw)


def _qwen2_5(**kw) -> ModelConfig:
  defaults = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=128,
                  max_position_embeddings=32768, bos_token_id=None,
                  eos_token_ids=(151645, 151643), pad_token_id=151643)
  return family_config("qwen2", **{**defaults, **kw})


def qwen2_5_0_5b(**kw) -> ModelConfig:
  return _qwen2_5(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                  num_heads=14, num_kv_heads=2, head_dim=64, tie_embeddings=True, **kw)


def qwen2_5_7b(**kw) -> ModelConfig:
  return _qwen2_5(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                  num_heads=28, num_kv_heads=4, **kw)


def mistral_7b(**kw) -> ModelConfig:
  """Mistral 7B v0.1: a 4096-token sliding window on every layer, vocab 32000."""
  defaults = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                  num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=10000.0,
                  rms_norm_eps=1e-5, sliding_window=4096, max_position_embeddings=32768,
                  bos_token_id=1, eos_token_ids=(2,))
  return family_config("mistral", **{**defaults, **kw})


# Per family, what a tiny model changes beyond the shared tiny sizes (a window the test
# sequences cross, a tied head where the family's small sizes tie it).
_TINY_EXTRAS = {
    "gemma2": dict(sliding_window=8, query_pre_attn_scalar=16),
    "qwen2": dict(tie_embeddings=True),
    "mistral": dict(sliding_window=8),
}


def tiny(family: str = "llama", **kw) -> ModelConfig:
  """A few-thousand-parameter model of any family, for tests and the embedded default."""
  defaults = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                  **_TINY_EXTRAS.get(family, {}))
  return family_config(family, **{**defaults, **kw})


NAMED_SIZES = {
    "gemma2_2b": gemma2_2b, "gemma2_9b": gemma2_9b, "gemma2_27b": gemma2_27b,
    "llama3_8b": llama3_8b, "llama3_70b": llama3_70b,
    "qwen2_5_0_5b": qwen2_5_0_5b, "qwen2_5_7b": qwen2_5_7b, "mistral_7b": mistral_7b,
}
