"""One path layer for every artifact: local folders and `gs://` buckets are the same code.

Everything the project writes or reads back from a workdir (stage artifacts, metrics, the prompt
buffer, exports, the report and its plots, checkpoints' folder) goes through these functions,
which sit on etils' `epath` (local paths via `os`; `gs://` via tf.io.gfile when TensorFlow is
installed, else fsspec's gcsfs, which honours STORAGE_EMULATOR_HOST).

Atomicity: `atomic_write` and `atomic_writer` never leave a half-written file under the final
name.
- local: write `name.tmp<pid>` in the same folder, fsync it, `os.replace` it onto the name,
  fsync the folder (so the rename itself survives a power loss);
- object stores (`gs://`): one upload; the object appears only once it is complete (GCS
  uploads are atomic), so no temp name is needed, and a rename would be a copy anyway.
On a failed write (disk full, permission) the temp file is removed and the previous file under
the name is untouched. The fault tests make such a failure on purpose: EVA_TEST_FAIL_WRITE_AT=
name[:n] fails the n-th (default 1st) write of a file called `name` with ENOSPC, half-way
through its bytes.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import signal
from typing import BinaryIO, Iterator, Union

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


def absolute(p: PathLike) -> epath.Path:
  """Local paths made absolute (Orbax wants that); URLs are absolute already."""
  return path(os.path.abspath(os.fspath(p))) if is_local(p) else path(p)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def makedirs(p: PathLike) -> None:
  """Creates a local folder and its parents. A no-op on object stores: they have no folders,
  and gcsfs would otherwise create a missing *bucket* from a mistyped workdir."""
  if is_local(p):
    os.makedirs(os.fspath(p), exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """Names in a folder (empty when it does not exist)."""
  folder = path(p)
  if not folder.exists():
    return []
  return sorted(child.name for child in folder.iterdir())


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return read_bytes(p).decode("utf-8")


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


_FAULT_COUNTS: dict[tuple[str, str], int] = {}


def _fault_due(variable: str, name: str) -> bool:
  """True the n-th time (default 1st) point `name` is passed while variable=name[:n] is set."""
  spec = os.environ.get(variable)
  if not spec or spec.partition(":")[0] != name:
    return False
  _FAULT_COUNTS[variable, name] = _FAULT_COUNTS.get((variable, name), 0) + 1
  return _FAULT_COUNTS[variable, name] == int(spec.partition(":")[2] or 1)


def kill_point(name: str) -> None:
  """Fault injection for the resume tests: EVA_TEST_KILL_AT=name[:n] SIGKILLs this process the
  n-th time (default 1st) it passes the point `name`. A no-op unless that variable is set.
  Every atomic write passes "<file name>.write" before its first byte and "<file name>.written"
  once the file is in place."""
  if _fault_due("EVA_TEST_KILL_AT", name):
    os.kill(os.getpid(), signal.SIGKILL)


def _disk_full(final: str) -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), final)


@contextlib.contextmanager
def atomic_writer(p: PathLike) -> Iterator[BinaryIO]:
  """A binary file whose bytes appear under `p` all at once when the block exits cleanly, and
  never when it raises (see the module docstring); creates the folder. Local files stream to the
  temp name (a large safetensors shard needs no second copy in memory); object-store files are
  held in memory and uploaded once at the end."""
  target = path(p)
  final = os.fspath(target)
  name = os.path.basename(final)
  kill_point(f"{name}.write")
  fail = _fault_due("EVA_TEST_FAIL_WRITE_AT", name)
  if not is_local(target):
    buf = io.BytesIO()
    yield buf
    if fail:
      raise _disk_full(final)
    target.write_bytes(buf.getvalue())
    kill_point(f"{name}.written")
    return
  makedirs(target.parent)
  tmp = f"{final}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      yield f
      if fail:  # As a full disk would: half the bytes are in the temp file when it fails.
        f.truncate(f.tell() // 2)
        raise _disk_full(final)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, final)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_dir(os.path.dirname(final) or ".")
  kill_point(f"{name}.written")


def atomic_write(p: PathLike, data: Union[bytes, str]) -> None:
  """Writes `data` (str as UTF-8) under `p` all or nothing; creates the folder."""
  with atomic_writer(p) as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)


def append_text(p: PathLike, text: str) -> None:
  """Appends to a log-like file. Local: a plain append; object stores cannot append, so the
  object is read and rewritten whole (callers that append often batch their text first)."""
  target = path(p)
  if is_local(target):
    makedirs(target.parent)
    with open(os.fspath(target), "a", encoding="utf-8") as f:
      f.write(text)
    return
  old = read_text(target) if target.exists() else ""
  atomic_write(target, old + text)


def iter_lines(p: PathLike) -> Iterator[str]:
  """The lines of a UTF-8 text file, each with its "\\n" (split on "\\n" only, as a file
  object would, so a U+2028 inside a JSON string does not split a line)."""
  yield from io.StringIO(read_text(p), newline="\n")
