"""One path layer for every artifact: local folders and `gs://` buckets are the same code.

Everything the project writes or reads back from a workdir (stage artifacts, metrics, the prompt
buffer, exports, the report and its plots, checkpoints' folder) goes through these functions,
which sit on etils' `epath` (local paths via `os`, `gs://` via gcsfs / tf.io.gfile).

Atomicity: `atomic_write` never leaves a half-written file under the final name.
- local: write `name.tmp<pid>` in the same folder, fsync it, `os.replace` it onto the name,
  fsync the folder (so the rename itself survives a power loss);
- object stores (`gs://`): one upload; the object appears only once it is complete (GCS
  uploads are atomic), so no temp name is needed, and a rename would be a copy anyway.
On a failed write (disk full, permission) the temp file is removed and the previous file under
the name is untouched.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def path(p: PathLike) -> epath.Path:
  return p if isinstance(p, epath.Path) else epath.Path(p)


def is_local(p: PathLike) -> bool:
  return "://" not in os.fspath(p)


def join(p: PathLike, *parts: str) -> str:
  """A child path as a string (works for gs:// URLs, which os.path.join would not mangle
  either, but epath is the one rule)."""
  return os.fspath(path(p).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """Names in a folder (empty when it does not exist)."""
  folder = path(p)
  if not folder.exists():
    return []
  return sorted(child.name for child in folder.iterdir())


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def open_file(p: PathLike, mode: str = "r"):
  return path(p).open(mode)


def remove(p: PathLike) -> None:
  """Removes a file or a folder tree; missing is fine."""
  target = path(p)
  if not target.exists():
    return
  if target.is_dir():
    if is_local(target):
      shutil.rmtree(os.fspath(target))
    else:
      target.rmtree()
  else:
    target.unlink()


def _fsync_dir(folder: str) -> None:
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write(p: PathLike, data: Union[bytes, str]) -> None:
  """Writes `data` under `p` all or nothing (see the module docstring); creates the folder."""
  raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
  target = path(p)
  makedirs(target.parent)
  if not is_local(target):
    target.write_bytes(raw)
    return
  final = os.fspath(target)
  tmp = f"{final}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, final)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_dir(os.path.dirname(final) or ".")


def append_text(p: PathLike, text: str) -> None:
  """Appends to a log-like file (metrics.jsonl). Local: a plain append; object stores cannot
  append, so the object is rewritten whole (metrics files stay small)."""
  target = path(p)
  if is_local(target):
    makedirs(target.parent)
    with open(os.fspath(target), "a") as f:
      f.write(text)
    return
  old = target.read_text() if target.exists() else ""
  atomic_write(target, old + text)


def iter_lines(p: PathLike) -> Iterator[str]:
  with path(p).open("r") as f:
    yield from f
