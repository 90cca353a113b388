"""The three ways a layer attends, one per kind of cache the Attention module is given.

  NoCache     training and `forward`: the T tokens attend among themselves.
  DenseCache  prefill (and any run against a cache): keys/values [B, S, K, E] per layer; the T
              new ones are written at `write_index`, then the T queries read every slot.
  SplitCache  the sampler's one-token decode step: N samples per prompt read one shared,
              unrepeated prompt cache and a cache of their own generated tokens.

Each kind is a NamedTuple whose `LAYER_FIELDS` carry a leading layers axis (the decoder scans
them, one slice per layer) while the other fields are shared by every layer; its `attend`
takes the new queries/keys/values (RoPE applied) and returns the attention output [B, T, H, E]
and what the layer hands back to the caller (nothing, the re-written cache slice, or the new
token's keys/values).

Why the sampler's split layout is fast: a dense cache scanned over the layers is handed back
re-written, which inside a decode loop costs several full copies of the cache per token. The
split cache is only read; the step returns the new token's keys/values, which the loop writes
with one small dynamic_update_slice, in place. Slots sit next to head_dim ([.., K, slots, E]),
so the einsums read them without a transposed copy, and the query heads of a prompt's N samples
meet its keys in one einsum.

Masking is one rule on positions, not slot indices: a query at position p sees the valid slots
whose position is <= p, and on windowed layers only those with p - position < window. It covers
right- and left-padded batches and caches whose slots hold prompt padding.

Axis letters: B batch (prompts), T new tokens, S slots, P prompt slots, N samples per prompt,
R = B * N rows, K key/value heads, G query heads per key/value head, H = K * G, E head dim.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from eva_jax.kernels.logprob_chunked import apply_softcap
from eva_jax.models.config import ModelConfig

Array = jax.Array
# Finite, so a row with no visible slot gives a uniform softmax rather than NaN.
NEG_INF = -0.7 * float(np.finfo(np.float32).max)


def _query_scale(config: ModelConfig) -> float:
  return (config.query_pre_attn_scalar or config.head_dim) ** -0.5


def _dense_attention(config: ModelConfig, q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, positions_BxT,
                     kv_positions_BxS, kv_valid_BxS, window) -> Array:
  """Softmax attention of T queries over S slots -> [B, T, H, E]."""
  h, k, e, dt = config.num_heads, config.num_kv_heads, config.head_dim, config.jnp_dtype
  b, t = q_BxTxHxE.shape[:2]
  q_BxTxKxGxE = (q_BxTxHxE * _query_scale(config)).reshape(b, t, k, h // k, e)
  logits_BxKxGxTxS = jnp.einsum("BTKGE,BSKE->BKGTS", q_BxTxKxGxE, k_BxSxKxE.astype(dt),
                                preferred_element_type=jnp.float32)
  logits_BxKxGxTxS = apply_softcap(logits_BxKxGxTxS, config.attn_logit_softcap)
  q_pos = positions_BxT[:, None, None, :, None]
  kv_pos = kv_positions_BxS[:, None, None, None, :]
  mask = kv_valid_BxS[:, None, None, None, :] & (kv_pos <= q_pos)
  mask &= (window <= 0) | (q_pos - kv_pos < window)
  logits_BxKxGxTxS = jnp.where(mask, logits_BxKxGxTxS, NEG_INF)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(dt)
  out_BxTxKxGxE = jnp.einsum("BKGTS,BSKE->BTKGE", probs, v_BxSxKxE.astype(dt))
  return out_BxTxKxGxE.reshape(b, t, h, e)


class NoCache(NamedTuple):
  """The T tokens attend among themselves; kv_valid_BxT is 1 on real tokens."""
  kv_valid_BxT: Array
  LAYER_FIELDS = ()

  def attend(self, config, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT, window):
    out = _dense_attention(config, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT,
                           positions_BxT, self.kv_valid_BxT, window)
    return out, {}


class DenseCache(NamedTuple):
  """k, v: [L, B, S, K, E]; the T new keys/values go to slots [write_index, write_index + T).

  The caller keeps, per slot, its position and whether it holds a real token, already updated
  for the new slots."""
  k: Optional[Array]
  v: Optional[Array]
  write_index: Any
  kv_positions_BxS: Array
  kv_valid_BxS: Array
  LAYER_FIELDS = ("k", "v")

  def attend(self, config, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT, window):
    start = (0, self.write_index, 0, 0)
    k_BxSxKxE = jax.lax.dynamic_update_slice(self.k, k_BxTxKxE.astype(self.k.dtype), start)
    v_BxSxKxE = jax.lax.dynamic_update_slice(self.v, v_BxTxKxE.astype(self.v.dtype), start)
    out = _dense_attention(config, q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, positions_BxT,
                           self.kv_positions_BxS, self.kv_valid_BxS, window)
    return out, {"k": k_BxSxKxE, "v": v_BxSxKxE}


class SplitCache(NamedTuple):
  """One new token per row (T = 1, R = B * N rows, prompt-major: row b * N + n).

  prompt_k, prompt_v: [L, B, K, P, E], only read; prompt_positions_BxP / prompt_valid_BxP: per
  prompt slot, its position and whether it holds a real token. gen_k, gen_v: [L, R, K, T', E],
  generated slot j = the row's j-th generated token, slots [0, num_written) written;
  num_written is one count for every row, or one per row [R] (the continuous sampler's slots).
  """
  prompt_k: Optional[Array]
  prompt_v: Optional[Array]
  gen_k: Optional[Array]
  gen_v: Optional[Array]
  prompt_positions_BxP: Array
  prompt_valid_BxP: Array
  num_written: Any
  LAYER_FIELDS = ("prompt_k", "prompt_v", "gen_k", "gen_v")

  def attend(self, config, q_Rx1xHxE, k_Rx1xKxE, v_Rx1xKxE, positions_Rx1, window):
    """-> (output [R, 1, H, E], the new token's {"k", "v"} [R, K, E] in the cache dtype)."""
    h, k, e, dt = config.num_heads, config.num_kv_heads, config.head_dim, config.jnp_dtype
    b = self.prompt_positions_BxP.shape[0]
    q_RxHxE, positions_R = q_Rx1xHxE[:, 0], positions_Rx1[:, 0]
    r = q_RxHxE.shape[0]
    n, g = r // b, h // k
    k_new = k_Rx1xKxE[:, 0].astype(self.gen_k.dtype)
    v_new = v_Rx1xKxE[:, 0].astype(self.gen_v.dtype)

    q_BxNxKxGxE = (q_RxHxE * _query_scale(config)).reshape(b, n, k, g, e)
    gen_len = self.gen_k.shape[2]
    gen_k_BxNxKxTxE = self.gen_k.reshape(b, n, k, gen_len, e).astype(dt)
    gen_v_BxNxKxTxE = self.gen_v.reshape(b, n, k, gen_len, e).astype(dt)
    f32, cap = jnp.float32, config.attn_logit_softcap
    s_prompt = apply_softcap(jnp.einsum("BNKGE,BKPE->BNKGP", q_BxNxKxGxE,
                                        self.prompt_k.astype(dt), preferred_element_type=f32), cap)
    s_gen = apply_softcap(jnp.einsum("BNKGE,BNKTE->BNKGT", q_BxNxKxGxE, gen_k_BxNxKxTxE,
                                     preferred_element_type=f32), cap)
    s_self = apply_softcap(jnp.einsum("BNKGE,BNKE->BNKG", q_BxNxKxGxE,
                                      k_new.astype(dt).reshape(b, n, k, e),
                                      preferred_element_type=f32), cap)

    # Prompt slots are all earlier than the query; generated slot j sits num_written - j
    # tokens before it and holds a token once j < num_written.
    q_pos_BxN = positions_R.reshape(b, n)
    in_window_BxNxP = (window <= 0) | (q_pos_BxN[:, :, None] - self.prompt_positions_BxP[:, None]
                                       < window)
    prompt_ok = (self.prompt_valid_BxP[:, None] & in_window_BxNxP)[:, :, None, None, :]
    back_T = jnp.asarray(self.num_written)[..., None] - jnp.arange(gen_len)
    gen_ok = (back_T > 0) & ((window <= 0) | (back_T < window))
    gen_ok = jnp.broadcast_to(gen_ok, (r, gen_len)).reshape(b, n, 1, 1, gen_len)
    s_prompt = jnp.where(prompt_ok, s_prompt, NEG_INF)
    s_gen = jnp.where(gen_ok, s_gen, NEG_INF)
    # One softmax over the three parts (the token itself is always visible).
    m = jnp.maximum(jnp.maximum(s_prompt.max(-1), s_gen.max(-1)), s_self)
    w_prompt, w_gen = jnp.exp(s_prompt - m[..., None]), jnp.exp(s_gen - m[..., None])
    w_self = jnp.exp(s_self - m)
    denom = w_prompt.sum(-1) + w_gen.sum(-1) + w_self
    out_BxNxKxGxE = (
        jnp.einsum("BNKGP,BKPE->BNKGE", (w_prompt / denom[..., None]).astype(dt),
                   self.prompt_v.astype(dt))
        + jnp.einsum("BNKGT,BNKTE->BNKGE", (w_gen / denom[..., None]).astype(dt),
                     gen_v_BxNxKxTxE)
        + (w_self / denom).astype(dt)[..., None] * v_new.astype(dt).reshape(b, n, k, 1, e))
    return out_BxNxKxGxE.reshape(r, 1, h, e), {"k": k_new, "v": v_new}


def split_layers(cache):
  """(the per-layer fields {name: [L, ...]}, the cache with those fields set to None)."""
  per_layer = {name: getattr(cache, name) for name in cache.LAYER_FIELDS}
  return per_layer, cache._replace(**{name: None for name in cache.LAYER_FIELDS})
