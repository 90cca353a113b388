"""Target log-probs with the [N, V] logits held whole and a hand-written backward (for CPU).

Where memory is plentiful and compute is not (a CPU with a small head), the fastest head is the
plain one: three matmuls (logits, d_hidden, d_w_out), none recomputed. Autodiff of
`reference_target_logprobs` computes the same three, but around them XLA:CPU builds the
log-softmax's cotangent in several passes over [N, V] (a broadcast and scatter for the target
gather, a separate exp) and contracts it against w_out and hidden over their non-minor axes
(transposed-operand matmuls). Here the cotangent is one elementwise pass over the kept logits,
the backward transposes the two small operands once, behind optimization barriers so that XLA
does not fold the transposes back into the dots, and both gradient matmuls are plain
[M, K] x [K, N] products. In W2's DPO step (head 3072 x 512 x 32000) this took the step from
9.9 / 9.7 s to 8.8 / 7.9 s (experiments/results/w2_dense_head.json).

The residuals are the soft-capped float32 logits [N, V] and the row statistics; the block
gradient math is `logprob_chunked`'s, with the whole vocabulary as one block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .logprob_chunked import ChunkSpec
from .logprob_chunked import apply_softcap
from .logprob_chunked import block_stats
from .logprob_chunked import common_dtype
from .logprob_chunked import finish_stats
from .logprob_chunked import logits_block_grad
from .logprob_chunked import validate_inputs


def _forward(hidden_NxD, w_out_DxV, targets_N, softcap):
  capped_NxV = apply_softcap(
      jnp.einsum("nd,dv->nv", hidden_NxD, w_out_DxV, preferred_element_type=jnp.float32),
      softcap)
  lse_N, entropy_N = finish_stats(*block_stats(capped_NxV, None))
  target_N = jnp.take_along_axis(capped_NxV, targets_N[:, None], axis=1)[:, 0]
  return target_N - lse_N, entropy_N, lse_N, capped_NxV


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense(hidden_NxD, w_out_DxV, targets_N, spec):
  logprob_N, entropy_N, _, _ = _forward(hidden_NxD, w_out_DxV, targets_N, spec.softcap)
  return logprob_N, entropy_N


def _dense_fwd(hidden_NxD, w_out_DxV, targets_N, spec):
  logprob_N, entropy_N, lse_N, capped_NxV = _forward(hidden_NxD, w_out_DxV, targets_N,
                                                     spec.softcap)
  return (logprob_N, entropy_N), (hidden_NxD, w_out_DxV, targets_N, capped_NxV, lse_N,
                                  entropy_N)


def _dense_bwd(spec, residuals, cotangents):
  hidden_NxD, w_out_DxV, targets_N, capped_NxV, lse_N, entropy_N = residuals
  g_logprob_N, g_entropy_N = cotangents
  dtype = hidden_NxD.dtype
  is_target_NxV = jnp.arange(capped_NxV.shape[1], dtype=jnp.int32)[None] == targets_N[:, None]
  g_NxV = logits_block_grad(
      capped_NxV, is_target_NxV, None, lse_N, entropy_N, g_logprob_N.astype(jnp.float32),
      g_entropy_N.astype(jnp.float32) if spec.with_entropy_grad else None,
      spec.softcap).astype(dtype)
  w_VxD = jax.lax.optimization_barrier(w_out_DxV.T)
  hidden_DxN = jax.lax.optimization_barrier(hidden_NxD.T)
  d_hidden_NxD = jnp.matmul(g_NxV, w_VxD, preferred_element_type=jnp.float32)
  d_w_DxV = jnp.matmul(hidden_DxN, g_NxV, preferred_element_type=jnp.float32)
  return d_hidden_NxD.astype(dtype), d_w_DxV.astype(w_out_DxV.dtype), None


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_target_logprobs(hidden_NxD, w_out_DxV, targets_N, *, softcap=None,
                          return_entropy=False):
  """log softmax(softcap(hidden @ w_out))[n, targets[n]], holding the float32 [N, V] logits.

  Same arguments and results as `reference_target_logprobs` (float32 log-probs [N], and
  entropies [N] when return_entropy; gradients to hidden and w_out), with the backward above.
  Memory: the [N, V] float32 logits are kept for the backward, as autodiff keeps them.
  """
  validate_inputs(hidden_NxD, w_out_DxV, targets_N, softcap)
  spec = ChunkSpec(softcap=None if softcap is None else float(softcap),
                   with_entropy_grad=bool(return_entropy), block_v=w_out_DxV.shape[1])
  dtype = common_dtype(hidden_NxD, w_out_DxV)
  logprob_N, entropy_N = _dense(hidden_NxD.astype(dtype), w_out_DxV.astype(dtype),
                                targets_N.astype(jnp.int32), spec)
  return (logprob_N, entropy_N) if return_entropy else logprob_N
