"""Memory-mapped reading and plain writing of .safetensors files, bfloat16 included.

The safetensors package's NumPy backend cannot represent bfloat16, and its Flax backend places
every tensor on the default device; checkpoint loading wants host-side views that are sliced and
sent straight to their final sharding. The format (8-byte little-endian header size, a JSON
header of {name: {dtype, shape, data_offsets}}, then raw bytes) is small enough to read directly.

A file is untrusted input, so `SafetensorsFile` checks the whole header when it opens, by the
format's rules as the official (Rust) reader applies them, and raises one `SafetensorsError`
naming the file and the problem: a header size over `MAX_HEADER_BYTES` or past the end of the
file; a header that is not UTF-8 JSON starting with "{", or is nested too deeply to parse; a
repeated name (JSON objects with duplicate keys; the official reader silently keeps the last);
an unknown dtype; a shape that is not a list of non-negative integers; data_offsets that are not
two integers [begin, end] with begin <= end; a shape whose byte size differs from end - begin;
tensors that, sorted by offset, do not tile the data section exactly (a hole, an overlap, or
bytes past the last tensor); a `__metadata__` that is not a {str: str} object. Nothing is
allocated from the header's claims: the header read is bounded by the file size.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

# The official reader's bound on the JSON header (100 MB).
MAX_HEADER_BYTES = 100_000_000

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_METADATA = "__metadata__"
# Element counts are compared only up to here (the official reader's usize overflow bound), so
# a shape of huge dimensions never builds a huge integer.
_MAX_ELEMENTS = 2**64


class SafetensorsError(ValueError):
  """A .safetensors file (or a tensor set to be saved) breaks the format."""


class _DuplicateKey(Exception):
  pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
  """json's object hook that refuses a repeated key (plain json.loads keeps the last one)."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise _DuplicateKey(key)
    out[key] = value
  return out


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _num_elements(shape: list[int]) -> int:
  """Product of `shape`, or _MAX_ELEMENTS + 1 once it exceeds that (no huge integers built)."""
  if 0 in shape:
    return 0
  count = 1
  for dim in shape:
    count *= dim
    if count > _MAX_ELEMENTS:
      return _MAX_ELEMENTS + 1
  return count


def _parse_header(path: str, raw: bytes) -> dict:
  if not raw.startswith(b"{"):
    raise SafetensorsError(f"{path}: the header does not start with '{{'")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise SafetensorsError(f"{path}: the header is not UTF-8 ({e.reason} at byte "
                           f"{8 + e.start})") from None
  try:
    return json.loads(text, object_pairs_hook=_no_duplicates)
  except _DuplicateKey as e:
    raise SafetensorsError(f"{path}: the header repeats the key {e.args[0]!r}") from None
  except RecursionError:
    raise SafetensorsError(f"{path}: the header JSON is nested too deeply") from None
  except ValueError as e:  # JSONDecodeError, or an integer literal too long to convert
    raise SafetensorsError(f"{path}: the header is not valid JSON ({e})") from None


def _check_metadata(path: str, metadata: Any) -> None:
  if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in metadata.items()):
    raise SafetensorsError(f"{path}: {_METADATA} must map strings to strings, got "
                           f"{metadata!r:.80}")


def _check_tensors(path: str, header: dict, data_len: int) -> None:
  """Every entry is well formed and, sorted by offset, the entries tile [0, data_len)."""
  spans = []
  for name, info in header.items():
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
      raise SafetensorsError(f"{where}: expected {{dtype, shape, data_offsets}}, got "
                             f"{info!r:.80}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
      raise SafetensorsError(f"{where}: unsupported dtype {dtype!r:.40} (supported: "
                             f"{sorted(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got "
                             f"{shape!r:.80}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
        or not 0 <= offsets[0] <= offsets[1]):
      raise SafetensorsError(f"{where}: data_offsets must be two integers 0 <= begin <= end, "
                             f"got {offsets!r:.80}")
    begin, end = offsets
    if end > data_len:
      raise SafetensorsError(f"{where}: data_offsets {offsets} run past the data section "
                             f"({data_len} bytes)")
    count = _num_elements(shape)
    nbytes = count * np.dtype(_DTYPES[dtype]).itemsize
    if nbytes != end - begin:
      need = f"more than {_MAX_ELEMENTS} elements" if count > _MAX_ELEMENTS else f"{nbytes} bytes"
      raise SafetensorsError(f"{where}: shape {shape!s:.80} of {dtype} needs {need} but "
                             f"data_offsets {offsets} hold {end - begin} bytes")
    spans.append((begin, end, name))
  position = 0
  for begin, end, name in sorted(spans):
    if begin != position:
      problem = "overlaps the tensor before it" if begin < position else "leaves a hole before it"
      raise SafetensorsError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] "
                             f"{problem} (the previous one ends at {position})")
    position = end
  if position != data_len:
    raise SafetensorsError(f"{path}: the tensors cover {position} bytes but the data section "
                           f"holds {data_len}")


class SafetensorsFile:
  """Lazy, read-only view of one .safetensors file, checked when opened (see module doc)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      file_len = os.fstat(f.fileno()).st_size
      raw = f.read(8)
      if len(raw) != 8:
        raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      (header_len,) = struct.unpack("<Q", raw)
      if header_len > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path}: header size {header_len} exceeds the limit of "
                               f"{MAX_HEADER_BYTES} bytes")
      if 8 + header_len > file_len:
        raise SafetensorsError(f"{path}: header size {header_len} runs past the end of the "
                               f"file ({file_len} bytes)")
      header = _parse_header(path, f.read(header_len))  # a dict: the text starts with "{"
    if _METADATA in header:
      _check_metadata(path, header.pop(_METADATA))
    _check_tensors(path, header, file_len - 8 - header_len)
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
    if name == _METADATA:
      raise SafetensorsError(f"save_file: {_METADATA!r} is reserved and cannot name a tensor")
    if arr.dtype not in _NAMES:
      raise SafetensorsError(f"save_file: tensor {name!r} has unsupported dtype {arr.dtype}")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  if metadata:
    _check_metadata(f"save_file({path})", dict(metadata))
    header[_METADATA] = dict(metadata)
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
