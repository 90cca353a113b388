"""Materialised softmax attention with a hand-written backward in a matmul-friendly layout.

XLA:CPU differentiates the einsum attention of `attention._dense_attention` into transposed
score matrices and several relayout copies of the probabilities (the [B, K, G, T, S] scores are
re-laid out for each of the four backward matmuls). On CPU that made attention ~25 % of a
training step although it is ~6 % of its FLOPs (W2). Here the G query heads that share a KV head
are folded into the rows, [B, K, R = G*T, E], so that every product of the differentiated
forward and of the backward is one batched matmul over (B, K) whose operands are in place:

  S = Q K^T,  P = softmax(mask(softcap(S))),  O = P V;
  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)) (softcap chain rule; 0 where masked),
  dQ = dS K,  dK = dS^T Q,  dV = P^T dO.

Values equal the einsum version's up to float rounding. Undifferentiated calls run the
einsums themselves: a batched matmul over slots rounds differently with the padding on the left
or on the right, and the sampler's output must not depend on the side. The probabilities are
the residual (as autodiff keeps them); with a soft-cap the capped scores are recomputed in the
backward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eva_jax.kernels.logprob_chunked import apply_softcap

Array = jax.Array


def _einsum_forward(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask, softcap, neg_inf):
  """The einsums over [B, K, G, T, S] scores: the value when nothing is differentiated."""
  s_BxKxGxTxS = jnp.einsum("BTKGE,BSKE->BKGTS", q_BxTxKxGxE, k_BxSxKxE,
                           preferred_element_type=jnp.float32)
  masked = jnp.where(mask, apply_softcap(s_BxKxGxTxS, softcap), neg_inf)
  p_BxKxGxTxS = jax.nn.softmax(masked, axis=-1).astype(v_BxSxKxE.dtype)
  return jnp.einsum("BKGTS,BSKE->BTKGE", p_BxKxGxTxS, v_BxSxKxE)


def _rows(x_BxTxKxGxE):
  """[B, T, K, G, E] -> [B, K, R = G*T, E] (row r = g * T + t)."""
  b, t, k, g, e = x_BxTxKxGxE.shape
  return jnp.transpose(x_BxTxKxGxE, (0, 2, 3, 1, 4)).reshape(b, k, g * t, e)


def _unrows(x_BxKxRxE, t):
  """[B, K, G*T, E] -> [B, T, K, G, E]."""
  b, k, r, e = x_BxKxRxE.shape
  return jnp.transpose(x_BxKxRxE.reshape(b, k, r // t, t, e), (0, 3, 1, 2, 4))


def _grouped_scores(q_BxKxRxE, k_BxKxSxE, mask_BxMxRxS, softcap, neg_inf):
  s_BxKxRxS = jnp.einsum("bkre,bkse->bkrs", q_BxKxRxE, k_BxKxSxE,
                         preferred_element_type=jnp.float32)
  capped = apply_softcap(s_BxKxRxS, softcap)
  return jnp.where(mask_BxMxRxS, capped, neg_inf), capped


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def grouped_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask, softcap=None, neg_inf=-1e30):
  """softmax(mask(softcap(Q K^T))) V for G query heads per KV head -> [B, T, K, G, E].

  q: [B, T, K, G, E], already scaled; k, v: [B, S, K, E]; mask: bool [B or 1, K or 1, 1, T, S]
  (true = attend); softcap: None or the Gemma 2 attention soft-cap; neg_inf: the score of a
  masked slot (a fully masked row averages V). Undifferentiated (sampling, scoring, reference
  log-probs) this is the einsums' forward, whose values do not depend on where the padding
  sits; differentiated, the forward and backward run in the grouped layout (equal up to
  float rounding).
  """
  return _einsum_forward(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask, softcap, neg_inf)


def _fwd(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask, softcap, neg_inf):
  b, t, _, g, _ = q_BxTxKxGxE.shape
  s = k_BxSxKxE.shape[1]
  q_BxKxRxE = _rows(q_BxTxKxGxE)
  k_BxKxSxE = jnp.swapaxes(k_BxSxKxE, 1, 2)
  v_BxKxSxE = jnp.swapaxes(v_BxSxKxE, 1, 2)
  lead = mask.shape[:2]
  mask_BxMxRxS = jnp.broadcast_to(mask, (*lead, g, t, s)).reshape(*lead, g * t, s)
  masked, _ = _grouped_scores(q_BxKxRxE, k_BxKxSxE, mask_BxMxRxS, softcap, neg_inf)
  p_BxKxRxS = jax.nn.softmax(masked, axis=-1).astype(v_BxSxKxE.dtype)
  out_BxKxRxE = jnp.einsum("bkrs,bkse->bkre", p_BxKxRxS, v_BxKxSxE)
  return _unrows(out_BxKxRxE, t), (q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, mask_BxMxRxS, p_BxKxRxS,
                                   out_BxKxRxE)


def _bwd(softcap, neg_inf, residuals, g_BxTxKxGxE):
  q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, mask_BxMxRxS, p_BxKxRxS, out_BxKxRxE = residuals
  dt = v_BxKxSxE.dtype
  t = g_BxTxKxGxE.shape[1]
  g_BxKxRxE = _rows(g_BxTxKxGxE.astype(dt))
  dp_BxKxRxS = jnp.einsum("bkre,bkse->bkrs", g_BxKxRxE, v_BxKxSxE,
                          preferred_element_type=jnp.float32)
  # rowsum(dO * O) = rowsum(P * dP): the softmax Jacobian's rank-one term, from [R, E] arrays.
  delta_BxKxR = jnp.sum(g_BxKxRxE.astype(jnp.float32) * out_BxKxRxE.astype(jnp.float32), -1)
  ds_BxKxRxS = p_BxKxRxS.astype(jnp.float32) * (dp_BxKxRxS - delta_BxKxR[..., None])
  if softcap is not None:
    _, capped = _grouped_scores(q_BxKxRxE, k_BxKxSxE, mask_BxMxRxS, softcap, neg_inf)
    ds_BxKxRxS = ds_BxKxRxS * (1.0 - jnp.square(capped / softcap))
  # Autodiff of jnp.where sends nothing to a masked score (a fully masked row has P != 0).
  ds_BxKxRxS = jnp.where(mask_BxMxRxS, ds_BxKxRxS, 0.0).astype(dt)
  dq = jnp.einsum("bkrs,bkse->bkre", ds_BxKxRxS, k_BxKxSxE, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bkrs,bkre->bkse", ds_BxKxRxS, q_BxKxRxE, preferred_element_type=jnp.float32)
  dv = jnp.einsum("bkrs,bkre->bkse", p_BxKxRxS, g_BxKxRxE, preferred_element_type=jnp.float32)
  return (_unrows(dq, t).astype(q_BxKxRxE.dtype), jnp.swapaxes(dk, 1, 2).astype(dt),
          jnp.swapaxes(dv, 1, 2).astype(dt), None)


grouped_attention.defvjp(_fwd, _bwd)
