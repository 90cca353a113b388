"""Memory-mapped reading and plain writing of .safetensors files, bfloat16 included.

The safetensors package's NumPy backend cannot represent bfloat16, and its Flax backend places
every tensor on the default device; checkpoint loading wants host-side views that are sliced and
sent straight to their final sharding. The format (8-byte little-endian header size, a JSON
header of {name: {dtype, shape, data_offsets}}, then raw bytes) is small enough to read directly.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """Lazy, read-only view of one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its header)")
      (header_len,) = struct.unpack("<Q", raw)
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    header.pop("__metadata__", None)
    self._header = header
    self._data_start = 8 + header_len
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only NumPy view (no copy until it is used)."""
    info = self._header[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    buf = self._mmap[self._data_start + begin:self._data_start + end]
    return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors to `path` atomically (a temp name, then rename)."""
  header, offset, order = {}, 0, sorted(tensors)
  for name in order:
    arr = np.asarray(tensors[name])
    if arr.dtype not in _NAMES:
      raise ValueError(f"save_file: tensor {name!r} has unsupported dtype {arr.dtype}")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # The data section starts 8-byte aligned.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in order:
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
  os.replace(tmp, path)


def iter_shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> Iterator[dict]:
  """Groups tensors (in name order) into shards of at most max_bytes (one tensor may exceed)."""
  shard, size = {}, 0
  for name in sorted(tensors):
    nbytes = np.asarray(tensors[name]).nbytes
    if shard and size + nbytes > max_bytes:
      yield shard
      shard, size = {}, 0
    shard[name] = tensors[name]
    size += nbytes
  if shard:
    yield shard
