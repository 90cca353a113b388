"""Host copies of (possibly multi-host) global arrays; imported by sharding and by models."""
from __future__ import annotations

import jax
import numpy as np


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array as one NumPy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
