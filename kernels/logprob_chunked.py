"""Target log-probs over a large vocabulary in pure JAX, walking the vocabulary in blocks.

Never holds the [N, V] logits: the forward keeps an online log-sum-exp over vocabulary blocks,
and the custom VJP recomputes each block of logits to accumulate d_hidden and d_w_out. The
block-level math here (softcap, block statistics, their merge, the gradient of a logits block)
is shared with the Pallas kernels in `logprob_pallas.py`, whose backward falls back to this
walk on GPU.

Peak temporary memory is O(N * block_v) instead of O(N * V).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK_V = 2048


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
  """Static (hashable) settings of one chunked call (the Pallas call's extend them)."""
  softcap: float | None
  with_entropy_grad: bool
  block_v: int


def validate_inputs(hidden_NxD, w_out_DxV, targets_N, softcap) -> None:
  """Raises ValueError/TypeError naming the first problem with the inputs."""
  for name, x, ndim in (("hidden", hidden_NxD, 2), ("w_out", w_out_DxV, 2),
                        ("targets", targets_N, 1)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if len(x.shape) != ndim:
      raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
  if hidden_NxD.shape[1] != w_out_DxV.shape[0]:
    raise ValueError(f"hidden is [N, D] = {tuple(hidden_NxD.shape)} but w_out is [D, V] = "
                     f"{tuple(w_out_DxV.shape)}: D differs")
  if targets_N.shape[0] != hidden_NxD.shape[0]:
    raise ValueError(f"targets has {targets_N.shape[0]} entries but hidden has "
                     f"{hidden_NxD.shape[0]} rows")
  if 0 in hidden_NxD.shape or 0 in w_out_DxV.shape:
    raise ValueError(f"empty input: hidden {tuple(hidden_NxD.shape)}, "
                     f"w_out {tuple(w_out_DxV.shape)}")
  for name, x in (("hidden", hidden_NxD), ("w_out", w_out_DxV)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {x.dtype}")
  if not jnp.issubdtype(targets_N.dtype, jnp.integer):
    raise TypeError(f"targets must be integer token ids, got {targets_N.dtype}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be positive or None, got {softcap}")


def validate_block(name: str, value) -> int:
  """Checks that a block size is a positive int and returns it."""
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def common_dtype(hidden_NxD, w_out_DxV):
  """The dtype both matmul operands are cast to (float32 accumulation either way)."""
  return jnp.promote_types(hidden_NxD.dtype, w_out_DxV.dtype)


def apply_softcap(logits, softcap):
  """Soft-capping, softcap * tanh(logits / softcap); None leaves the logits as they are.

  The one definition: the models' attention scores and final logits use it too."""
  if softcap is None:
    return logits
  return softcap * jnp.tanh(logits / softcap)


def block_stats(logits, valid, axis=1):
  """Log-sum-exp statistics of one block of logits, relative to the block's row max.

  `axis` is the vocabulary axis of the block: 1 for [N, B] blocks (this walk), 0 for the
  Pallas kernel's [B, N] tiles. Returns per-row (max, sumexp, shifted) with
  sumexp = sum exp(z - max) and shifted = sum exp(z - max) * (z - max), summed over valid
  columns only. Keeping the entropy moment relative to the max avoids cancellation in
  lse - E[z] for large logits. `valid` may be None (every column valid); invalid columns must
  hold -inf.
  """
  max_keep = jnp.max(logits, axis=axis, keepdims=True)
  centred = logits - max_keep
  p = jnp.exp(centred)
  moment = p * centred
  if valid is not None:
    # -inf columns give exp = 0 but 0 * -inf = nan in the moment.
    moment = jnp.where(valid, moment, 0.0)
  return jnp.squeeze(max_keep, axis), jnp.sum(p, axis=axis), jnp.sum(moment, axis=axis)


def merge_stats(max_KxN, sumexp_KxN, shifted_KxN):
  """Merges K sets of block statistics (axis 0) into one, in the same form as block_stats."""
  max_N = jnp.max(max_KxN, axis=0)
  delta_KxN = max_KxN - max_N[None]
  scale_KxN = jnp.exp(delta_KxN)
  sumexp_N = jnp.sum(scale_KxN * sumexp_KxN, axis=0)
  shifted_N = jnp.sum(scale_KxN * (shifted_KxN + delta_KxN * sumexp_KxN), axis=0)
  return max_N, sumexp_N, shifted_N


def finish_stats(max_N, sumexp_N, shifted_N):
  """(lse_N, entropy_N) from merged statistics: H = log s - E[z - max]."""
  log_sumexp_N = jnp.log(sumexp_N)
  return max_N + log_sumexp_N, log_sumexp_N - shifted_N / sumexp_N


def logits_block_grad(capped, is_target, valid, lse_N, entropy_N, g_logprob_N, g_entropy_N,
                      softcap, axis=1):
  """Cotangent of the pre-softcap logits of one block (vocabulary along `axis`, as in
  block_stats); the [N] row vectors are broadcast along it.

  d logp_t / d z_k = [k == t] - p_k and d H / d z_k = -p_k (log p_k + H), then the softcap chain
  rule d z / d a = 1 - (z / softcap)^2. `g_entropy_N` may be None (entropy unused).
  """
  row = lambda x_N: jnp.expand_dims(x_N, axis)  # noqa: E731
  logp = capped - row(lse_N)
  p = jnp.exp(logp)
  g = row(g_logprob_N) * (is_target.astype(jnp.float32) - p)
  if g_entropy_N is not None:
    g = g - row(g_entropy_N) * p * (logp + row(entropy_N))
  if softcap is not None:
    g = g * (1.0 - jnp.square(capped / softcap))
  if valid is not None:
    g = jnp.where(valid, g, 0.0)
  return g


def _vocab_block(w_out_DxV, j, block_v):
  """Block j of w_out: ([D, block_v] columns, their ids [block_v], which ones are new).

  All blocks have the same width so the loop body is one shape: the last block is slid left to
  end at V, and the columns it shares with block j - 1 are marked not new (already counted).
  """
  vocab = w_out_DxV.shape[1]
  start = jnp.minimum(j * block_v, vocab - block_v)
  w_blk_DxB = lax.dynamic_slice_in_dim(w_out_DxV, start, block_v, axis=1)
  cols_B = start + jnp.arange(block_v, dtype=jnp.int32)
  return w_blk_DxB, start, cols_B, cols_B >= j * block_v


def _block_logits(hidden_NxD, w_blk_DxB, softcap):
  return apply_softcap(
      jnp.einsum("nd,db->nb", hidden_NxD, w_blk_DxB, preferred_element_type=jnp.float32),
      softcap)


def chunked_forward(hidden_NxD, w_out_DxV, targets_N, spec):
  """(logprob_N, entropy_N, lse_N) by an online log-sum-exp over vocabulary blocks."""
  num_blocks = -(-w_out_DxV.shape[1] // spec.block_v)

  def stats(j):
    w_blk_DxB, _, cols_B, new_B = _vocab_block(w_out_DxV, j, spec.block_v)
    capped_NxB = _block_logits(hidden_NxD, w_blk_DxB, spec.softcap)
    valid_NxB = jnp.broadcast_to(new_B[None], capped_NxB.shape)
    masked_NxB = jnp.where(valid_NxB, capped_NxB, -jnp.inf)
    is_target_NxB = (cols_B[None] == targets_N[:, None]) & valid_NxB
    target_N = jnp.sum(jnp.where(is_target_NxB, capped_NxB, 0.0), axis=1)
    return (*block_stats(masked_NxB, valid_NxB), target_N)

  def body(j, carry):
    max_N, sumexp_N, shifted_N, target_N = carry
    b_max_N, b_sumexp_N, b_shifted_N, b_target_N = stats(j)
    merged = merge_stats(jnp.stack([max_N, b_max_N]), jnp.stack([sumexp_N, b_sumexp_N]),
                         jnp.stack([shifted_N, b_shifted_N]))
    return (*merged, target_N + b_target_N)

  max_N, sumexp_N, shifted_N, target_N = lax.fori_loop(1, num_blocks, body, stats(0))
  lse_N, entropy_N = finish_stats(max_N, sumexp_N, shifted_N)
  return target_N - lse_N, entropy_N, lse_N


def chunked_backward(hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N, g_logprob_N,
                     g_entropy_N, *, softcap, block_v):
  """(d_hidden [N, D], d_w_out [D, V]) recomputing the logits one vocabulary block at a time.

  Only one [N, block_v] block of logits and its cotangent is live at a time; d_hidden is
  accumulated in float32, each d_w_out column block is written once. hidden and w_out must share
  a dtype; the block cotangent is cast to it for the two matmuls (float32 accumulation).
  `g_entropy_N` may be None. The chunked implementation's backward, and the Pallas one's on GPU.
  """
  if hidden_NxD.dtype != w_out_DxV.dtype:
    raise TypeError(f"hidden ({hidden_NxD.dtype}) and w_out ({w_out_DxV.dtype}) must share a dtype")
  num_blocks = -(-w_out_DxV.shape[1] // block_v)
  dtype = hidden_NxD.dtype
  g_logprob_N = g_logprob_N.astype(jnp.float32)
  if g_entropy_N is not None:
    g_entropy_N = g_entropy_N.astype(jnp.float32)

  def body(j, carry):
    d_hidden_NxD, d_w_DxV = carry
    w_blk_DxB, start, cols_B, new_B = _vocab_block(w_out_DxV, j, block_v)
    capped_NxB = _block_logits(hidden_NxD, w_blk_DxB, softcap)
    valid_NxB = jnp.broadcast_to(new_B[None], capped_NxB.shape)
    is_target_NxB = (cols_B[None] == targets_N[:, None]) & valid_NxB
    g_NxB = logits_block_grad(capped_NxB, is_target_NxB, valid_NxB, lse_N, entropy_N,
                              g_logprob_N, g_entropy_N, softcap).astype(dtype)
    d_hidden_NxD = d_hidden_NxD + jnp.einsum("nb,db->nd", g_NxB, w_blk_DxB,
                                             preferred_element_type=jnp.float32)
    d_w_blk_DxB = jnp.einsum("nd,nb->db", hidden_NxD, g_NxB,
                             preferred_element_type=jnp.float32).astype(d_w_DxV.dtype)
    # The slid last block overlaps the previous one: keep the columns already written.
    old_DxB = lax.dynamic_slice_in_dim(d_w_DxV, start, block_v, axis=1)
    d_w_blk_DxB = jnp.where(new_B[None], d_w_blk_DxB, old_DxB)
    return d_hidden_NxD, lax.dynamic_update_slice_in_dim(d_w_DxV, d_w_blk_DxB, start, axis=1)

  init = (jnp.zeros(hidden_NxD.shape, jnp.float32), jnp.zeros_like(w_out_DxV))
  d_hidden_NxD, d_w_DxV = lax.fori_loop(0, num_blocks, body, init)
  return d_hidden_NxD, d_w_DxV


def with_blockwise_vjp(forward, backward):
  """f(hidden, w_out, targets, spec) -> (logprob [N], entropy [N]) with a custom VJP.

  `forward(hidden, w_out, targets, spec)` returns (logprob, entropy, lse); lse and entropy are
  the residuals (with the inputs) from which `backward(hidden, w_out, targets, lse, entropy,
  g_logprob, g_entropy, spec)` recomputes the logits block by block and returns
  (d_hidden, d_w_out). g_entropy is None when spec.with_entropy_grad is False.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def fn(hidden_NxD, w_out_DxV, targets_N, spec):
    logprob_N, entropy_N, _ = forward(hidden_NxD, w_out_DxV, targets_N, spec)
    return logprob_N, entropy_N

  def fwd(hidden_NxD, w_out_DxV, targets_N, spec):
    logprob_N, entropy_N, lse_N = forward(hidden_NxD, w_out_DxV, targets_N, spec)
    return (logprob_N, entropy_N), (hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N)

  def bwd(spec, residuals, cotangents):
    hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N = residuals
    g_logprob_N, g_entropy_N = cotangents
    d_hidden_NxD, d_w_DxV = backward(
        hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N, g_logprob_N.astype(jnp.float32),
        g_entropy_N.astype(jnp.float32) if spec.with_entropy_grad else None, spec)
    return d_hidden_NxD.astype(hidden_NxD.dtype), d_w_DxV.astype(w_out_DxV.dtype), None

  fn.defvjp(fwd, bwd)
  return fn


def _chunked_backward(hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N, g_logprob_N,
                      g_entropy_N, spec):
  return chunked_backward(hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N, g_logprob_N,
                          g_entropy_N, softcap=spec.softcap, block_v=spec.block_v)


_chunked = with_blockwise_vjp(chunked_forward, _chunked_backward)


def chunked_target_logprobs(hidden_NxD, w_out_DxV, targets_N, *, softcap=None,
                            return_entropy=False, block_v=DEFAULT_BLOCK_V):
  """log softmax(softcap(hidden @ w_out))[n, targets[n]] without materialising [N, V].

  Args:
    hidden_NxD: final hidden states [N, D], any float dtype (matmuls accumulate in float32).
    w_out_DxV: output projection [D, V].
    targets_N: int token ids [N], each in [0, V).
    softcap: Gemma 2 final-logit soft-cap (e.g. 30.0), or None.
    return_entropy: also return the entropy (nats) of each row's distribution.
    block_v: vocabulary columns per step; memory is O(N * block_v). Clipped to V.

  Returns:
    float32 log-probs [N], and float32 entropies [N] when return_entropy. Differentiable with
    respect to hidden and w_out by a blockwise custom VJP.
  """
  validate_inputs(hidden_NxD, w_out_DxV, targets_N, softcap)
  block_v = min(validate_block("block_v", block_v), w_out_DxV.shape[1])
  spec = ChunkSpec(softcap=None if softcap is None else float(softcap),
                   with_entropy_grad=bool(return_entropy), block_v=block_v)
  dtype = common_dtype(hidden_NxD, w_out_DxV)
  logprob_N, entropy_N = _chunked(hidden_NxD.astype(dtype), w_out_DxV.astype(dtype),
                                  targets_N.astype(jnp.int32), spec)
  return (logprob_N, entropy_N) if return_entropy else logprob_N
