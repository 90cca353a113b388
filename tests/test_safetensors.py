"""safetensors_io against the official reader (the `safetensors` package): valid files read the
same, hostile files give one SafetensorsError, and a seeded fuzz finds nothing else."""
import json
import re
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

from eva_jax.models import safetensors_io as st

# A: F32 [2, 3] at [0, 24); B: I8 [4] at [24, 28). The data section holds 28 bytes.
_A = np.arange(6, dtype=np.float32).reshape(2, 3)
_B = np.array([1, -2, 3, -4], np.int8)
_HEADER = {"A": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
           "B": {"dtype": "I8", "shape": [4], "data_offsets": [24, 28]}}
_DATA = _A.tobytes() + _B.tobytes()


def _file(header, data=_DATA) -> bytes:
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(raw)) + raw + data


def _with(name, **fields):
  """_HEADER with some fields of tensor `name` replaced."""
  header = json.loads(json.dumps(_HEADER))
  header[name].update(fields)
  return header


def _read_ours(path):
  """{name: array} or the SafetensorsError; any other exception fails the calling test."""
  try:
    f = st.SafetensorsFile(str(path))
    return {k: np.array(f.get(k)) for k in f.keys()}
  except st.SafetensorsError as err:
    return err


def _read_official(blob: bytes):
  try:
    return safetensors.numpy.load(blob)
  except Exception as err:  # pylint: disable=broad-except
    return err


def _same(ours: dict, official: dict) -> bool:
  return (ours.keys() == official.keys()
          and all(ours[k].dtype == official[k].dtype and ours[k].shape == official[k].shape
                  and ours[k].tobytes() == official[k].tobytes() for k in ours))


# Where we are stricter than the official reader: dtypes outside our table (U16, F8_E4M3, ...),
# repeated keys (it keeps the last) and the spec's "the header MUST begin with '{'" (it skips
# leading whitespace).
_STRICTER = re.compile(r"unsupported dtype|repeats the key|does not start with")

# (name, file bytes, the error it must raise). The official reader refuses every one of these
# too, except the _STRICTER ones (repeated keys, leading whitespace).
_HOSTILE = [
    ("shorter_than_8_bytes", b"\x02\x00\x00", "shorter than 8 bytes"),
    ("header_len_past_end", struct.pack("<Q", 100) + b"{}", "runs past the end of the file"),
    ("header_len_huge", struct.pack("<Q", 2**63) + b"{}", "exceeds the limit"),
    ("header_len_1tb", struct.pack("<Q", 2**40) + b"{}", "exceeds the limit"),
    ("empty_header", struct.pack("<Q", 0) + _DATA, "does not start with"),
    ("header_is_a_list", _file(b"[1, 2]"), "does not start with"),
    ("leading_space", _file(b" " + json.dumps(_HEADER).encode()), "does not start with"),
    ("not_json", _file(b"{oops"), "not valid JSON"),
    ("not_utf8", _file(b'{"\xff\xfe": 1}'), "not UTF-8"),
    ("deeply_nested", _file(b'{"A": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     "nested too deeply"),
    ("huge_integer_literal", _file(b'{"A": {"dtype": "I8", "shape": [1], "data_offsets": [0, '
                                   + b"9" * 5000 + b"]}}"), "not valid JSON"),
    ("duplicate_name", _file(b'{"A": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}, '
                             b'"A": {"dtype": "I8", "shape": [24], "data_offsets": [4, 28]}}'),
     "repeats the key 'A'"),
    ("duplicate_field", _file(b'{"A": {"dtype": "I8", "dtype": "F32", "shape": [28], '
                              b'"data_offsets": [0, 28]}}'), "repeats the key 'dtype'"),
    ("entry_not_object", _file({"A": 5}), r"expected \{dtype, shape, data_offsets\}"),
    ("entry_missing_field", _file(_HEADER | {"B": {"shape": [4]}}),
     r"'B': expected \{dtype, shape, data_offsets\}"),
    ("unknown_dtype", _file(_with("A", dtype="F99")), "unsupported dtype 'F99'"),
    ("dtype_not_a_string", _file(_with("A", dtype=4)), "unsupported dtype 4"),
    ("negative_dims", _file(_with("A", shape=[-2, -3])), "non-negative integers"),
    ("float_dim", _file(_with("A", shape=[2.0, 3])), "non-negative integers"),
    ("shape_not_a_list", _file(_with("A", shape="2x3")), "non-negative integers"),
    ("float_offsets", _file(_with("A", data_offsets=[0.0, 24.0])), "two integers"),
    ("string_offsets", _file(_with("A", data_offsets=["0", "24"])), "two integers"),
    ("bool_offsets", _file(_with("A", data_offsets=[False, 24])), "two integers"),
    ("three_offsets", _file(_with("A", data_offsets=[0, 12, 24])), "two integers"),
    ("negative_offset", _file(_with("A", data_offsets=[-4, 24])), "two integers"),
    ("begin_after_end", _file(_with("A", data_offsets=[24, 0])), "two integers"),
    ("offsets_past_data", _file(_with("B", shape=[16], data_offsets=[24, 40])),
     "run past the data section"),
    ("offsets_huge", _file(_with("B", data_offsets=[24, 2**64 + 28])), "run past the data"),
    ("shape_disagrees_with_offsets", _file(_with("A", shape=[2, 4])),
     r"needs 32 bytes but data_offsets \[0, 24\] hold 24 bytes"),
    ("shape_overflows", _file(_with("A", shape=[2**40, 2**40, 2**40])),
     r"needs more than \d+ elements"),
    ("overlap", _file(_with("B", data_offsets=[20, 24]), _DATA[:24]), "overlaps"),
    ("hole", _file(_with("B", data_offsets=[28, 32]), _DATA + b"\0" * 4), "leaves a hole"),
    ("trailing_bytes", _file(_HEADER, _DATA + b"\0" * 8), "cover 28 bytes but the data"),
    ("truncated_data", _file(_HEADER, _DATA[:20]), "run past the data section"),
    ("metadata_not_str_to_str", _file(_HEADER | {"__metadata__": {"step": 1}}),
     "__metadata__ must map strings to strings"),
    ("metadata_not_object", _file(_HEADER | {"__metadata__": "x"}), "__metadata__ must map"),
]


def test_valid_files_read_as_the_official_reader_reads_them(tmp_path):
  # Our writer, every dtype (bfloat16 compared through torch: NumPy's official backend has none),
  # an empty tensor and metadata.
  rng = np.random.default_rng(0)
  tensors = {name: rng.normal(size=(3, 5)).astype(dtype) for name, dtype in
             (("f64", np.float64), ("f32", np.float32), ("f16", np.float16),
              ("bf16", ml_dtypes.bfloat16), ("i64", np.int64), ("i32", np.int32),
              ("i16", np.int16), ("i8", np.int8), ("u8", np.uint8))}
  tensors["bool"] = rng.normal(size=(4,)) > 0
  tensors["empty"] = np.zeros((0, 7), np.float32)
  path = tmp_path / "ours.safetensors"
  st.save_file(tensors, str(path), metadata={"format": "np"})
  ours = _read_ours(path)
  official = safetensors.torch.load_file(str(path))
  assert ours.keys() == tensors.keys() == official.keys()
  for name, want in tensors.items():
    assert ours[name].dtype == want.dtype and ours[name].tobytes() == want.tobytes()
    if name == "bf16":
      np.testing.assert_array_equal(ours[name].astype(np.float32), official[name].float().numpy())
    else:
      np.testing.assert_array_equal(ours[name], official[name].numpy())
  # The official writer (its own ordering and padding), and a header listing tensors out of
  # offset order.
  safetensors.numpy.save_file({"x": _A, "y": _B}, str(tmp_path / "official.safetensors"))
  assert _same(_read_ours(tmp_path / "official.safetensors"), {"x": _A, "y": _B})
  unordered = {"B": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]},
               "A": {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]}}
  blob = _file(unordered, _B.tobytes() + _A.tobytes())
  (tmp_path / "unordered.safetensors").write_bytes(blob)
  assert _same(_read_ours(tmp_path / "unordered.safetensors"), {"A": _A, "B": _B})
  assert _same(_read_ours(tmp_path / "unordered.safetensors"), _read_official(blob))
  (tmp_path / "none.safetensors").write_bytes(_file({}, b""))
  assert _read_ours(tmp_path / "none.safetensors") == {}


@pytest.mark.parametrize("name,blob,message", _HOSTILE, ids=[c[0] for c in _HOSTILE])
def test_hostile_file_gives_one_clear_error(tmp_path, name, blob, message):
  path = tmp_path / f"{name}.safetensors"
  path.write_bytes(blob)
  with pytest.raises(st.SafetensorsError, match=message) as err:
    st.SafetensorsFile(str(path))
  assert str(path) in str(err.value)
  # The official reader refuses it too, unless the refusal is one where we are stricter.
  if not _STRICTER.search(str(err.value)):
    assert isinstance(_read_official(blob), Exception), name


def test_save_file_refuses_what_it_could_not_read_back(tmp_path):
  with pytest.raises(st.SafetensorsError, match="unsupported dtype"):
    st.save_file({"c": np.zeros(2, np.complex64)}, str(tmp_path / "c.safetensors"))
  with pytest.raises(st.SafetensorsError, match="reserved"):
    st.save_file({"__metadata__": np.zeros(2, np.float32)}, str(tmp_path / "m.safetensors"))
  with pytest.raises(st.SafetensorsError, match="strings to strings"):
    st.save_file({"a": _A}, str(tmp_path / "m.safetensors"), metadata={"step": 3})


def _mutations(valid: bytes, rng: np.random.Generator, count: int):
  """`count` mutated copies of `valid`: byte flips, truncations, appended bytes, header-length
  edits and JSON-level edits of one field (rewritten with a consistent header length)."""
  header_len = struct.unpack("<Q", valid[:8])[0]
  header = json.loads(valid[8:8 + header_len])
  hostile_values = [-1, 0, 1, 2**31, 2**64, 1.5, "7", None, True, [], [1, 2, 3], {}, "F32",
                    "BF16", "U16", [2, 3], [0, 28], [24, 0], [-1, 28], [3, 2]]
  for _ in range(count):
    kind = rng.integers(5)
    blob = bytearray(valid)
    if kind == 0:  # overwrite 1-3 bytes, each in the header or in the data with even odds
      for _ in range(rng.integers(1, 4)):
        low, high = (0, 8 + header_len) if rng.random() < 0.5 else (8 + header_len, len(blob))
        blob[rng.integers(low, high)] = rng.integers(256)
    elif kind == 1:
      del blob[rng.integers(len(blob)):]
    elif kind == 2:
      blob += rng.bytes(int(rng.integers(1, 64)))
    elif kind == 3:
      lengths = [0, 1, header_len - 1, header_len + 1, header_len + 28, 2**63, 2**64 - 1,
                 st.MAX_HEADER_BYTES + 1]
      blob[:8] = struct.pack("<Q", lengths[rng.integers(len(lengths))])
    else:
      edited = json.loads(json.dumps(header))
      name = str(rng.choice(sorted(edited)))
      field = str(rng.choice(["dtype", "shape", "data_offsets"]))
      edited[name][field] = hostile_values[rng.integers(len(hostile_values))]
      raw = json.dumps(edited).encode()
      blob = bytearray(struct.pack("<Q", len(raw)) + raw + valid[8 + header_len:])
    yield bytes(blob)


def test_fuzzed_files_load_identically_or_raise_safetensors_error(tmp_path):
  path = tmp_path / "valid.safetensors"
  st.save_file({"A": _A, "B": _B, "C": np.array([1.5, -2.0], np.float16)}, str(path),
               metadata={"k": "v"})
  valid = path.read_bytes()
  assert _same(_read_ours(path), _read_official(valid))
  rng = np.random.default_rng(1234)
  outcomes = {"same as official": 0, "refused by both": 0, "refused by us only": 0}
  for index, blob in enumerate(_mutations(valid, rng, 300)):
    case = tmp_path / f"case{index}.safetensors"
    case.write_bytes(blob)
    ours, official = _read_ours(case), _read_official(blob)
    if isinstance(ours, dict):
      assert isinstance(official, dict) and _same(ours, official), (index, blob)
      outcomes["same as official"] += 1
    elif isinstance(official, Exception):
      outcomes["refused by both"] += 1
    else:
      assert _STRICTER.search(str(ours)), (index, blob, ours)
      outcomes["refused by us only"] += 1
    case.unlink()
  print(outcomes)
  assert outcomes["same as official"] > 0 and outcomes["refused by both"] > 0
