"""Target log-probs over a large vocabulary: a fused Pallas forward kernel.

Forward: a Pallas kernel over a grid of (row block i, vocabulary block j). Each program computes
its [block_n, block_v] tile of logits in float32 (looping over D in block_d slices), applies the
softcap, masks padded vocabulary columns to -inf and writes the tile's log-sum-exp statistics
(row max, sum of exponentials, entropy moment) and the target's logit if the tile holds it. The
grid has no sequential axis, so the same kernel runs on GPU (Triton, where grid programs run
concurrently and cannot accumulate into a shared output), TPU and the CPU interpreter; the
[V / block_v, N] statistics are merged by an online log-sum-exp in JAX. Memory: 16 bytes per
(row, vocabulary block) instead of 4 bytes per (row, vocabulary entry).

Backward: the blockwise pure-JAX walk of `logprob_chunked.chunked_backward` (XLA matmuls per
vocabulary block, never [N, V]), not a Pallas kernel.

Verified: values and gradients in the CPU interpreter (tests/test_kernels.py), and lowering to
Triton IR for CUDA. Not yet run on a GPU or a TPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import logprob_chunked as chunked

# (block_n, block_v) by platform. Triton: a [64, 256] float32 tile is 128 registers per thread
# at 4 warps. TPU: the [block_n] statistics blocks are lane-dim blocks, so block_n is a multiple
# of 128. The interpreter takes the GPU tiles. 256 divides the Gemma (256000) and Llama 3
# (128256) vocabularies, so those need no padded copy of w_out.
_DEFAULT_BLOCKS = {"gpu": (64, 256), "tpu": (128, 512)}
# On GPU the D contraction is split so that a [block_n, block_d] and a [block_d, block_v] slice
# fit in registers / shared memory next to the [block_n, block_v] float32 accumulator.
_GPU_BLOCK_D = 64


@dataclasses.dataclass(frozen=True)
class _PallasSpec(chunked.ChunkSpec):
  """Static (hashable) settings of one Pallas call: the chunked walk's (softcap,
  with_entropy_grad, block_v: the kernel's vocabulary tile) and the kernel's own."""
  block_n: int
  block_d: int
  bwd_block_v: int
  interpret: bool
  on_gpu: bool


def _forward_kernel(hidden_ref, w_ref, targets_ref, max_ref, sumexp_ref, shifted_ref,
                    target_ref, *, vocab, block_d, softcap):
  """One (row block, vocabulary block) tile: its log-sum-exp statistics and target logit."""
  block_n, dim = hidden_ref.shape
  block_v = w_ref.shape[1]
  num_d = dim // block_d
  if num_d == 1:
    logits_NxB = jnp.dot(hidden_ref[...], w_ref[...], preferred_element_type=jnp.float32)
  else:
    def accumulate(k, acc_NxB):
      d_slice = pl.ds(pl.multiple_of(k * block_d, block_d), block_d)
      return acc_NxB + jnp.dot(hidden_ref[:, d_slice], w_ref[d_slice, :],
                               preferred_element_type=jnp.float32)
    logits_NxB = lax.fori_loop(0, num_d, accumulate,
                               jnp.zeros((block_n, block_v), jnp.float32))
  logits_NxB = chunked.apply_softcap(logits_NxB, softcap)
  cols_NxB = pl.program_id(1) * block_v + lax.broadcasted_iota(jnp.int32, (block_n, block_v), 1)
  valid_NxB = None
  if vocab % block_v:
    # Padded vocabulary columns (zeros of the padded w_out) must not enter the softmax.
    valid_NxB = cols_NxB < vocab
    logits_NxB = jnp.where(valid_NxB, logits_NxB, -jnp.inf)
  max_N, sumexp_N, shifted_N = chunked.block_stats(logits_NxB, valid_NxB)
  is_target_NxB = cols_NxB == targets_ref[...][:, None]
  max_ref[...] = max_N
  sumexp_ref[...] = sumexp_N
  shifted_ref[...] = shifted_N
  target_ref[...] = jnp.sum(jnp.where(is_target_NxB, logits_NxB, 0.0), axis=1)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pallas_forward(hidden_NxD, w_out_DxV, targets_N, spec):
  """(logprob_N, entropy_N, lse_N) from the kernel's per-tile statistics."""
  rows, dim = hidden_NxD.shape
  vocab = w_out_DxV.shape[1]
  rows_pad = _round_up(rows, spec.block_n)
  vocab_pad = _round_up(vocab, spec.block_v)
  # Out-of-bounds block reads are not masked on every backend (Triton reads past the buffer),
  # so ragged shapes are padded: padded rows are dropped, padded columns masked in the kernel.
  if rows_pad != rows:
    hidden_NxD = jnp.pad(hidden_NxD, ((0, rows_pad - rows), (0, 0)))
    targets_N = jnp.pad(targets_N, (0, rows_pad - rows))
  if vocab_pad != vocab:
    w_out_DxV = jnp.pad(w_out_DxV, ((0, 0), (0, vocab_pad - vocab)))
  grid = (rows_pad // spec.block_n, vocab_pad // spec.block_v)
  stat_KxN = jax.ShapeDtypeStruct((grid[1], rows_pad), jnp.float32)
  stat_spec = pl.BlockSpec((None, spec.block_n), lambda i, j: (j, i))
  kernel = functools.partial(_forward_kernel, vocab=vocab, block_d=spec.block_d,
                             softcap=spec.softcap)
  max_KxN, sumexp_KxN, shifted_KxN, target_KxN = pl.pallas_call(
      kernel,
      out_shape=(stat_KxN,) * 4,
      grid=grid,
      in_specs=[
          pl.BlockSpec((spec.block_n, dim), lambda i, j: (i, 0)),
          pl.BlockSpec((dim, spec.block_v), lambda i, j: (0, j)),
          pl.BlockSpec((spec.block_n,), lambda i, j: (i,)),
      ],
      out_specs=(stat_spec,) * 4,
      # On GPU, pick the Triton lowering explicitly: the default (Mosaic GPU) stages whole
      # blocks in shared memory, and a [D, block_v] slice of w_out does not fit there.
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2) if spec.on_gpu else None,
      interpret=spec.interpret,
      name="target_logprobs_fwd",
  )(hidden_NxD, w_out_DxV, targets_N)
  lse_N, entropy_N = chunked.finish_stats(*chunked.merge_stats(max_KxN, sumexp_KxN, shifted_KxN))
  logprob_N = jnp.sum(target_KxN, axis=0) - lse_N
  return logprob_N[:rows], entropy_N[:rows], lse_N[:rows]


_pallas = chunked.with_blockwise_vjp(_pallas_forward, lambda spec: spec.bwd_block_v)


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
  """log softmax(softcap(hidden @ w_out))[n, targets[n]] with a fused Pallas forward kernel.

  Args:
    hidden_NxD: final hidden states [N, D], any float dtype (matmuls accumulate in float32).
    w_out_DxV: output projection [D, V].
    targets_N: int token ids [N], each in [0, V).
    softcap: Gemma 2 final-logit soft-cap (e.g. 30.0), or None.
    return_entropy: also return the entropy (nats) of each row's distribution.
    block_n, block_v: kernel tile (rows x vocabulary columns); None for the platform default
      (64 x 256 on GPU and in the interpreter, 128 x 512 on TPU). N and V need not divide
      them: rows are padded, and V is padded with a copy of w_out when block_v does not.
    block_d: D slice per matmul step inside the kernel; must divide D. None: all of D, or 64 on
      GPU when 64 divides D.
    bwd_block_v: vocabulary columns per step of the (pure JAX) backward walk.
    interpret: run the kernel in the Pallas interpreter; None means True on CPU.

  Returns:
    float32 log-probs [N], and float32 entropies [N] when return_entropy. Differentiable with
    respect to hidden and w_out.
  """
  chunked.validate_inputs(hidden_NxD, w_out_DxV, targets_N, softcap)
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  on_gpu = not interpret and backend in ("gpu", "cuda", "rocm")
  default_n, default_v = _DEFAULT_BLOCKS["tpu" if backend == "tpu" and not interpret else "gpu"]
  block_n = chunked.validate_block("block_n", default_n if block_n is None else block_n)
  block_v = chunked.validate_block("block_v", default_v if block_v is None else block_v)
  bwd_block_v = min(chunked.validate_block("bwd_block_v", bwd_block_v), w_out_DxV.shape[1])
  block_d = _pick_block_d(hidden_NxD.shape[1], block_d, on_gpu)
  if on_gpu:
    for name, size in (("block_n", block_n), ("block_v", block_v), ("block_d", block_d)):
      if size < 16 or not _is_power_of_two(size):
        raise ValueError(f"{name}={size}: the Pallas Triton lowering needs a power of two "
                         f">= 16 (for block_d, pass one that divides D={hidden_NxD.shape[1]})")
  spec = _PallasSpec(softcap=None if softcap is None else float(softcap),
                     with_entropy_grad=bool(return_entropy), block_n=block_n, block_v=block_v,
                     block_d=block_d, bwd_block_v=bwd_block_v, interpret=bool(interpret),
                     on_gpu=on_gpu)
  dtype = chunked.common_dtype(hidden_NxD, w_out_DxV)
  logprob_N, entropy_N = _pallas(hidden_NxD.astype(dtype), w_out_DxV.astype(dtype),
                                 targets_N.astype(jnp.int32), spec)
  return (logprob_N, entropy_N) if return_entropy else logprob_N
