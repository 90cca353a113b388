"""Every placement decision: the mesh, the logical-axis rules, and shardings derived from them.

Modules only name logical axes (`embed`, `mlp`, `heads`, `act_batch`, ...); this file maps them
onto the mesh axes (`data`, `fsdp`, `tensor`). A mesh axis that does not divide an array
dimension is dropped for that array (the dimension is replicated), so tiny test models and odd
head counts shard without special cases. Placement points one way: this file imports the models
(to read their logical specs); the models never import it.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_jax import models
from eva_jax.host import to_host  # noqa: F401  (re-exported: callers gather through sharding)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes). Parameters are sharded over fsdp along `embed` and over tensor along
# heads / mlp (Megatron-style); activations are sharded over data+fsdp along the batch. The
# vocabulary is split over fsdp and tensor together, so that no device ever holds the whole LM
# head: the log-probs run vocabulary-parallel (kernels/vocab_parallel.py) and the untied head's
# D axis (`embed_head`) stays whole (the embedding's `embed` finds fsdp taken by `vocab`).
DEFAULT_RULES: tuple[tuple[str, Optional[object]], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", ("fsdp", "tensor")),
    ("layers", None),
    ("vocab", ("fsdp", "tensor")),
    ("embed", "fsdp"),
    ("embed_head", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


def rules_from_config(overrides=None) -> tuple[tuple[str, Optional[object]], ...]:
  """DEFAULT_RULES with some logical names mapped elsewhere.

  overrides: a mapping {logical name: mesh axes} (e.g. the config section `c.mesh.rules`), or
  None for the defaults. Mesh axes are None, a sequence of axis names, or a string of them
  joined by commas, "" for none (the config's form, so that `--config.mesh.rules.embed=tensor`
  or `=data,fsdp` works from the command line). Unknown names and axes are refused.
  """
  rules = dict(DEFAULT_RULES)
  items = overrides.items() if overrides is not None else ()
  for name, axes in items:
    if name not in rules:
      raise ValueError(f"sharding rules: unknown logical axis {name!r} (known: "
                       f"{', '.join(rules)})")
    if isinstance(axes, str):
      axes = [a.strip() for a in axes.split(",") if a.strip()]
    flat = () if axes is None else tuple(axes)
    unknown = [a for a in flat if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"sharding rules: {name!r} maps to unknown mesh axis {unknown[0]!r} "
                       f"(mesh axes: {', '.join(MESH_AXES)})")
    rules[name] = None if not flat else flat[0] if len(flat) == 1 else flat
  return tuple(rules.items())


def decode_rules(rules=DEFAULT_RULES) -> tuple[tuple[str, Optional[object]], ...]:
  """`rules` for the sampler's `decode_mesh`: weights whole along the model width (`embed` on
  no mesh axis), so every chip keeps its tensor-parallel share of each weight resident."""
  return tuple((name, None if name == "embed" else axes) for name, axes in rules)


DECODE_RULES = decode_rules()


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 for "the rest of the devices"."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices do not divide into {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh: {sizes} needs {math.prod(sizes)} devices, have {len(devices)}")
  # mesh_utils orders devices so that `tensor` (the chattiest axis) stays on the fastest links.
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # Fake CPU devices and odd shapes have no topology to exploit.
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def decode_mesh(mesh: Mesh, config) -> Mesh:
  """The sampler's mesh on `mesh`'s devices: `tensor` the most devices that divide the model's
  KV heads, query heads, MLP width and vocabulary; `data` the rest; no fsdp.

  A decode step reads every weight for a few rows. FSDP would all-gather each layer's weights at
  every step; tensor parallel (with `decode_rules`) each chip reads its resident share in place,
  and the KV cache splits over KV heads as well as prompts."""
  n = mesh.devices.size
  dims = (config.num_kv_heads, config.num_heads, config.intermediate_size, config.vocab_size)
  t = max(d for d in range(1, n + 1) if n % d == 0 and all(x % d == 0 for x in dims))
  return make_mesh(data=n // t, fsdp=1, tensor=t, devices=list(mesh.devices.flat))


def tpu_topology_devices(topology: str) -> list:
  """The devices of a TPU slice, e.g. "v5e:2x2", for ahead-of-time compiles on any machine.

  Needs the `libtpu` package (the `tpu` extra) and touches no TPU: programs lowered with
  abstract inputs placed on these devices compile with the TPU compiler itself. Lower them under
  `jax.set_mesh` of a mesh of these devices: Pallas reads the TPU generation from it.
  """
  from jax.experimental import topologies
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # No cloud metadata lookups.
  # libtpu takes a machine-wide lock for the TPU chips; a compile-only load needs none, and two
  # processes compiling at once (xdist workers, a memory plan) would otherwise refuse each other.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_sharding(shape: Sequence[int], logical: Sequence[Optional[str]], mesh: Mesh,
                        rules=DEFAULT_RULES) -> NamedSharding:
  """NamedSharding for an array of `shape` whose axes carry logical names."""
  mesh_axes = nn.logical_to_mesh_axes(tuple(logical), rules)
  spec, used = [], set()
  for dim, axes in zip(shape, mesh_axes):
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    # A mesh axis used once per array, and only where it divides the dimension.
    flat = tuple(a for a in flat if a not in used)
    if not flat or dim % _axis_size(mesh, flat):
      spec.append(None)
      continue
    used.update(flat)
    spec.append(flat[0] if len(flat) == 1 else flat)
  return NamedSharding(mesh, P(*spec))


def tree_shardings(shapes, logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
  """Shardings for a pytree of arrays/ShapeDtypeStructs given a pytree of logical specs."""
  return jax.tree.map(
      lambda spec, x: logical_to_sharding(x.shape, tuple(spec), mesh, rules), logical_specs,
      shapes, is_leaf=lambda s: isinstance(s, P))


def param_shardings(config, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for the params of a ModelConfig (computed without allocating weights)."""
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  return tree_shardings(shapes, models.param_logical_specs(config), mesh, rules)


def param_shardings_for(mesh: Optional[Mesh], rules=DEFAULT_RULES):
  """config -> param_shardings(config, mesh, rules): what `hf.load(path, shardings=...)` takes
  to place every tensor as it is read. None without a mesh (nothing to place)."""
  if mesh is None:
    return None
  return lambda config: param_shardings(config, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over data+fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_multiple(mesh: Mesh) -> int:
  """Batch sizes must be a multiple of this to shard over data+fsdp."""
  return _axis_size(mesh, BATCH_AXES)


def put_global(x, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds in full, as a global array with `sharding`; each
  device receives only its slice (works across processes, unlike a plain device_put)."""
  if isinstance(x, jax.Array):
    return jax.device_put(x, sharding) if x.is_fully_addressable else x
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_batch(tree, mesh: Mesh):
  """Places host arrays with their leading axis over data+fsdp."""
  return jax.tree.map(lambda x: put_global(x, batch_sharding(mesh, np.ndim(x))), tree)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=DEFAULT_RULES):
  """Context under which the models' logical activation constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def vocab_parallel_axes(vocab_size: int):
  """(vocabulary axes, row axes) of the mesh and rules in effect (`activation_rules`) when the
  LM head splits over more than one device along its vocabulary (`act_vocab`, rows along
  `act_batch`), for kernels.vocab_parallel_target_logprobs; None without such a split."""
  return models.vocab_split(vocab_size, "act_vocab")


def optimizer_state_shardings(opt_state_shapes, params_shapes, param_shardings, mesh: Mesh):
  """Shardings for an optax state: every sub-tree shaped like the params (Adam's mu and nu,
  RMSprop's nu, ...) is placed like the params; the rest (step counts) is replicated."""
  params_def = jax.tree.structure(params_shapes)
  param_shapes = [x.shape for x in jax.tree.leaves(params_shapes)]

  def like_params(node) -> bool:
    return (jax.tree.structure(node) == params_def
            and [x.shape for x in jax.tree.leaves(node)] == param_shapes)

  return jax.tree.map(
      lambda node: param_shardings if like_params(node) else replicated(mesh),
      opt_state_shapes, is_leaf=like_params)

