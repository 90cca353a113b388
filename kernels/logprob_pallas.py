"""Target log-probs over a large vocabulary: fused Pallas kernels, forward and backward.

Every kernel works on one tile of logits, vocabulary block j x row block i, laid out
[block_v, block_n]: vocabulary along the sublanes, rows along the lanes. Per-row quantities
(targets, statistics, cotangents) are then reductions over axis 0 or broadcasts along it, and
travel as lane-dense 1-D [block_n] blocks, a layout Mosaic (TPU) loads and stores as is.

Forward: a grid of (row block i, vocabulary block j) with no sequential axis, so the same kernel
runs on GPU (Triton, where grid programs run concurrently and cannot accumulate into a shared
output), TPU and the CPU interpreter. Each program computes its tile of logits in float32
(looping over D in block_d slices), applies the softcap, masks padded vocabulary columns to -inf
and writes the tile's log-sum-exp statistics (row max, sum of exponentials, entropy moment) and
the target's logit if the tile holds it. The [V / block_v, N] statistics are merged by an online
log-sum-exp in JAX. Memory: 16 bytes per (row, vocabulary block) instead of 4 bytes per (row,
vocabulary entry).

Backward (TPU and the interpreter): two kernels that recompute each tile's logits from the
forward's residuals (lse and entropy per row, so p = exp(z - lse) needs no second pass) and turn
them into the tile's logit cotangent g [block_v, block_n]:
- d_hidden: grid (i, j), j sequential; d_hidden[i] += g^T w[:, j] accumulates over the
  vocabulary blocks in a float32 VMEM scratch and is written once, at the last j;
- d_w_out: grid (j, i), i sequential; d_w_out[:, j] += hidden[i]^T g^T accumulates over the
  row blocks the same way.
Each recomputes the logits once (4 matmuls per tile in all, against the minimum of 3), the price
of never holding [N, V] nor an [N, V]-sized cotangent. On GPU the backward is the blockwise pure
JAX walk `logprob_chunked.chunked_backward`: Triton grid programs cannot accumulate.

Verified: values and gradients in the CPU interpreter, and deviceless Mosaic compiles of the
forward and both backward kernels for a TPU v5e (tests/test_kernels.py); lowering of the forward
to Triton IR for CUDA. Not yet run on a GPU or a TPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from . import logprob_chunked as chunked

# (block_n, block_v) by platform. Triton: a [256, 64] float32 tile is 128 registers per thread
# at 4 warps. TPU: the [block_n] row blocks are 1-D lane-dim blocks, so block_n is a power of
# two >= 128 (Mosaic's rule for 1-D blocks). The interpreter takes the GPU tiles. 256 divides
# the Gemma (256000) and Llama 3 (128256) vocabularies, so those need no padded copy of w_out.
_DEFAULT_BLOCKS = {"gpu": (64, 256), "tpu": (128, 512)}
# On GPU the D contraction is split so that a [block_n, block_d] and a [block_d, block_v] slice
# fit in registers / shared memory next to the [block_v, block_n] float32 accumulator.
_GPU_BLOCK_D = 64
# Contract axis 0 of the left operand with axis 1 of the right one. All three matmuls of the
# kernels have this form: w[D, B] . hidden[N, D] -> logits [B, N]; g[B, N] . w[D, B] ->
# d_hidden [N, D]; hidden[N, D] . g[B, N] -> d_w [D, B].
_CONTRACT_0_1 = (((0,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class _PallasSpec(chunked.ChunkSpec):
  """Static (hashable) settings of one Pallas call: the chunked walk's (softcap,
  with_entropy_grad, block_v: the kernels' vocabulary tile) and the kernels' own."""
  block_n: int
  block_d: int
  bwd_block_v: int
  interpret: bool
  on_gpu: bool


def _dot(a, b):
  # Products of bf16 (or narrower) operands are exact in float32 at any precision, and Mosaic
  # rejects "highest" for them (e.g. a global jax_default_matmul_precision), so it is pinned;
  # float32 operands follow the global setting.
  precision = None if a.dtype == b.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, _CONTRACT_0_1, precision=precision,
                         preferred_element_type=jnp.float32)


def _tile_logits(hidden_ref, w_ref, block_d, softcap):
  """Soft-capped float32 logits of one tile, [block_v, block_n]."""
  block_n, dim = hidden_ref.shape
  block_v = w_ref.shape[1]
  if block_d == dim:
    logits_BxN = _dot(w_ref[...], hidden_ref[...])
  else:
    def accumulate(k, acc_BxN):
      d_slice = pl.ds(pl.multiple_of(k * block_d, block_d), block_d)
      return acc_BxN + _dot(w_ref[d_slice, :], hidden_ref[:, d_slice])
    logits_BxN = lax.fori_loop(0, dim // block_d, accumulate,
                               jnp.zeros((block_v, block_n), jnp.float32))
  return chunked.apply_softcap(logits_BxN, softcap)


def _tile_columns(j, vocab, shape):
  """Vocabulary ids of a [block_v, block_n] tile of vocabulary block j, and which of them are
  real (None when V is a multiple of block_v: all are)."""
  cols_BxN = j * shape[0] + lax.broadcasted_iota(jnp.int32, shape, 0)
  return cols_BxN, (cols_BxN < vocab if vocab % shape[0] else None)


def _forward_kernel(hidden_ref, w_ref, targets_ref, max_ref, sumexp_ref, shifted_ref,
                    target_ref, *, vocab, block_d, softcap):
  """One (row block, vocabulary block) tile: its log-sum-exp statistics and target logit."""
  capped_BxN = _tile_logits(hidden_ref, w_ref, block_d, softcap)
  cols_BxN, valid_BxN = _tile_columns(pl.program_id(1), vocab, capped_BxN.shape)
  if valid_BxN is not None:
    # Padded vocabulary columns (zeros of the padded w_out) must not enter the softmax.
    capped_BxN = jnp.where(valid_BxN, capped_BxN, -jnp.inf)
  max_N, sumexp_N, shifted_N = chunked.block_stats(capped_BxN, valid_BxN, axis=0)
  is_target_BxN = cols_BxN == targets_ref[...][None, :]
  max_ref[...] = max_N
  sumexp_ref[...] = sumexp_N
  shifted_ref[...] = shifted_N
  target_ref[...] = jnp.sum(jnp.where(is_target_BxN, capped_BxN, 0.0), axis=0)


def _tile_grad(j, hidden_ref, w_ref, row_refs, *, vocab, block_d, softcap):
  """Cotangent of one tile's pre-softcap logits, [block_v, block_n], in w's dtype (the MXU's
  operand; the products accumulate in float32). row_refs: targets, lse, g_logprob and, when the
  entropy has a cotangent, entropy and g_entropy."""
  targets_N, lse_N, g_logprob_N, *entropy_rows = (ref[...] for ref in row_refs)
  entropy_N, g_entropy_N = entropy_rows or (None, None)
  capped_BxN = _tile_logits(hidden_ref, w_ref, block_d, softcap)
  cols_BxN, valid_BxN = _tile_columns(j, vocab, capped_BxN.shape)
  g_BxN = chunked.logits_block_grad(capped_BxN, cols_BxN == targets_N[None, :], valid_BxN, lse_N,
                                    entropy_N, g_logprob_N, g_entropy_N, softcap, axis=0)
  return g_BxN.astype(w_ref.dtype)


def _accumulate(step, last, acc_ref, out_ref, update):
  """acc = 0 at step 0, acc += update(), out = acc at the last step (step: the sequential axis)."""
  @pl.when(step == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += update()

  @pl.when(step == last)
  def _write():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _d_hidden_kernel(hidden_ref, w_ref, *refs, **tile):
  """Grid (i, j): d_hidden[i] = sum over vocabulary blocks j of g_ij^T w_j."""
  *row_refs, d_hidden_ref, acc_NxD_ref = refs
  j = pl.program_id(1)
  _accumulate(j, pl.num_programs(1) - 1, acc_NxD_ref, d_hidden_ref,
              lambda: _dot(_tile_grad(j, hidden_ref, w_ref, row_refs, **tile), w_ref[...]))


def _d_w_kernel(hidden_ref, w_ref, *refs, **tile):
  """Grid (j, i): d_w[:, j] = sum over row blocks i of hidden_i^T g_ij^T."""
  *row_refs, d_w_ref, acc_DxB_ref = refs
  i = pl.program_id(1)
  _accumulate(i, pl.num_programs(1) - 1, acc_DxB_ref, d_w_ref,
              lambda: _dot(hidden_ref[...],
                           _tile_grad(pl.program_id(0), hidden_ref, w_ref, row_refs, **tile)))


def _tpu_params(semantics, dim, spec, itemsize, out_elems=0, scratch_elems=0):
  """Mosaic settings of one kernel: the grid axes' semantics and, when the kernel needs more
  than the smallest default scoped VMEM of the TPUs (16 MiB), a raised limit.

  The estimate: double-buffered hidden [block_n, D] and w [D, block_v] blocks and output block,
  the float32 scratch, and ~8 float32 [block_v, block_n] tile temporaries (logits, p, cotangent,
  masks), plus 25 %. E.g. d_w_out at D = 3584, 512 x 128 tiles, bf16: ~31 MiB (v5e has 128 MiB
  of VMEM per core, v5p 64 MiB); a tile that does not fit fails to compile, naming VMEM.
  """
  buffers = 2 * (spec.block_n * dim + dim * spec.block_v + out_elems) * itemsize
  need = int(1.25 * (buffers + 4 * scratch_elems + 8 * 4 * spec.block_n * spec.block_v))
  return pltpu.CompilerParams(dimension_semantics=semantics,
                              vmem_limit_bytes=need if need > 16 * 2**20 else None)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad(hidden_NxD, w_out_DxV, rows_N, spec):
  """Inputs padded to whole tiles, with the tile grid (row blocks, vocabulary blocks).

  Out-of-bounds block reads are not masked on every backend (Triton reads past the buffer), so
  ragged shapes are padded: padded rows are dropped (their row vectors `rows_N` are padded with
  zeros: zero cotangents), padded columns masked in the kernels.
  """
  rows, vocab = hidden_NxD.shape[0], w_out_DxV.shape[1]
  rows_pad = _round_up(rows, spec.block_n)
  vocab_pad = _round_up(vocab, spec.block_v)
  hidden_NxD = jnp.pad(hidden_NxD, ((0, rows_pad - rows), (0, 0)))
  rows_N = [jnp.pad(x_N, (0, rows_pad - rows)) for x_N in rows_N]
  w_out_DxV = jnp.pad(w_out_DxV, ((0, 0), (0, vocab_pad - vocab)))
  return hidden_NxD, w_out_DxV, rows_N, (rows_pad // spec.block_n, vocab_pad // spec.block_v)


def pallas_forward(hidden_NxD, w_out_DxV, targets_N, spec):
  """(logprob_N, entropy_N, lse_N) from the kernel's per-tile statistics."""
  rows, dim = hidden_NxD.shape
  vocab = w_out_DxV.shape[1]
  hidden_NxD, w_out_DxV, (targets_N,), grid = _pad(hidden_NxD, w_out_DxV, [targets_N], spec)
  num_i, num_j = grid
  # The statistics of tile (i, j) are entries [j, i * block_n : (i + 1) * block_n] of [K, N],
  # flattened: a 1-D block, as the TPU wants for per-row vectors.
  stat_KN = jax.ShapeDtypeStruct((num_j * num_i * spec.block_n,), jnp.float32)
  stat_spec = pl.BlockSpec((spec.block_n,), lambda i, j: (j * num_i + i,))
  kernel = functools.partial(_forward_kernel, vocab=vocab, block_d=spec.block_d,
                             softcap=spec.softcap)
  if spec.on_gpu:
    # Pick the Triton lowering explicitly: the default (Mosaic GPU) stages whole blocks in
    # shared memory, and a [D, block_v] slice of w_out does not fit there.
    params = pltriton.CompilerParams(num_warps=4, num_stages=2)
  else:
    params = _tpu_params(("parallel", "parallel"), dim, spec, hidden_NxD.dtype.itemsize)
  stats = pl.pallas_call(
      kernel,
      out_shape=(stat_KN,) * 4,
      grid=grid,
      in_specs=[
          pl.BlockSpec((spec.block_n, dim), lambda i, j: (i, 0)),
          pl.BlockSpec((dim, spec.block_v), lambda i, j: (0, j)),
          pl.BlockSpec((spec.block_n,), lambda i, j: (i,)),
      ],
      out_specs=(stat_spec,) * 4,
      compiler_params=params,
      interpret=spec.interpret,
      name="target_logprobs_fwd",
  )(hidden_NxD, w_out_DxV, targets_N)
  max_KxN, sumexp_KxN, shifted_KxN, target_KxN = (x.reshape(num_j, -1) for x in stats)
  lse_N, entropy_N = chunked.finish_stats(*chunked.merge_stats(max_KxN, sumexp_KxN, shifted_KxN))
  logprob_N = jnp.sum(target_KxN, axis=0) - lse_N
  return logprob_N[:rows], entropy_N[:rows], lse_N[:rows]


def pallas_backward(hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N, g_logprob_N,
                     g_entropy_N, spec):
  """(d_hidden [N, D], d_w_out [D, V]) by the two backward kernels (the chunked walk on GPU)."""
  if spec.on_gpu:
    return chunked.chunked_backward(hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N,
                                    g_logprob_N, g_entropy_N, softcap=spec.softcap,
                                    block_v=spec.bwd_block_v)
  rows, dim = hidden_NxD.shape
  vocab = w_out_DxV.shape[1]
  rows_N = [targets_N, lse_N, g_logprob_N]
  if g_entropy_N is not None:
    rows_N += [entropy_N, g_entropy_N]
  hidden_NxD, w_out_DxV, rows_N, (num_i, num_j) = _pad(hidden_NxD, w_out_DxV, rows_N, spec)
  block_n, block_v = spec.block_n, spec.block_v
  tile = dict(vocab=vocab, block_d=spec.block_d, softcap=spec.softcap)
  # The accumulating grid axis (the second) runs in order on one core.
  semantics, itemsize = ("parallel", "arbitrary"), hidden_NxD.dtype.itemsize
  d_hidden_NxD = pl.pallas_call(
      functools.partial(_d_hidden_kernel, **tile),
      out_shape=jax.ShapeDtypeStruct(hidden_NxD.shape, hidden_NxD.dtype),
      grid=(num_i, num_j),
      in_specs=[pl.BlockSpec((block_n, dim), lambda i, j: (i, 0)),
                pl.BlockSpec((dim, block_v), lambda i, j: (0, j)),
                *[pl.BlockSpec((block_n,), lambda i, j: (i,))] * len(rows_N)],
      out_specs=pl.BlockSpec((block_n, dim), lambda i, j: (i, 0)),
      scratch_shapes=[pltpu.VMEM((block_n, dim), jnp.float32)],
      compiler_params=_tpu_params(semantics, dim, spec, itemsize, block_n * dim, block_n * dim),
      interpret=spec.interpret,
      name="target_logprobs_bwd_hidden",
  )(hidden_NxD, w_out_DxV, *rows_N)
  d_w_DxV = pl.pallas_call(
      functools.partial(_d_w_kernel, **tile),
      out_shape=jax.ShapeDtypeStruct(w_out_DxV.shape, w_out_DxV.dtype),
      grid=(num_j, num_i),
      in_specs=[pl.BlockSpec((block_n, dim), lambda j, i: (i, 0)),
                pl.BlockSpec((dim, block_v), lambda j, i: (0, j)),
                *[pl.BlockSpec((block_n,), lambda j, i: (i,))] * len(rows_N)],
      out_specs=pl.BlockSpec((dim, block_v), lambda j, i: (0, j)),
      scratch_shapes=[pltpu.VMEM((dim, block_v), jnp.float32)],
      compiler_params=_tpu_params(semantics, dim, spec, itemsize, dim * block_v, dim * block_v),
      interpret=spec.interpret,
      name="target_logprobs_bwd_w",
  )(hidden_NxD, w_out_DxV, *rows_N)
  return d_hidden_NxD[:rows], d_w_DxV[:, :vocab]


_pallas = chunked.with_blockwise_vjp(pallas_forward, pallas_backward)


def _is_power_of_two(x: int) -> bool:
  return x & (x - 1) == 0


def _pick_block_d(dim: int, block_d, on_gpu: bool) -> int:
  if block_d is not None:
    block_d = chunked.validate_block("block_d", block_d)
    if dim % block_d:
      raise ValueError(f"block_d={block_d} must divide the hidden size D={dim}")
    return block_d
  if on_gpu and dim % _GPU_BLOCK_D == 0:
    return _GPU_BLOCK_D
  return dim


def pallas_target_logprobs(hidden_NxD, w_out_DxV, targets_N, *, softcap=None,
                           return_entropy=False, block_n=None, block_v=None, block_d=None,
                           bwd_block_v=chunked.DEFAULT_BLOCK_V, interpret=None):
  """log softmax(softcap(hidden @ w_out))[n, targets[n]] with fused Pallas kernels.

  Args:
    hidden_NxD: final hidden states [N, D], any float dtype (matmuls accumulate in float32).
    w_out_DxV: output projection [D, V].
    targets_N: int token ids [N], each in [0, V).
    softcap: Gemma 2 final-logit soft-cap (e.g. 30.0), or None.
    return_entropy: also return the entropy (nats) of each row's distribution.
    block_n, block_v: kernel tile (rows x vocabulary columns), forward and backward; None for
      the platform default (64 x 256 on GPU and in the interpreter, 128 x 512 on TPU, where
      block_n must be a power of two >= 128). N and V need not divide them: rows are padded,
      and V is padded with a copy of w_out when block_v does not.
    block_d: D slice per matmul step inside the kernel; must divide D. None: all of D, or 64 on
      GPU when 64 divides D.
    bwd_block_v: vocabulary columns per step of the pure JAX backward walk that replaces the
      backward kernels on GPU.
    interpret: run the kernels in the Pallas interpreter; None means True on CPU.

  Returns:
    float32 log-probs [N], and float32 entropies [N] when return_entropy. Differentiable with
    respect to hidden and w_out.
  """
  chunked.validate_inputs(hidden_NxD, w_out_DxV, targets_N, softcap)
  spec = pallas_spec(hidden_NxD.shape[1], w_out_DxV.shape[1], softcap=softcap,
                     return_entropy=return_entropy, block_n=block_n, block_v=block_v,
                     block_d=block_d, bwd_block_v=bwd_block_v, interpret=interpret)
  dtype = chunked.common_dtype(hidden_NxD, w_out_DxV)
  logprob_N, entropy_N = _pallas(hidden_NxD.astype(dtype), w_out_DxV.astype(dtype),
                                 targets_N.astype(jnp.int32), spec)
  return (logprob_N, entropy_N) if return_entropy else logprob_N


def pallas_spec(dim: int, vocab: int, *, softcap, return_entropy, block_n=None, block_v=None,
                block_d=None, bwd_block_v=chunked.DEFAULT_BLOCK_V, interpret=None) -> _PallasSpec:
  """The static settings of a call on [N, dim] rows and a [dim, vocab] head (arguments as in
  pallas_target_logprobs), for `pallas_forward` / `pallas_backward`."""
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  on_gpu = not interpret and backend in ("gpu", "cuda", "rocm")
  default_n, default_v = _DEFAULT_BLOCKS["tpu" if backend == "tpu" and not interpret else "gpu"]
  block_n = chunked.validate_block("block_n", default_n if block_n is None else block_n)
  block_v = chunked.validate_block("block_v", default_v if block_v is None else block_v)
  bwd_block_v = min(chunked.validate_block("bwd_block_v", bwd_block_v), vocab)
  block_d = _pick_block_d(dim, block_d, on_gpu)
  if on_gpu:
    for name, size in (("block_n", block_n), ("block_v", block_v), ("block_d", block_d)):
      if size < 16 or not _is_power_of_two(size):
        raise ValueError(f"{name}={size}: the Pallas Triton lowering needs a power of two "
                         f">= 16 (for block_d, pass one that divides D={dim})")
  return _PallasSpec(softcap=None if softcap is None else float(softcap),
                     with_entropy_grad=bool(return_entropy), block_n=block_n, block_v=block_v,
                     block_d=block_d, bwd_block_v=bwd_block_v, interpret=bool(interpret),
                     on_gpu=on_gpu)
