"""The workdir: atomic artifacts, metrics (JSONL + TensorBoard), Orbax checkpoints, config lock.

Layout:
  config.json                 the resolved config the run was started with
  metrics.jsonl, tb/          one JSON object per logged step or stage; TensorBoard events
  iter_000/<stage>.*          each stage's artifacts, written atomically (fileio.atomic_write)
  checkpoints/<iteration>/    Orbax checkpoints of the train state (0 = after the warm-start)
  report.md, plots/*.png      rewritten at the end of every iteration

The workdir is a local folder or a gs:// prefix: every file goes through `fileio`.
Only process 0 writes shared files; every process reads them.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
import zipfile
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from eva_jax import fileio
from eva_jax.buffer import PromptBuffer

log = logging.getLogger(__name__)


def is_writer() -> bool:
  return jax.process_index() == 0


# Fault injection for the resume tests lives with the writes it interrupts (fileio); the stages
# call it as wd.kill_point.
kill_point = fileio.kill_point


class CorruptArtifact(ValueError):
  """An artifact that exists but cannot be read back (zero bytes, truncated, garbage). The
  runner may treat it as missing and recompute the stage that wrote it."""

  def __init__(self, path: fileio.PathLike, reason: str):
    super().__init__(f"corrupt artifact {os.fspath(path)}: {reason}")
    self.path = os.fspath(path)
    self.reason = reason


def write_json(path: str, obj: Any) -> None:
  if not is_writer():
    return
  fileio.atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default))


def read_json(path: str) -> Any:
  """The JSON under `path`; FileNotFoundError when missing, CorruptArtifact when unreadable."""
  raw = fileio.read_bytes(path)
  if not raw:
    raise CorruptArtifact(path, "empty file (0 bytes)")
  try:
    return json.loads(raw.decode("utf-8"))
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are.
    raise CorruptArtifact(path, f"not valid JSON ({e})") from None


def write_npz(path: str, **arrays) -> None:
  if not is_writer():
    return
  with fileio.atomic_writer(path) as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays under `path`; FileNotFoundError when missing, CorruptArtifact when unreadable."""
  raw = fileio.read_bytes(path)
  if not raw:
    raise CorruptArtifact(path, "empty file (0 bytes)")
  if not raw.startswith(b"PK"):  # np.load would take anything else for a .npy or a pickle.
    raise CorruptArtifact(path, f"not an .npz (zip) archive: starts with {raw[:8]!r}")
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as data:
      # Reading every member here checks each one's CRC, so truncation shows now, not later.
      return {k: data[k] for k in data.files}
  except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
    raise CorruptArtifact(path, f"not a readable .npz archive ({type(e).__name__}: {e})") from None


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def check_writable(workdir: str) -> None:
  """Fails early, before any compute, when the workdir (a folder or a gs:// prefix) cannot be
  written."""
  try:
    fileio.makedirs(workdir)
    probe = fileio.join(workdir, f".write_probe{os.getpid()}")
    fileio.atomic_write(probe, "ok")
    fileio.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {os.fspath(workdir)!r} is not writable: "
                          f"{e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# The stage-artifact cache: the runner's stages read their artifact when it exists.


def read_cached(path: str, read):
  """The artifact under `path`, or None when it is missing or corrupt (zero bytes, truncated):
  stage artifacts are a cache of deterministic stages, so a corrupt one is recomputed, with a
  warning naming it, and rewritten with the same bytes."""
  if not fileio.exists(path):
    return None
  try:
    return read(path)
  except CorruptArtifact as e:
    log.warning("%s; recomputing it", e)
    return None


def _cached_artifact(path: str, read, write, compute):
  value = read_cached(path, read)
  if value is not None:
    return value
  try:
    value = compute()
  except CorruptArtifact as e:
    if fileio.exists(path):  # The recompute needed something that is gone: name what failed.
      raise CorruptArtifact(path, f"unreadable, and recomputing it failed: {e}") from e
    raise
  write(path, value)
  return value


def cached_json(path: str, compute):
  return _cached_artifact(path, read_json, write_json, compute)


def cached_npz(path: str, compute) -> dict:
  return _cached_artifact(path, read_npz, lambda p, v: write_npz(p, **v), compute)


def load_buffer(path: str) -> PromptBuffer:
  """The prompt buffer an iteration hands on. It cannot be recomputed once its iteration's
  checkpoint is pruned, so an unreadable one stops the run with one error naming it."""
  try:
    if not fileio.read_bytes(path):
      raise ValueError("empty file (0 bytes)")
    return PromptBuffer.load(path)
  except ValueError as e:
    raise CorruptArtifact(path, str(e)) from None


class _ObjectStoreEventFile:
  """A TensorBoard event file on an object store, for tensorboardX's record-writer registry: it
  keeps the file in memory and uploads it whole (fileio.atomic_write) on each flush, which is
  cheap for scalars. It replaces tensorboardX's own gs:// writer, which goes around fileio
  through google-cloud-storage and re-uploads again from `__del__`, stalling interpreter exit
  for minutes of retries when the store has gone."""

  def __init__(self, path: str):
    self._path = path
    self._data = bytearray()
    self._dirty = False

  def write(self, data: bytes) -> None:
    self._data += data
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      fileio.atomic_write(self._path, bytes(self._data))
      self._dirty = False

  def close(self) -> None:
    self.flush()


class _ObjectStoreEventFiles:
  def open(self, path: str) -> _ObjectStoreEventFile:
    return _ObjectStoreEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # Object stores have no folders to create.


class Metrics:
  """Appends JSON lines to metrics.jsonl and scalars to TensorBoard (process 0 only).

  Local workdirs get each row appended as it is logged. Object stores cannot append and a
  rewrite per row would upload O(rows^2) bytes, so there the rows wait in memory and the whole
  object is rewritten at most every `flush_secs` and on `read`/`flush`/`close`: a killed run
  loses at most that window's rows (its resume re-logs from the last checkpoint).

  TensorBoard events go straight to the workdir, gs:// included, through `fileio` (see
  `_ObjectStoreEventFile`); writing them locally and copying later would lose them on a kill.
  """

  def __init__(self, workdir: str, *, flush_secs: float = 10.0):
    self.path = fileio.join(workdir, "metrics.jsonl")
    self._tb = None
    self._local = fileio.is_local(workdir)
    self._flush_secs = flush_secs
    self._pending: list[str] = []
    self._last_flush = time.monotonic()
    if is_writer():
      from tensorboardX import SummaryWriter, record_writer
      record_writer.register_writer_factory("gs", _ObjectStoreEventFiles())
      # Event files are named by the second they were opened in: the suffix keeps a writer
      # opened in the same second (a quick resume) from truncating its predecessor's file.
      self._tb = SummaryWriter(fileio.join(workdir, "tb"), flush_secs=int(flush_secs),
                               filename_suffix=f".{uuid.uuid4().hex[:8]}")

  def log(self, kind: str, step: int, **values) -> None:
    if not is_writer():
      return
    row = {"kind": kind, "step": int(step), "time": time.time()}
    row.update({k: _json_default(v) if isinstance(v, (np.generic, np.ndarray)) else v
                for k, v in values.items()})
    self._pending.append(json.dumps(row, default=_json_default) + "\n")
    if self._local or time.monotonic() - self._last_flush >= self._flush_secs:
      self.flush()
    for k, v in values.items():
      if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v):
        self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))

  def flush(self) -> None:
    """Writes the rows logged since the last flush."""
    if self._pending:
      fileio.append_text(self.path, "".join(self._pending))
      self._pending = []
    self._last_flush = time.monotonic()

  def read(self, kind: Optional[str] = None) -> list[dict]:
    self.flush()
    if not fileio.exists(self.path):
      return []
    rows = [json.loads(line) for line in fileio.iter_lines(self.path) if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()


class Checkpoints:
  """Orbax checkpoints of the train state, one per finished iteration, keep-N policy.

  Orbax writes into a temporary folder and renames it when complete (on gs://, where a rename
  is a copy, it writes a commit_success.txt last instead), so a kill mid-write leaves the
  previous checkpoints intact and the partial one ignored. keep-N is ours rather than Orbax's
  (which prunes only when it saves): old steps go only after the new one is committed, and a
  start first finishes a pruning that a killed run left undone, so a kill while deleting leaves
  the same checkpoints as an uninterrupted run. A committed step that cannot be read back is
  refused with one error naming its folder (CorruptArtifact).
  """

  def __init__(self, workdir: str, *, keep: int = 2, use_async: bool = False,
               read_only: bool = False):
    # cleanup_tmp_directories: a step a killed run left half-written (a temp folder locally, a
    # folder without commit_success.txt on gs://) is removed at start, then written again.
    # read_only (a reader beside a live run, e.g. eva_jax.answer; it must not call save): no
    # cleanup, no pruning, no folder created, so the run's step in flight is left alone.
    # (Orbax's own read_only option warns on every start.)
    options = ocp.CheckpointManagerOptions(create=not read_only,
                                           enable_async_checkpointing=use_async,
                                           cleanup_tmp_directories=not read_only)
    # An epath, not a string: Orbax then writes gs:// workdirs (array data through
    # TensorStore's gcs driver) as well as local ones.
    self.directory = fileio.absolute(workdir) / "checkpoints"
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._keep = keep
    if not read_only:
      self._prune()

  def latest(self) -> Optional[int]:
    return self.manager.latest_step()

  def has(self, step: int) -> bool:
    return step in self.manager.all_steps()

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))
    kill_point("checkpoint_write")  # With async saving, the write is still in flight here.
    self.manager.wait_until_finished()
    self._prune()

  def _prune(self) -> None:
    for step in sorted(self.manager.all_steps())[:-self._keep]:
      kill_point("checkpoint_delete")  # The new step is committed, the old one still there.
      self.manager.delete(step)

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # Orbax reports a TensorStore read error as a bare Exception.
      first_line = str(e).splitlines()[0][:300] if str(e) else ""
      raise CorruptArtifact(self.directory / str(step), f"checkpoint cannot be restored "
                            f"({type(e).__name__}: {first_line})") from e

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
