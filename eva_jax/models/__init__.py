"""Decoder models (Llama 3, Gemma 2, Qwen 2.5) as pure functions over a params pytree.

`params` everywhere is the inner Linen params dict (no {"params": ...} wrapper).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from eva_jax.models.config import (NAMED_SIZES, ModelConfig, gemma2_2b, gemma2_9b, gemma2_27b,
                                   llama3_8b, llama3_70b, qwen2_5_0_5b, qwen2_5_7b, tiny)
from eva_jax.models.transformer import Decoder

__all__ = [
    "ModelConfig", "NAMED_SIZES", "gemma2_2b", "gemma2_9b", "gemma2_27b", "llama3_8b",
    "llama3_70b", "qwen2_5_0_5b", "qwen2_5_7b", "tiny", "init_params", "param_logical_specs",
    "param_count", "positions_from_mask", "forward", "forward_hidden", "output_projection",
    "logits_from_hidden", "scores_from_hidden", "init_cache", "decode_step",
]


def _dummy_inputs(batch: int = 1, length: int = 2):
  tokens = jnp.zeros((batch, length), jnp.int32)
  pos = jnp.zeros((batch, length), jnp.int32)
  return tokens, pos, pos, jnp.ones((batch, length), bool)


def _boxed_init(config: ModelConfig, rng):
  return Decoder(config).init(rng, *_dummy_inputs())["params"]


def init_params(config: ModelConfig, rng) -> dict:
  """Random parameters (normal 0.02 weights, identity norms), unboxed."""
  return nn.unbox(_boxed_init(config, rng))


def param_logical_specs(config: ModelConfig) -> dict:
  """A pytree like params whose leaves are PartitionSpecs of logical axis names."""
  boxed = jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0)))
  return nn.get_partition_spec(boxed)


def param_count(config: ModelConfig) -> int:
  """Number of parameters, measured with jax.eval_shape (nothing is allocated)."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return sum(int(x.size) for x in jax.tree.leaves(shapes))


def positions_from_mask(attention_mask_BxT: jax.Array) -> jax.Array:
  """Token positions that ignore padding: 0 at each row's first real token."""
  mask = attention_mask_BxT.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def forward_hidden(config: ModelConfig, params: dict, tokens_BxT: jax.Array,
                   attention_mask_BxT: jax.Array) -> jax.Array:
  """Final (normed) hidden states [B, T, D] in the compute dtype; padding on either side."""
  valid = attention_mask_BxT.astype(bool)
  pos = positions_from_mask(attention_mask_BxT)
  hidden, _ = Decoder(config).apply({"params": params}, tokens_BxT, pos, pos, valid)
  return hidden


def output_projection(config: ModelConfig, params: dict) -> jax.Array:
  """The LM head as a [D, V] matrix (the transposed embedding when tied)."""
  if config.is_reward_model:
    raise ValueError("output_projection: a reward model (num_labels > 0) has no LM head")
  if config.tie_embeddings:
    return params["embedding"].T
  return params["lm_head"]


def logits_from_hidden(config: ModelConfig, params: dict, hidden_BxTxD: jax.Array) -> jax.Array:
  """float32 logits [..., V], with Gemma 2's final soft-capping."""
  w_DxV = output_projection(config, params).astype(config.jnp_dtype)
  logits = jnp.einsum("...D,DV->...V", hidden_BxTxD, w_DxV, preferred_element_type=jnp.float32)
  if config.final_logit_softcap is not None:
    cap = config.final_logit_softcap
    logits = cap * jnp.tanh(logits / cap)
  return logits


def scores_from_hidden(config: ModelConfig, params: dict, hidden_BxTxD: jax.Array,
                       attention_mask_BxT: jax.Array) -> jax.Array:
  """Reward head read at each row's last real token: [B] (num_labels == 1) or [B, num_labels]."""
  mask = attention_mask_BxT.astype(jnp.int32)
  t = mask.shape[-1]
  # The rightmost real token, so left and right padding read the same place.
  last_B = t - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
  hidden_BxD = jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]
  scores = jnp.einsum("BD,DL->BL", hidden_BxD.astype(jnp.float32),
                      params["score"].astype(jnp.float32))
  return scores[:, 0] if config.num_labels == 1 else scores


def forward(config: ModelConfig, params: dict, tokens_BxT: jax.Array,
            attention_mask_BxT: jax.Array) -> jax.Array:
  """float32 logits [B, T, V]; for a reward model, scores [B] (or [B, num_labels])."""
  hidden = forward_hidden(config, params, tokens_BxT, attention_mask_BxT)
  if config.is_reward_model:
    return scores_from_hidden(config, params, hidden, attention_mask_BxT)
  return logits_from_hidden(config, params, hidden)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """An empty KV cache {"k", "v"}: [L, B, S, K, E] each, in `dtype` (default: compute dtype)."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(dtype or config.dtype)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def decode_step(config: ModelConfig, params: dict, tokens_BxT: jax.Array,
                positions_BxT: jax.Array, cache: dict, write_index: jax.Array,
                kv_positions_BxS: jax.Array, kv_valid_BxS: jax.Array,
                ) -> tuple[jax.Array, dict]:
  """Runs T new tokens against the cache; returns (hidden [B, T, D], updated cache).

  The new keys/values are written to slots [write_index, write_index + T). The caller keeps, per
  slot, its position and whether it holds a real token (`kv_positions`, `kv_valid`), already
  updated for the new slots: a query at position p attends to valid slots at positions <= p.
  """
  return Decoder(config).apply({"params": params}, tokens_BxT, positions_BxT, kv_positions_BxS,
                               kv_valid_BxS, cache, write_index)
