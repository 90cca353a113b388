"""Reading a run's Orbax checkpoints back in tests, local or gs://, whatever topology wrote them."""
import jax
import numpy as np
import orbax.checkpoint as ocp

from eva_jax import fileio


def checkpoint_arrays(workdir, step=None):
  """(step, leaves) of checkpoint `step` (default: the last), restored onto one device without
  a target tree."""
  folder = fileio.absolute(workdir) / "checkpoints"
  steps = sorted(int(s) for s in fileio.listdir(folder) if s.isdigit())
  step = steps[-1] if step is None else step
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(folder / str(step) / "default")
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          meta, is_leaf=lambda m: hasattr(m, "shape"))
    restored = ckpt.restore(folder / str(step) / "default", target)
  return step, [np.asarray(x) for x in jax.tree.leaves(restored)]
