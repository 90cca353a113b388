"""One table per family: how its Hugging Face checkpoints map onto ModelConfig and our params.

The parts every family shares (sizes, RoPE, eps, tied head, special tokens, the attention and
MLP tensor names) are read and written by `eva_jax.models.hf`; a table holds only what differs:
the architecture class prefix, the config.json fields that map onto feature fields, the fields
pinned to the one value we support, and the names of the per-layer norms. Adding a family adds a
table here (and its features in `eva_jax.models.config`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from eva_jax.models.config import ModelConfig

# transformers' activation names <-> ModelConfig.mlp_activation.
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclasses.dataclass(frozen=True)
class HFFamily:
  # "Llama" -> LlamaForCausalLM / LlamaForSequenceClassification.
  architecture: str
  # Per-layer norms: (our module, HF module under model.layers.{i}.), weights named `.weight`.
  layer_norms: tuple[tuple[str, str], ...]
  # config.json field -> ModelConfig field, copied both ways (absent reads as None).
  fields: tuple[tuple[str, str], ...] = ()
  # config.json fields we do not model, with the one value we support: another value is
  # refused on load, and save writes these.
  pinned: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  activation_field: str = "hidden_act"
  # Conversions beyond plain copies: config.json dict -> ModelConfig fields, and back.
  read: Callable[[dict, int], dict] = lambda hf, num_layers: {}
  write: Callable[[ModelConfig], dict] = lambda config: {}


_PRE_POST_NORMS = (("input_norm", "input_layernorm"),
                   ("pre_mlp_norm", "post_attention_layernorm"))


def _gemma2_read(hf: dict, num_layers: int) -> dict:
  types = hf.get("layer_types") or [
      "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
  return dict(sliding_layers=tuple(t == "sliding_attention" for t in types),
              query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)))


def _gemma2_write(config: ModelConfig) -> dict:
  return dict(layer_types=["sliding_attention" if w else "full_attention"
                           for w in config.layer_windows],
              # transformers validates this field as an int.
              query_pre_attn_scalar=int(config.query_pre_attn_scalar))


HF_FAMILIES: dict[str, HFFamily] = {
    "llama": HFFamily(
        architecture="Llama", layer_norms=_PRE_POST_NORMS,
        pinned={"attention_bias": False, "mlp_bias": False}),
    "qwen2": HFFamily(
        architecture="Qwen2", layer_norms=_PRE_POST_NORMS, pinned={"use_sliding_window": False}),
    "mistral": HFFamily(
        architecture="Mistral", layer_norms=_PRE_POST_NORMS,
        fields=(("sliding_window", "sliding_window"),)),
    "gemma2": HFFamily(
        architecture="Gemma2", activation_field="hidden_activation",
        layer_norms=(("input_norm", "input_layernorm"),
                     ("post_attn_norm", "post_attention_layernorm"),
                     ("pre_mlp_norm", "pre_feedforward_layernorm"),
                     ("post_mlp_norm", "post_feedforward_layernorm")),
        fields=(("sliding_window", "sliding_window"),
                ("attn_logit_softcapping", "attn_logit_softcap"),
                ("final_logit_softcapping", "final_logit_softcap")),
        read=_gemma2_read, write=_gemma2_write),
}
