"""Prompt datasets: file readers and the tfds builder against hand-parsed files; process split."""
import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eva_jax import data
from eva_jax.data import PromptExample
from tests import shared_data

ARENA_NAME = shared_data.ARENA_NAME


@pytest.fixture(scope="module")
def arena_expected():
  path = shared_data.arena_path()
  rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
  return path, [PromptExample(id=r["question_id"], text=r["turns"][0]["content"],
                              source="arena_hard", category=r["category"],
                              cluster=r["cluster"]) for r in rows]


# The generated prompt set: (file name, lines) and the examples a reader must return, written out
# by hand. Blank lines are skipped but still count for line numbers (fallback ids "stem:line").
GENERATED_FILES = {
    "prompts.jsonl": [
        json.dumps({"id": "a1", "prompt": "Hello, world"}),
        json.dumps({"prompt": "  leading and trailing spaces  "}),
        "",
        json.dumps({"instruction": "Use the instruction key", "source": "flan",
                    "category": "qa"}),
        json.dumps("a bare JSON string prompt"),
        json.dumps({"prompt_id": 17,
                    "prompt": "multi\nline\n\ttabbed \"quoted\" ✓ 日本語 🙂"}, ensure_ascii=False),
        json.dumps({"question_id": "q-9", "category": "coding",
                    "turns": [{"content": "first turn"}, {"content": "second"}]}),
        json.dumps({"id": "z", "turns": ["MT-Bench style turn one", "turn two"]}),
    ],
    "extra.txt": ["plain text prompt one", "", "second plain prompt  "],
}
GENERATED_EXPECTED = [  # extra.txt sorts before prompts.jsonl
    PromptExample("extra:1", "plain text prompt one", "jsonl", ""),
    PromptExample("extra:3", "second plain prompt  ", "jsonl", ""),
    PromptExample("a1", "Hello, world", "jsonl", ""),
    PromptExample("prompts:2", "  leading and trailing spaces  ", "jsonl", ""),
    PromptExample("prompts:4", "Use the instruction key", "flan", "qa"),
    PromptExample("prompts:5", "a bare JSON string prompt", "jsonl", ""),
    PromptExample("17", "multi\nline\n\ttabbed \"quoted\" ✓ 日本語 🙂", "jsonl", ""),
    PromptExample("q-9", "first turn", "jsonl", "coding"),
    PromptExample("z", "MT-Bench style turn one", "jsonl", ""),
]


def _write_generated(folder: Path) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  for name, lines in GENERATED_FILES.items():
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
  return folder


def _write_ultrafeedback(folder: Path) -> list[PromptExample]:
  folder.mkdir(parents=True, exist_ok=True)
  # HuggingFaceH4/ultrafeedback_binarized style: prompt + prompt_id + whole responses.
  pq.write_table(pa.table({
      "prompt": ["How do plants breathe?", "Write a haiku about rust."],
      "prompt_id": ["9f2c", "03ab"],
      "chosen": [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]],
      "score_chosen": [8.0, 7.5],
  }), folder / "a_binarized.parquet")
  # openbmb/UltraFeedback style: instruction + source, no id.
  pq.write_table(pa.table({"instruction": ["Explain TCP."], "source": ["evol_instruct"]}),
                 folder / "b_openbmb.parquet")
  return [PromptExample("9f2c", "How do plants breathe?", "ultrafeedback", ""),
          PromptExample("03ab", "Write a haiku about rust.", "ultrafeedback", ""),
          PromptExample("b_openbmb:0", "Explain TCP.", "evol_instruct", "")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """tfds prompt sets prepared once for the module: {config: (data_dir, expected examples)}."""
  root = tmp_path_factory.mktemp("prompt_sets")
  out = {}
  data_dir = root / "tfds"
  generated_dir = _write_generated(root / "manual_jsonl")
  data.prepare_prompt_set(generated_dir, config="jsonl", data_dir=data_dir)
  out["jsonl"] = (data_dir, GENERATED_EXPECTED)
  uf_expected = _write_ultrafeedback(root / "manual_uf")
  data.prepare_prompt_set(root / "manual_uf", config="ultrafeedback", data_dir=data_dir)
  out["ultrafeedback"] = (data_dir, uf_expected)
  arena = shared_data.arena_path_or_none()
  if arena is not None:
    arena_dir = root / "manual_arena"
    arena_dir.mkdir()
    shutil.copy(arena, arena_dir / ARENA_NAME)
    data.prepare_prompt_set(arena_dir, config="arena_hard", data_dir=data_dir)
    out["arena_hard"] = data_dir
  return out


def test_arena_hard_file_matches_hand_parse(arena_expected):
  path, expected = arena_expected
  assert len(expected) == 500
  assert data.infer_format(path) == "arena_hard"
  assert data.load_prompts(path, process_index=0, process_count=1) == expected
  # Defaults come from jax: a single process here.
  assert data.load_prompts(path) == expected


def test_arena_hard_tfds_round_trip(prepared, arena_expected):
  _, expected = arena_expected
  data_dir = prepared["arena_hard"]
  got = data.load_prompts("prompt_set/arena_hard", data_dir=data_dir, process_index=0,
                          process_count=1)
  assert got == expected
  # The array_record data source itself (no TensorFlow on this machine): raw records in order.
  builder = data.PromptSet(config="arena_hard", data_dir=os.fspath(data_dir))
  source = builder.as_data_source(split="train")
  assert len(source) == 500
  for index in (0, 1, 250, 499):
    record = source[index]
    assert record["id"].decode() == expected[index].id
    assert record["prompt"].decode("utf-8") == expected[index].text


def test_generated_file_read(tmp_path):
  folder = _write_generated(tmp_path)
  got = data.load_prompts(folder / "prompts.jsonl", process_index=0, process_count=1)
  assert got == GENERATED_EXPECTED[2:]
  got_txt = data.load_prompts(folder / "extra.txt", process_index=0, process_count=1)
  assert got_txt == GENERATED_EXPECTED[:2]


@pytest.mark.parametrize("config", ["jsonl", "ultrafeedback"])
def test_generated_tfds_round_trip(prepared, config):
  data_dir, expected = prepared[config]
  got = data.load_prompts(f"prompt_set/{config}", data_dir=data_dir, process_index=0,
                          process_count=1)
  assert got == expected


def test_parquet_file_read(tmp_path):
  expected = _write_ultrafeedback(tmp_path)
  assert data.load_prompts(tmp_path / "a_binarized.parquet", process_index=0,
                           process_count=1) == expected[:2]


def _check_split(load, expected):
  for count in (1, 2, 3, 8):
    shares = [load(index, count) for index in range(count)]
    # Together, in process order, the shares are the whole set: each prompt exactly once.
    assert [e for share in shares for e in share] == expected
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1, (count, sizes)


def test_process_split_covers_every_prompt_once(prepared, arena_expected):
  path, expected = arena_expected
  _check_split(lambda i, n: data.load_prompts(path, process_index=i, process_count=n), expected)
  _check_split(lambda i, n: data.load_prompts("prompt_set/arena_hard",
                                              data_dir=prepared["arena_hard"],
                                              process_index=i, process_count=n), expected)


def test_process_split_small_set(prepared):
  # 9 prompts over 8 processes (and 3 ultrafeedback prompts: some processes get none).
  for config in ("jsonl", "ultrafeedback"):
    data_dir, expected = prepared[config]
    _check_split(lambda i, n: data.load_prompts(f"prompt_set/{config}", data_dir=data_dir,
                                                process_index=i, process_count=n), expected)


def test_process_range_by_hand():
  assert [list(data.process_range(7, i, 3)) for i in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
  assert [list(data.process_range(2, i, 4)) for i in range(4)] == [[], [0], [], [1]]
  with pytest.raises(ValueError, match="process_index"):
    data.process_range(5, 3, 3)
  with pytest.raises(TypeError, match="process_count"):
    data.process_range(5, 0, 2.0)


def _write(path: Path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    data.load_prompts(tmp_path / "missing.jsonl", process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="not a tfds spec"):
    data.load_prompts("no_such_prompts", process_index=0, process_count=1)

  empty = tmp_path / "empty.jsonl"
  empty.write_text("", encoding="utf-8")
  with pytest.raises(ValueError, match="no prompts.*empty"):
    data.read_prompt_file(empty)
  with pytest.raises(ValueError, match="no prompts"):
    data.read_prompt_file(_write(tmp_path / "blank.txt", ["", "   "]))

  no_prompt = _write(tmp_path / "no_prompt.jsonl",
                     [json.dumps({"prompt": "ok"}), "", json.dumps({"text": "wrong key"})])
  with pytest.raises(ValueError, match=r"no_prompt.jsonl:line 3: no prompt field"):
    data.read_prompt_file(no_prompt)

  dup = _write(tmp_path / "dup.jsonl", [json.dumps({"id": "x", "prompt": "a"}),
                                        json.dumps({"id": "y", "prompt": "b"}),
                                        json.dumps({"id": "x", "prompt": "c"})])
  with pytest.raises(ValueError, match=r"duplicate prompt id 'x' at .*line 3 .*line 1"):
    data.read_prompt_file(dup)

  bad_json = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "a"}), "{not json"])
  with pytest.raises(ValueError, match=r"bad.jsonl:line 2: not valid JSON"):
    data.read_prompt_file(bad_json)

  empty_prompt = _write(tmp_path / "empty_prompt.jsonl", [json.dumps({"prompt": "  "})])
  with pytest.raises(ValueError, match=r"line 1: the prompt must be a non-empty string"):
    data.read_prompt_file(empty_prompt)

  arena = _write(tmp_path / "arena.jsonl", [json.dumps({"question_id": "q", "turns": []})])
  with pytest.raises(ValueError, match=r"line 1: 'turns' must be a non-empty list"):
    data.read_prompt_files([arena], "arena_hard")
  with pytest.raises(ValueError,
                     match=r"line 1: Arena-Hard row without \['question_id', 'turns'\]"):
    data.read_prompt_files([no_prompt], "arena_hard")
  with pytest.raises(ValueError, match="unknown prompt layout"):
    data.read_prompt_files([arena], "alpaca")
  with pytest.raises(ValueError, match=r"reads \['.jsonl', '.json'\] files, not '.txt'"):
    data.read_prompt_files([tmp_path / "blank.txt"], "arena_hard")

  with pytest.raises(ValueError, match="process_index"):
    data.load_prompts(no_prompt, process_index=2, process_count=2)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
  _write_ultrafeedback(tmp_path)
  # A None entry in sys.modules makes `import pyarrow.parquet` raise ImportError.
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match="needs pyarrow"):
    data.read_prompt_file(tmp_path / "a_binarized.parquet")


def test_prepare_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="manual_dir is not a folder"):
    data.prepare_prompt_set(tmp_path / "nowhere", config="jsonl", data_dir=tmp_path / "tfds")
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "notes.md").write_text("no prompts here", encoding="utf-8")
  with pytest.raises(FileNotFoundError, match=r"no files matching \['\*.jsonl'\]"):
    data.prepare_prompt_set(manual, config="arena_hard", data_dir=tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="is not prepared"):
    data.load_prompts("prompt_set/jsonl", data_dir=tmp_path / "empty_tfds", process_index=0,
                      process_count=1)


_LONG_PROMPT = "a" * (data.MAX_PROMPT_CHARS + 1)
_LIMIT = f"MAX_PROMPT_CHARS={data.MAX_PROMPT_CHARS}"
_HUGE_LINE = b"b" * (10 * 1024 * 1024)  # 10 MB, past MAX_LINE_BYTES
# (file name, its bytes, the error it must raise). Every one names the file and the line/item.
_HOSTILE_FILES = [
    ("utf8.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n',
     r"utf8.jsonl:line 2: not valid UTF-8"),
    ("utf8.txt", b"ok\nfine\n\xff\xfe bad\n", r"utf8.txt:line 3: not valid UTF-8"),
    ("utf8.json", b'[\n"ok",\n"\xc3("\n]', r"utf8.json:line 3: not valid UTF-8"),
    ("nul.txt", b"ok\nnul\x00here\n", r"nul.txt:line 2: contains a NUL byte"),
    ("nul.jsonl", b'{"prompt": "a\x00"}\n', r"nul.jsonl:line 1: contains a NUL byte"),
    ("nul_escape.jsonl", b'{"prompt": "a\\u0000b"}\n',
     r"nul_escape.jsonl:line 1: the prompt contains a NUL character"),
    ("nul_escape.json", b'["ok", "a\\u0000b"]',
     r"nul_escape.json:item 1: the prompt contains a NUL"),
    ("surrogate.jsonl", b'{"prompt": "a\\ud800b"}\n',
     r"surrogate.jsonl:line 1: the prompt is not valid Unicode"),
    ("surrogate_id.jsonl", b'{"prompt": "a", "id": "\\udfff"}\n',
     r"surrogate_id.jsonl:line 1: the id is not valid Unicode"),
    ("huge_line.jsonl", b'{"prompt": "ok"}\n{"prompt": "' + _HUGE_LINE + b'"}\n',
     rf"huge_line.jsonl:line 2: longer than MAX_LINE_BYTES={data.MAX_LINE_BYTES} bytes"),
    ("huge_line.txt", _HUGE_LINE, r"huge_line.txt:line 1: longer than MAX_LINE_BYTES"),
    ("huge_line_no_newline.txt", b"ok\n" + _HUGE_LINE * 2,
     r"huge_line_no_newline.txt:line 2: longer than MAX_LINE_BYTES"),
    ("long_prompt.jsonl", json.dumps({"prompt": _LONG_PROMPT}).encode(),
     rf"long_prompt.jsonl:line 1: the prompt has {len(_LONG_PROMPT)} characters, more than "
     rf"{_LIMIT}"),
    ("long_prompt.txt", b"ok\n" + _LONG_PROMPT.encode(), rf"long_prompt.txt:line 2: .*{_LIMIT}"),
    ("long_prompt.json", json.dumps([{"instruction": _LONG_PROMPT}]).encode(),
     rf"long_prompt.json:item 0: .*{_LIMIT}"),
    ("nested.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n",
     r"nested.jsonl:line 1: not valid JSON \(nested too deeply\)"),
    ("nested.json", b"[" * 100_000 + b"]" * 100_000, r"nested.json: not valid JSON"),
]


@pytest.mark.parametrize("name,blob,message", _HOSTILE_FILES, ids=[c[0] for c in _HOSTILE_FILES])
def test_hostile_prompt_file_is_refused_naming_file_and_line(tmp_path, name, blob, message):
  path = tmp_path / name
  path.write_bytes(blob)
  with pytest.raises(ValueError, match=message):
    data.load_prompts(path, process_index=0, process_count=1)


def test_hostile_parquet_rows_and_the_limits_themselves(tmp_path):
  for name, prompts, message in (
      ("long.parquet", ["ok", _LONG_PROMPT], rf"long.parquet:row 1: .*{_LIMIT}"),
      ("nul.parquet", ["a\x00b"], r"nul.parquet:row 0: the prompt contains a NUL character")):
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / name)
    with pytest.raises(ValueError, match=message):
      data.read_prompt_file(tmp_path / name)
  # A prompt of exactly MAX_PROMPT_CHARS, and a line of exactly MAX_LINE_BYTES, are read whole.
  at_limit = "c" * data.MAX_PROMPT_CHARS
  row = json.dumps({"prompt": at_limit, "pad": ""}).encode()
  row = row[:-2] + b" " * (data.MAX_LINE_BYTES - len(row)) + row[-2:]
  assert len(row) == data.MAX_LINE_BYTES
  (tmp_path / "edge.jsonl").write_bytes(row + b"\n" + row)
  (tmp_path / "edge.txt").write_bytes(b"caf\xc3\xa9\r\n" + at_limit.encode())
  assert [e.text for e in data.read_prompt_file(tmp_path / "edge.jsonl")] == [at_limit] * 2
  assert [e.text for e in data.read_prompt_file(tmp_path / "edge.txt")] == ["café", at_limit]
