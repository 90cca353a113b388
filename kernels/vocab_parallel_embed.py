"""Token-embedding lookup with the table split along the vocabulary over mesh axes.

A plain `jnp.take` on a vocabulary-split table is left to XLA's partitioner, which on large
meshes all-gathers the whole table for the lookup and, in the backward, scatter-adds into a
whole float32 table on every chip before reducing it (a 9B model's [256000, 3584] table: 3.4 GiB
a chip on v5e-64). Here each device only ever touches its own [V / S, D] slice:

- forward: the tokens of a chunk of rows are gathered from the devices that share the slice's
  rows; each device reads the rows whose token falls in its slice (zeros elsewhere), and the
  partial rows are summed over the slices and scattered back to the devices that own them (a
  reduce-scatter: exactly one slice holds each token, so the sum is exact in any dtype);
- backward: the rows' cotangents are gathered the same way and scatter-added into a float32
  [V / S, D] accumulator of the local slice; devices that hold other rows of the same slice
  (row axes that do not split the vocabulary) add their accumulators up.

The bytes moved per chunk are the gathered [rows, D] activations, never the table. Inside the
shard_map, n is a device's rows, G the rows gathered onto it, U = V / S its table rows.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

DEFAULT_ROW_CHUNK = 65536


@dataclasses.dataclass(frozen=True)
class _Setup:
  """Static settings of one call (as kernels/vocab_parallel.py's `_Setup`)."""
  mesh: object
  axes: tuple          # mesh axes the vocabulary is split over (major first)
  row_axes: tuple      # mesh axes the rows (the batch) are split over (major first)
  gather_axes: tuple   # row axes that also split the vocabulary: rows are gathered over them
  vocab_local: int
  chunk: int           # local rows per step
  out_dtype: object
  table_dtype: object


def _gather(x, setup):
  if not setup.gather_axes:
    return x
  return lax.all_gather(x, setup.gather_axes, axis=0, tiled=True)


def _local_ids(tokens_G, setup):
  """Tokens as row ids of this device's slice, and whether each falls in it."""
  local_G = tokens_G - lax.axis_index(setup.axes) * setup.vocab_local
  return local_G, (local_G >= 0) & (local_G < setup.vocab_local)


def _spans(n, setup):
  """(start, end) of each chunk of n rows; the last may be shorter."""
  return [(start, min(start + setup.chunk, n)) for start in range(0, n, setup.chunk)]


# The chunks are unrolled in the program rather than looped over, and the backward's chunks are
# chained through optimization barriers: each chunk's gather waits for the previous chunk's
# scatter. Compiled for TPU at 65536 gathered rows a chunk, GiB of program per chip: the v5e-32
# update (whose micro-batches are a loop already) 11.1 with a while loop over the chunks, 10.0
# unrolled, 10.8 unrolled and chained; the v5e-64 update 6.2 looped, 9.2 unrolled (it gathered
# every chunk's rows at once), 5.7 chained. Chaining the forward's chunks too gained nothing.


def _local_lookup(table_UxD, tokens_bxT, *, setup):
  b, t = tokens_bxT.shape
  reduce_axes = tuple(a for a in setup.axes if a not in setup.gather_axes)

  def step(tokens_c):
    local_G, in_slice_G = _local_ids(_gather(tokens_c, setup), setup)
    rows_GxD = jnp.take(table_UxD, jnp.where(in_slice_G, local_G, 0), axis=0)
    rows_GxD = jnp.where(in_slice_G[:, None], rows_GxD, 0).astype(setup.out_dtype)
    if setup.gather_axes:
      rows_GxD = lax.psum_scatter(rows_GxD, setup.gather_axes, scatter_dimension=0, tiled=True)
    return lax.psum(rows_GxD, reduce_axes) if reduce_axes else rows_GxD

  tokens_n = tokens_bxT.reshape(b * t)
  rows_nxD = jnp.concatenate([step(tokens_n[start:end])
                              for start, end in _spans(b * t, setup)])
  return rows_nxD.reshape(b, t, -1)


def _local_lookup_grad(tokens_bxT, g_bxTxD, *, setup):
  b, t, d = g_bxTxD.shape
  tokens_n, g_nxD = tokens_bxT.reshape(b * t), g_bxTxD.reshape(b * t, d)
  acc_UxD = jnp.zeros((setup.vocab_local, d), jnp.float32)
  for start, end in _spans(b * t, setup):
    tokens_c, g_cxD = tokens_n[start:end], g_nxD[start:end]
    if start:   # one chunk at a time (see above)
      tokens_c, g_cxD, acc_UxD = lax.optimization_barrier((tokens_c, g_cxD, acc_UxD))
    local_G, in_slice_G = _local_ids(_gather(tokens_c, setup), setup)
    g_GxD = _gather(g_cxD, setup).astype(jnp.float32)
    # Rows of other slices go to index U, which mode="drop" discards.
    index_G = jnp.where(in_slice_G, local_G, setup.vocab_local)
    acc_UxD = acc_UxD.at[index_G].add(g_GxD, mode="drop")
  data_axes = tuple(a for a in setup.row_axes if a not in setup.axes)
  return lax.psum(acc_UxD, data_axes) if data_axes else acc_UxD


def _shard_map(fn, setup, in_specs, out_specs):
  return jax.shard_map(functools.partial(fn, setup=setup), mesh=setup.mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lookup(table_VxD, tokens_BxT, setup):
  return _shard_map(_local_lookup, setup, (P(setup.axes, None), P(setup.row_axes, None)),
                    P(setup.row_axes, None, None))(table_VxD, tokens_BxT)


def _lookup_fwd(table_VxD, tokens_BxT, setup):
  return _lookup(table_VxD, tokens_BxT, setup), tokens_BxT


def _lookup_bwd(setup, tokens_BxT, g_BxTxD):
  d_table_VxD = _shard_map(_local_lookup_grad, setup,
                           (P(setup.row_axes, None), P(setup.row_axes, None, None)),
                           P(setup.axes, None))(tokens_BxT, g_BxTxD)
  return d_table_VxD.astype(setup.table_dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def vocab_parallel_embed(table_VxD, tokens_BxT, *, mesh=None, axes=("fsdp", "tensor"),
                         row_axes=("data", "fsdp"), out_dtype=None,
                         row_chunk=DEFAULT_ROW_CHUNK):
  """table[tokens] with the table split over `axes` along V: [B, T, D] in `out_dtype`.

  Args:
    table_VxD: the embedding table [V, D], split over `axes` along V (V divisible by their size).
    tokens_BxT: int token ids [B, T], each in [0, V), split over `row_axes` along B (B divisible
      by their size).
    mesh: the device mesh (a Mesh or AbstractMesh); None for the one set by jax.set_mesh.
    out_dtype: the dtype of the looked-up rows (and of what is moved between devices); None for
      the table's. The table's gradient is accumulated in float32 and returned in its dtype.
    row_chunk: the most rows gathered onto a device per step (bounds the gathered [rows, D]),
      unless the table slice has more rows: a step may gather as many rows as the [V / S, D]
      slice (whose float32 gradient the backward holds anyway) has.

  Returns:
    [B, T, D] split like the tokens along B. Gradients flow to the table (split like it).
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes, row_axes = tuple(axes), tuple(row_axes)
  for name in axes + row_axes:
    if name not in mesh.shape:
      raise ValueError(f"vocab_parallel_embed: {name!r} is not an axis of the mesh "
                       f"({', '.join(mesh.shape)})")
  vocab, shards = table_VxD.shape[0], math.prod(mesh.shape[a] for a in axes)
  batch, row_shards = tokens_BxT.shape[0], math.prod(mesh.shape[a] for a in row_axes)
  if vocab % shards:
    raise ValueError(f"vocab_parallel_embed: the vocabulary ({vocab}) does not split into "
                     f"{shards} slices over the mesh axes {axes}")
  if batch % row_shards:
    raise ValueError(f"vocab_parallel_embed: the batch ({batch}) does not split over the "
                     f"{row_shards} devices of the mesh axes {row_axes}")
  if row_chunk < 1:
    raise ValueError(f"vocab_parallel_embed: row_chunk must be >= 1, got {row_chunk}")
  gather_axes = tuple(a for a in row_axes if a in axes)
  gathered = math.prod(mesh.shape[a] for a in gather_axes)
  local_rows = batch // row_shards * tokens_BxT.shape[1]
  vocab_local = vocab // shards
  chunk = max(1, min(local_rows, max(row_chunk, vocab_local) // gathered))
  setup = _Setup(mesh=mesh, axes=axes, row_axes=row_axes, gather_axes=gather_axes,
                 vocab_local=vocab_local, chunk=chunk,
                 out_dtype=jnp.dtype(out_dtype or table_VxD.dtype),
                 table_dtype=jnp.dtype(table_VxD.dtype))
  return _lookup(table_VxD, tokens_BxT.astype(jnp.int32), setup)
