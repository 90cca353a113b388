"""Local workdir I/O: atomic writes that survive a failed write, clear errors for corrupt
artifacts, metrics and the writability check."""
import errno
import io
import json
import os

import numpy as np
import pytest

from eva_jax import fileio
from eva_jax import workdir as wd


class _DiskFullFile:
  """A file whose disk fills after `room` bytes: it writes those, then raises ENOSPC."""

  def __init__(self, path, mode, room):
    self._f = open(path, mode)
    self._room = room

  def write(self, data):
    self._f.write(data[:self._room])
    if len(data) > self._room:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    self._room -= len(data)
    return len(data)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def test_disk_full_mid_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
  path = tmp_path / "iter_000" / "pairs.json"
  wd.write_json(str(path), {"old": list(range(100))})
  before = path.read_bytes()
  monkeypatch.setattr(fileio, "open", lambda p, mode: _DiskFullFile(p, mode, room=10),
                      raising=False)
  with pytest.raises(OSError) as info:
    wd.write_json(str(path), {"new": list(range(1000))})
  assert info.value.errno == errno.ENOSPC
  assert path.read_bytes() == before
  assert os.listdir(path.parent) == ["pairs.json"]


def test_failed_fsync_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
  # Delayed allocation often reports a full disk only when the data is forced out.
  path = tmp_path / "a.npz"
  wd.write_npz(str(path), x=np.arange(3))

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match="No space left"):
    wd.write_npz(str(path), x=np.arange(5))
  monkeypatch.undo()
  np.testing.assert_array_equal(wd.read_npz(str(path))["x"], np.arange(3))
  assert os.listdir(tmp_path) == ["a.npz"]


def test_atomic_writer_that_raises_publishes_nothing(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"old")
  with pytest.raises(RuntimeError, match="stop"):
    with fileio.atomic_writer(str(path)) as f:
      f.write(b"half of a shard")
      raise RuntimeError("stop")
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["model.safetensors"]


def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
  synced = []
  real_fsync = os.fsync

  def recording_fsync(fd):
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", recording_fsync)
  path = tmp_path / "sub" / "f.txt"
  fileio.atomic_write(str(path), "héllo")
  assert path.read_text(encoding="utf-8") == "héllo"
  assert len(synced) == 2
  assert synced[0].startswith(str(path) + ".tmp")  # The data, under its temp name...
  assert synced[1] == str(path.parent)  # ...then the folder that holds the rename.


def test_unserialisable_json_leaves_nothing_behind(tmp_path):
  path = tmp_path / "x.json"
  wd.write_json(str(path), [1])
  with pytest.raises(TypeError, match="not JSON serialisable: object"):
    wd.write_json(str(path), [object()])
  assert json.loads(path.read_text()) == [1]
  assert os.listdir(tmp_path) == ["x.json"]


@pytest.mark.parametrize("content,reason", [
    (b"", r"empty file \(0 bytes\)"),
    (b'{"a": [1, 2', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_corrupt_json_is_one_clear_error(tmp_path, content, reason):
  path = tmp_path / "iter_000" / "pairs.json"
  path.parent.mkdir()
  path.write_bytes(content)
  with pytest.raises(wd.CorruptArtifact, match=f"corrupt artifact {path}: {reason}") as info:
    wd.read_json(str(path))
  assert info.value.path == str(path)
  assert isinstance(info.value, ValueError)


def _npz_bytes(**arrays):
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _corruptions():
  good = _npz_bytes(rewards=np.linspace(0, 1, 200), ids=np.arange(50))
  flipped = bytearray(good)
  flipped[200] ^= 0xFF  # Inside the first member's data: its CRC no longer matches.
  npy = io.BytesIO()
  np.save(npy, np.arange(3))
  return {"zero bytes": b"", "header only": good[:30], "half": good[:len(good) // 2],
          "central directory cut": good[:-10], "bit flip": bytes(flipped),
          "garbage": b"not an archive at all", "a .npy, not an .npz": npy.getvalue()}


@pytest.mark.parametrize("name", sorted(_corruptions()))
def test_corrupt_npz_is_one_clear_error(tmp_path, name):
  path = tmp_path / "rewards.npz"
  path.write_bytes(_corruptions()[name])
  with pytest.raises(wd.CorruptArtifact, match=f"corrupt artifact {path}: ") as info:
    wd.read_npz(str(path))
  assert info.value.path == str(path) and info.value.reason


def test_missing_artifacts_are_not_corrupt(tmp_path):
  with pytest.raises(FileNotFoundError):
    wd.read_json(str(tmp_path / "absent.json"))
  with pytest.raises(FileNotFoundError):
    wd.read_npz(str(tmp_path / "absent.npz"))


def test_npz_round_trip_matches_numpy(tmp_path):
  arrays = {"a_PxN": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array(["x", "yz"])}
  path = tmp_path / "iter_001" / "a.npz"
  wd.write_npz(str(path), **arrays)
  with np.load(path) as independent:
    for key, value in arrays.items():
      np.testing.assert_array_equal(independent[key], value)
  back = wd.read_npz(str(path))
  assert back.keys() == arrays.keys()
  for key, value in arrays.items():
    np.testing.assert_array_equal(back[key], value)


def test_metrics_append_per_row_locally(tmp_path):
  metrics = wd.Metrics(str(tmp_path))
  metrics.log("train", 1, loss=np.float32(0.5))
  # Locally each row is on disk as soon as it is logged (a kill loses nothing).
  assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 0.5
  metrics.log("eval", 1, heldout_reward=np.float64(2.0), by_level={"1": 0.5})
  metrics.close()
  resumed = wd.Metrics(str(tmp_path))
  resumed.log("train", 2, loss=0.25)
  assert [(r["kind"], r["step"]) for r in resumed.read()] == [("train", 1), ("eval", 1),
                                                              ("train", 2)]
  assert [r["loss"] for r in resumed.read("train")] == [0.5, 0.25]
  resumed.close()


def test_check_writable(tmp_path):
  wd.check_writable(str(tmp_path / "new" / "run"))
  assert os.listdir(tmp_path / "new" / "run") == []  # The probe is gone.
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(PermissionError, match="a_file/run' is not writable"):
    wd.check_writable(str(blocker / "run"))
