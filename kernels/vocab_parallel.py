"""Target log-probs with the LM head split along the vocabulary over mesh axes.

No device ever holds the whole [D, V] head or its gradient. Each device keeps its [D, V / S]
vocabulary slice (S devices along `axes`) and, per step, a chunk of rows gathered from the
devices that share its slice's rows:

- forward: the chunked or Pallas block walk on the local slice gives each row's local
  (log-sum-exp, entropy, target logit); the log-sum-exp is combined across the S slices
  (pmax, then psum of the rescaled sums), and so are the entropy and the target logit (a target
  outside a slice matches no column of it);
- backward: the same walk, with the global log-sum-exp and entropy, gives d_w_out for the local
  slice (no communication) and a partial d_hidden that is summed over the slices and scattered
  back to the devices that own the rows.

The bytes moved per step are the gathered rows [rows, D] and a few [rows] vectors, instead of
the whole head. Inside the shard_map, n is a device's rows, G the rows gathered onto it (a
chunk of its own and its peers'), U = V / S its vocabulary columns.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from . import logprob_chunked as chunked
from . import logprob_pallas as pallas
from .target_logprobs import IMPLS  # One list of walks for both entry points.
DEFAULT_ROW_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class _Setup:
  """Static settings of one call: the mesh, who holds which rows and vocabulary columns, and the
  local block walk (`forward`/`backward` with their `spec`, as in chunked.with_blockwise_vjp)."""
  mesh: object
  axes: tuple          # mesh axes the vocabulary is split over (major first)
  row_axes: tuple      # mesh axes the rows are split over (major first)
  gather_axes: tuple   # row axes that also split the vocabulary: rows are gathered over them
  vocab_local: int
  chunk: int           # local rows per step (each step gathers chunk * gathered-devices rows)
  num_chunks: int
  forward: Callable
  backward: Callable
  spec: object
  # with_blockwise_vjp hands the entropy cotangent on when this is set; _local_backward passes
  # it to the local walk only if `spec` asks for it.
  with_entropy_grad = True


def _chunked_backward(hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N, g_logprob_N,
                      g_entropy_N, spec):
  return chunked.chunked_backward(hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N,
                                  g_logprob_N, g_entropy_N, softcap=spec.softcap,
                                  block_v=spec.block_v)


def _gather(x, setup):
  if not setup.gather_axes:
    return x
  return lax.all_gather(x, setup.gather_axes, axis=0, tiled=True)


def _own_rows(x_G, setup):
  """This device's `chunk` rows of a gathered [G * chunk, ...] array."""
  if not setup.gather_axes:
    return x_G
  start = lax.axis_index(setup.gather_axes) * setup.chunk
  return lax.dynamic_slice_in_dim(x_G, start, setup.chunk, axis=0)


def _local_targets(targets_G, setup):
  """Targets as column ids of this device's vocabulary slice; -1 (no column) outside it."""
  offset = lax.axis_index(setup.axes) * setup.vocab_local
  local_G = targets_G - offset
  in_slice_G = (local_G >= 0) & (local_G < setup.vocab_local)
  return jnp.where(in_slice_G, local_G, -1), in_slice_G


def _chunks(setup, rows):
  """[n, ...] arrays as [num_chunks, chunk, ...], zero-padded to whole chunks."""
  pad = setup.num_chunks * setup.chunk - rows[0].shape[0]
  return [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
      setup.num_chunks, setup.chunk, *x.shape[1:]) for x in rows]


def _unchunk(x_Cxc, n):
  return x_Cxc.reshape(-1, *x_Cxc.shape[2:])[:n]


def _local_forward(hidden_nxD, w_DxU, targets_n, *, setup):
  """(logprob, entropy, lse) [n] of this device's rows (inside the shard_map)."""
  def step(hidden_cxD, targets_c):
    targets_G, in_slice_G = _local_targets(_gather(targets_c, setup), setup)
    logprob_G, entropy_G, lse_G = setup.forward(_gather(hidden_cxD, setup), w_DxU, targets_G,
                                                setup.spec)
    max_G = lax.pmax(lse_G, setup.axes)
    scaled_G = jnp.exp(lse_G - max_G)
    sum_G = lax.psum(scaled_G, setup.axes)
    global_lse_G = max_G + jnp.log(sum_G)
    # Slice s holds probability mass exp(lse_s - lse); its entropy term is
    # -sum_k p_k log p_k = mass * (H_s + lse - lse_s).
    entropy_G = lax.psum(scaled_G / sum_G * (entropy_G + global_lse_G - lse_G), setup.axes)
    target_G = lax.psum(jnp.where(in_slice_G, logprob_G + lse_G, 0.0), setup.axes)
    return [_own_rows(x, setup) for x in (target_G - global_lse_G, entropy_G, global_lse_G)]

  outs = lax.map(lambda xs: step(*xs), _chunks(setup, [hidden_nxD, targets_n]))
  return tuple(_unchunk(x, hidden_nxD.shape[0]) for x in outs)


def _local_backward(hidden_nxD, w_DxU, targets_n, lse_n, entropy_n, g_logprob_n, g_entropy_n,
                    *, setup):
  """(d_hidden [n, D] of this device's rows, d_w_out [D, U] of its slice)."""
  reduce_axes = tuple(a for a in setup.axes if a not in setup.gather_axes)

  def step(hidden_cxD, targets_c, lse_c, entropy_c, g_logprob_c, g_entropy_c):
    gathered = [_gather(x, setup) for x in (hidden_cxD, lse_c, entropy_c, g_logprob_c,
                                              g_entropy_c)]
    hidden_GxD, lse_G, entropy_G, g_logprob_G, g_entropy_G = gathered
    targets_G, _ = _local_targets(_gather(targets_c, setup), setup)
    d_hidden_GxD, d_w_DxU = setup.backward(
        hidden_GxD, w_DxU, targets_G, lse_G, entropy_G, g_logprob_G,
        g_entropy_G if setup.spec.with_entropy_grad else None, setup.spec)
    # Each slice gave its columns' share of every gathered row's d_hidden: sum the shares and
    # send each row's sum to the device that owns it.
    d_hidden_GxD = d_hidden_GxD.astype(jnp.float32)
    if setup.gather_axes:
      d_hidden_GxD = lax.psum_scatter(d_hidden_GxD, setup.gather_axes, scatter_dimension=0,
                                      tiled=True)
    if reduce_axes:
      d_hidden_GxD = lax.psum(d_hidden_GxD, reduce_axes)
    return d_hidden_GxD, d_w_DxU

  # Devices along row axes that do not split the vocabulary hold other rows of the same slice:
  # their d_w_out shares add up.
  data_axes = tuple(a for a in setup.row_axes if a not in setup.axes)
  sum_rows = (lambda d_w_DxU: lax.psum(d_w_DxU, data_axes)) if data_axes else (lambda x: x)
  rows = (hidden_nxD, targets_n, lse_n, entropy_n, g_logprob_n, g_entropy_n)
  if setup.num_chunks == 1:
    d_hidden_nxD, d_w_DxU = step(*rows)
    return d_hidden_nxD, sum_rows(d_w_DxU)
  # Several chunks: d_w_out is summed over them in float32 (one [D, U] accumulator).
  def body(d_w_acc_DxU, xs):
    d_hidden_cxD, d_w_DxU = step(*xs)
    return d_w_acc_DxU + d_w_DxU.astype(jnp.float32), d_hidden_cxD

  d_w_DxU, d_hidden_CxcxD = lax.scan(body, jnp.zeros(w_DxU.shape, jnp.float32),
                                     _chunks(setup, rows))
  return _unchunk(d_hidden_CxcxD, hidden_nxD.shape[0]), sum_rows(d_w_DxU)


def _shard_map(fn, setup, in_kinds: str, out_kinds: str):
  """fn on each device's blocks; kinds, one letter an argument: "h" rows x D (split like the
  rows), "w" D x V (split along the vocabulary), "r" a row vector."""
  specs = {"h": P(setup.row_axes, None), "w": P(None, setup.axes), "r": P(setup.row_axes)}
  # check_vma off: the local walk may be a pallas_call, which carries no varying-axes types.
  return jax.shard_map(functools.partial(fn, setup=setup), mesh=setup.mesh,
                       in_specs=tuple(specs[k] for k in in_kinds),
                       out_specs=tuple(specs[k] for k in out_kinds), check_vma=False)


def _forward(hidden_NxD, w_out_DxV, targets_N, setup):
  return _shard_map(_local_forward, setup, "hwr", "rrr")(hidden_NxD, w_out_DxV, targets_N)


def _backward(hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N, g_logprob_N, g_entropy_N,
              setup):
  return _shard_map(_local_backward, setup, "hwrrrrr", "hw")(
      hidden_NxD, w_out_DxV, targets_N, lse_N, entropy_N, g_logprob_N, g_entropy_N)


# The custom VJP of the single-device walks, around the two shard_maps (`setup` as its spec).
_vocab_parallel = chunked.with_blockwise_vjp(_forward, _backward)


def _mesh_axes(mesh, names, what):
  names = (names,) if isinstance(names, str) else tuple(names or ())
  unknown = [a for a in names if a not in mesh.shape]
  if unknown:
    raise ValueError(f"{what}: {unknown[0]!r} is not an axis of the mesh "
                     f"({', '.join(mesh.shape)})")
  return names


def vocab_parallel_target_logprobs(hidden_NxD, w_out_DxV, targets_N, *, mesh=None,
                                   axes=("fsdp", "tensor"), row_axes=("data", "fsdp"),
                                   softcap=None, return_entropy=False, impl="auto",
                                   row_chunk=DEFAULT_ROW_CHUNK, block_v=None, block_n=None,
                                   interpret=None):
  """log softmax(softcap(hidden @ w_out))[n, targets[n]], the head split over the vocabulary.

  Args:
    hidden_NxD: final hidden states [N, D], split over `row_axes` along N.
    w_out_DxV: output projection [D, V], split over `axes` along V (V divisible by their size).
    targets_N: int token ids [N], each in [0, V).
    mesh: the device mesh (a Mesh or AbstractMesh); None for the one set by jax.set_mesh.
    axes: mesh axes the vocabulary is split over, major first.
    row_axes: mesh axes the rows are split over, major first (N is padded to their size).
    softcap, return_entropy: as in `target_logprobs`.
    impl: the local block walk: "auto" (Pallas on GPU/TPU, chunked on CPU), "chunked",
      "pallas", or "reference" / "dense" (the chunked walk in one block: the plain head per
      slice).
    row_chunk: the most rows gathered onto a device per step (bounds the gathered [rows, D]).
    block_v, block_n, interpret: the local walk's tiles and Pallas interpreter switch, as in
      `target_logprobs` (None for the defaults).

  Returns:
    float32 log-probs [N], and float32 entropies [N] when return_entropy; both split like the
    rows. Gradients flow to hidden and w_out (d_w_out split like w_out).
  """
  chunked.validate_inputs(hidden_NxD, w_out_DxV, targets_N, softcap)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  row_chunk = chunked.validate_block("row_chunk", row_chunk)
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes = _mesh_axes(mesh, axes, "axes")
  row_axes = _mesh_axes(mesh, row_axes, "row_axes")
  shards = math.prod(mesh.shape[a] for a in axes)
  rows, dim = hidden_NxD.shape
  vocab = w_out_DxV.shape[1]
  if vocab % shards:
    raise ValueError(f"the vocabulary ({vocab}) does not split into {shards} slices over the "
                     f"mesh axes {axes}")
  row_shards = math.prod(mesh.shape[a] for a in row_axes)
  rows_pad = -(-rows // row_shards) * row_shards
  gather_axes = tuple(a for a in row_axes if a in axes)
  gathered = math.prod(mesh.shape[a] for a in gather_axes)
  local_rows = rows_pad // row_shards
  chunk = min(local_rows, max(1, row_chunk // gathered))
  vocab_local = vocab // shards
  if impl == "auto":
    impl = "chunked" if jax.default_backend() == "cpu" else "pallas"
  softcap = None if softcap is None else float(softcap)
  if impl == "pallas":
    spec = pallas.pallas_spec(dim, vocab_local, softcap=softcap, return_entropy=return_entropy,
                              block_n=block_n, block_v=block_v, interpret=interpret)
    forward, backward = pallas.pallas_forward, pallas.pallas_backward
  else:
    walk_v = vocab_local if impl in ("reference", "dense") else chunked.validate_block(
        "block_v", chunked.DEFAULT_BLOCK_V if block_v is None else block_v)
    spec = chunked.ChunkSpec(softcap=softcap, with_entropy_grad=bool(return_entropy),
                             block_v=min(walk_v, vocab_local))
    forward, backward = chunked.chunked_forward, _chunked_backward
  setup = _Setup(mesh=mesh, axes=axes, row_axes=row_axes, gather_axes=gather_axes,
                 vocab_local=vocab_local, chunk=chunk, num_chunks=-(-local_rows // chunk),
                 forward=forward, backward=backward, spec=spec)
  dtype = chunked.common_dtype(hidden_NxD, w_out_DxV)
  hidden_NxD = jnp.pad(hidden_NxD.astype(dtype), ((0, rows_pad - rows), (0, 0)))
  # Padding rows target no column (-1): they add nothing to any gradient.
  targets_N = jnp.pad(targets_N.astype(jnp.int32), (0, rows_pad - rows), constant_values=-1)
  logprob_N, entropy_N = _vocab_parallel(hidden_NxD, w_out_DxV.astype(dtype), targets_N, setup)
  logprob_N, entropy_N = logprob_N[:rows], entropy_N[:rows]
  return (logprob_N, entropy_N) if return_entropy else logprob_N
