"""The workdir: atomic artifacts, metrics (JSONL + TensorBoard), Orbax checkpoints, config lock.

Layout:
  config.json                 the resolved config the run was started with
  metrics.jsonl, tb/          one JSON object per logged step or stage; TensorBoard events
  iter_000/<stage>.*          each stage's artifacts, written to a temp name and renamed
  checkpoints/<iteration>/    Orbax checkpoints of the train state (0 = after the warm-start)
  report.md, plots/*.png      rewritten at the end of every iteration

Only process 0 writes shared files; every process reads them.
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


def is_writer() -> bool:
  return jax.process_index() == 0


_KILL_COUNTS: dict[str, int] = {}


def kill_point(name: str) -> None:
  """Fault injection for the resume tests: EVA_TEST_KILL_AT=name[:n] SIGKILLs this process the
  n-th time (default 1st) it passes the point `name`. A no-op unless that variable is set."""
  spec = os.environ.get("EVA_TEST_KILL_AT")
  if not spec:
    return
  target, _, count = spec.partition(":")
  if target != name:
    return
  _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
  if _KILL_COUNTS[name] == int(count or 1):
    os.kill(os.getpid(), signal.SIGKILL)


def _atomic(path: str, write) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  write(tmp)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  if not is_writer():
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)

  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
  _atomic(path, write)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def write_npz(path: str, **arrays) -> None:
  if not is_writer():
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)

  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
  _atomic(path, write)


def read_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def check_writable(workdir: str) -> None:
  """Fails early, before any compute, when the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable: {e.strerror}") from None


class Metrics:
  """Appends JSON lines to metrics.jsonl and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if is_writer():
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)

  def log(self, kind: str, step: int, **values) -> None:
    if not is_writer():
      return
    row = {"kind": kind, "step": int(step), "time": time.time()}
    row.update({k: _json_default(v) if isinstance(v, (np.generic, np.ndarray)) else v
                for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row, default=_json_default) + "\n")
    for k, v in values.items():
      if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v):
        self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))

  def read(self, kind: Optional[str] = None) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Checkpoints:
  """Orbax checkpoints of the train state, one per finished iteration, keep-N policy.

  Orbax writes into a temporary folder and renames it when complete, so a kill mid-write
  leaves the previous checkpoints intact and the partial one ignored.
  """

  def __init__(self, workdir: str, *, keep: int = 2, use_async: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=use_async)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         options=options)

  def latest(self) -> Optional[int]:
    return self.manager.latest_step()

  def has(self, step: int) -> bool:
    return step in self.manager.all_steps()

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))
    kill_point("checkpoint_write")  # With async saving, the write is still in flight here.
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
