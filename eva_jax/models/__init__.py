"""Decoder models (Llama 3, Gemma 2, Qwen 2.5, Mistral) as pure functions over a params pytree.

`params` everywhere is the inner Linen params dict (no {"params": ...} wrapper). Models only
name logical axes (`param_logical_specs`); `eva_jax.sharding` turns them into shardings.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from eva_jax.kernels.logprob_chunked import apply_softcap
from eva_jax.models.attention import DenseCache, NoCache, SplitCache
from eva_jax.models.config import (FAMILY_FEATURES, NAMED_SIZES, ModelConfig, family_config,
                                   gemma2_2b, gemma2_9b, gemma2_27b, llama3_8b, llama3_70b,
                                   mistral_7b, qwen2_5_0_5b, qwen2_5_7b, tiny)
from eva_jax.models.transformer import Decoder, vocab_split

__all__ = [
    "ModelConfig", "FAMILY_FEATURES", "NAMED_SIZES", "family_config", "gemma2_2b", "gemma2_9b",
    "gemma2_27b", "llama3_8b", "llama3_70b", "mistral_7b", "qwen2_5_0_5b", "qwen2_5_7b", "tiny",
    "init_params", "param_logical_specs", "param_count", "positions_from_mask", "forward",
    "forward_hidden", "output_projection", "logits_from_hidden", "scores_from_hidden",
    "init_cache", "decode_step", "init_generated_cache", "sample_step", "inference_params",
    "NoCache", "DenseCache", "SplitCache", "vocab_split",
]


def _dummy_inputs(batch: int = 1, length: int = 2):
  tokens = jnp.zeros((batch, length), jnp.int32)
  return tokens, jnp.zeros((batch, length), jnp.int32), NoCache(jnp.ones((batch, length), bool))


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
  hidden, _ = Decoder(config).apply({"params": params}, tokens_BxT, pos, NoCache(valid))
  return hidden


def output_projection(config: ModelConfig, params: dict) -> jax.Array:
  """The LM head as a [D, V] matrix (the transposed embedding when tied)."""
  if config.is_reward_model:
    raise ValueError("output_projection: a reward model (num_labels > 0) has no LM head")
  if config.tie_embeddings:
    return params["embedding"].T
  return params["lm_head"]


def logits_from_hidden(config: ModelConfig, params: dict, hidden_BxTxD: jax.Array) -> jax.Array:
  """float32 logits [..., V], soft-capped where the config says so (Gemma 2)."""
  w_DxV = output_projection(config, params).astype(config.jnp_dtype)
  logits = jnp.einsum("...D,DV->...V", hidden_BxTxD, w_DxV, preferred_element_type=jnp.float32)
  return apply_softcap(logits, config.final_logit_softcap)


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
  dense = DenseCache(cache["k"], cache["v"], write_index, kv_positions_BxS, kv_valid_BxS)
  return Decoder(config).apply({"params": params}, tokens_BxT, positions_BxT, dense)


def init_generated_cache(config: ModelConfig, prompts: int, samples: int, length: int,
                         dtype) -> dict:
  """The sampler's empty generated-token cache {"k", "v"}: [L, prompts, samples, K, length, E]
  each (`SplitCache.gen_k`: row b * samples + n at [b, n])."""
  shape = (config.num_layers, prompts, samples, config.num_kv_heads, length, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def inference_params(config: ModelConfig, params: dict) -> dict:
  """`params` with the weights that the model reads in the compute dtype cast to it, so a
  sampler reads (and places) them at that width once. Norm scales (read in float32) and the
  reward head keep their dtype: the outputs are exactly those of `params`."""
  keep = ("scale", "score")
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if path[-1].key in keep else x.astype(config.jnp_dtype), params)


def sample_step(config: ModelConfig, params: dict, tokens_R: jax.Array, positions_R: jax.Array,
                cache: SplitCache) -> tuple[jax.Array, dict]:
  """One new token per row (R = B * N rows, prompt-major) through the same decoder ->
  (final hidden [R, D], the new keys/values {"k", "v"} [L, R, K, E] to store in generated slot
  `cache.num_written`). See `SplitCache` for the cache layout."""
  hidden_Rx1xD, new_kv = Decoder(config).apply({"params": params}, tokens_R[:, None],
                                               positions_R[:, None], cache)
  return hidden_Rx1xD[:, 0], new_kv
