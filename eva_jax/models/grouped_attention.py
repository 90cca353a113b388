"""Materialised softmax attention with a hand-written backward, in a matmul-friendly layout.

XLA:CPU differentiates the einsum attention of `attention._dense_attention` into transposed
score matrices and several relayout copies of the probabilities (the [B, K, G, T, S] scores are
re-laid out for each of the four backward matmuls). On CPU that made attention ~25 % of a
training step although it is ~6 % of its FLOPs (W2). Here the G query heads that share a KV head
are folded into the rows, [B, K, R = G*T, E], so that every product of the forward and the
backward is one batched matmul over (B, K) whose operands are already in place:

  S = Q K^T,  P = softmax(mask(softcap(S))),  O = P V;
  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)) (softcap chain rule; 0 where masked),
  dQ = dS K,  dK = dS^T Q,  dV = P^T dO.

Values equal the einsum version's up to float rounding. The probabilities are the residual
(as autodiff keeps them); with a soft-cap the capped scores are recomputed in the backward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eva_jax.kernels.logprob_chunked import apply_softcap

Array = jax.Array


def _scores(q_BxKxRxE, k_BxKxSxE, mask_Bx1xRxS, softcap, neg_inf):
  s_BxKxRxS = jnp.einsum("bkre,bkse->bkrs", q_BxKxRxE, k_BxKxSxE,
                         preferred_element_type=jnp.float32)
  capped = apply_softcap(s_BxKxRxS, softcap)
  return jnp.where(mask_Bx1xRxS, capped, neg_inf), capped


def _forward(q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, mask_Bx1xRxS, softcap, neg_inf):
  masked, _ = _scores(q_BxKxRxE, k_BxKxSxE, mask_Bx1xRxS, softcap, neg_inf)
  p_BxKxRxS = jax.nn.softmax(masked, axis=-1).astype(v_BxKxSxE.dtype)
  return jnp.einsum("bkrs,bkse->bkre", p_BxKxRxS, v_BxKxSxE), p_BxKxRxS


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def grouped_attention(q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, mask_Bx1xRxS, softcap=None,
                      neg_inf=-1e30):
  """softmax(mask(softcap(Q K^T))) V over (B, K) -> [B, K, R, E].

  q: [B, K, R, E], already scaled, R = query heads per KV head x query tokens; k, v: [B, K, S, E];
  mask: bool, broadcastable to [B, K, R, S] (true = attend); softcap: None or the Gemma 2
  attention soft-cap; neg_inf: the score of a masked slot (a fully masked row averages V).
  """
  return _forward(q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, mask_Bx1xRxS, softcap, neg_inf)[0]


def _fwd(q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, mask_Bx1xRxS, softcap, neg_inf):
  out_BxKxRxE, p_BxKxRxS = _forward(q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, mask_Bx1xRxS, softcap,
                                    neg_inf)
  return out_BxKxRxE, (q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, mask_Bx1xRxS, p_BxKxRxS, out_BxKxRxE)


def _bwd(softcap, neg_inf, residuals, g_BxKxRxE):
  q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, mask_Bx1xRxS, p_BxKxRxS, out_BxKxRxE = residuals
  dt = v_BxKxSxE.dtype
  g_BxKxRxE = g_BxKxRxE.astype(dt)
  dp_BxKxRxS = jnp.einsum("bkre,bkse->bkrs", g_BxKxRxE, v_BxKxSxE,
                          preferred_element_type=jnp.float32)
  # rowsum(dO * O) = rowsum(P * dP): the softmax Jacobian's rank-one term, from [R, E] arrays.
  delta_BxKxR = jnp.sum(g_BxKxRxE.astype(jnp.float32) * out_BxKxRxE.astype(jnp.float32), -1)
  p32 = p_BxKxRxS.astype(jnp.float32)
  ds_BxKxRxS = p32 * (dp_BxKxRxS - delta_BxKxR[..., None])
  if softcap is not None:
    _, capped = _scores(q_BxKxRxE, k_BxKxSxE, mask_Bx1xRxS, softcap, neg_inf)
    ds_BxKxRxS = ds_BxKxRxS * (1.0 - jnp.square(capped / softcap))
  # Autodiff of jnp.where sends nothing to a masked score (a fully masked row has P != 0).
  ds_BxKxRxS = jnp.where(mask_Bx1xRxS, ds_BxKxRxS, 0.0).astype(dt)
  dq = jnp.einsum("bkrs,bkse->bkre", ds_BxKxRxS, k_BxKxSxE, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bkrs,bkre->bkse", ds_BxKxRxS, q_BxKxRxE, preferred_element_type=jnp.float32)
  dv = jnp.einsum("bkrs,bkre->bkse", p_BxKxRxS, g_BxKxRxE, preferred_element_type=jnp.float32)
  return (dq.astype(q_BxKxRxE.dtype), dk.astype(k_BxKxSxE.dtype), dv.astype(dt), None)


grouped_attention.defvjp(_fwd, _bwd)
