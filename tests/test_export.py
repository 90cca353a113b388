"""Evaluation exports: each writer's file checked field by field by hand and by its validator;
validators against crafted bad files; the reward-model win rate on hand-computed cases."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from eva_jax import export
from tests import shared_data

SHORTUUID_ALPHABET = set("23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
ANSWER_KEYS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}


def _lines(path):
  return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _arena_questions():
  return _lines(shared_data.arena_path())


def test_alpaca_eval_fields(tmp_path):
  path = tmp_path / "out" / "alpaca.json"
  instructions = ["Say hi.", "Write ✓ and 日本語", "Two\nlines"]
  outputs = ["hi", "✓ 日本語", ""]
  export.write_alpaca_eval(path, instructions, outputs, "eva-gemma2-9b", dataset="helpful_base")
  records = json.loads(path.read_text(encoding="utf-8"))
  assert isinstance(records, list) and len(records) == 3
  for record, instruction, output in zip(records, instructions, outputs):
    assert set(record) == {"instruction", "output", "generator", "dataset"}
    assert all(isinstance(v, str) for v in record.values())
    assert (record["instruction"], record["output"]) == (instruction, output)
    assert (record["generator"], record["dataset"]) == ("eva-gemma2-9b", "helpful_base")
  assert export.validate_alpaca_eval(path) == records
  export.write_alpaca_eval(path, instructions[:1], outputs[:1], "m")
  assert set(json.loads(path.read_text())[0]) == {"instruction", "output", "generator"}


def _check_arena_line(row, qid, output, token_len, model_id):
  assert set(row) == ANSWER_KEYS
  assert row["question_id"] == qid and row["model_id"] == model_id
  assert isinstance(row["answer_id"], str) and len(row["answer_id"]) == 22
  assert set(row["answer_id"]) <= SHORTUUID_ALPHABET
  assert isinstance(row["tstamp"], float)
  assert row["choices"] == [{"index": 0, "turns": [{"content": output, "token_len": token_len}]}]


def test_arena_hard_fields(tmp_path):
  path = tmp_path / "model_answer" / "m1.jsonl"
  qids, outputs, lens = ["q1", "q2", "q3"], ["a", "b ✓", "c\nd"], [1, 2, 0]
  export.write_arena_hard(path, qids, outputs, "m1", token_lens=lens, tstamp=1700000000.5)
  rows = _lines(path)
  assert len(rows) == 3
  for row, qid, output, n in zip(rows, qids, outputs, lens):
    _check_arena_line(row, qid, output, n, "m1")
  assert rows[0]["tstamp"] == 1700000000.5
  assert len({row["answer_id"] for row in rows}) == 3
  assert export.validate_arena_hard(path) == rows
  # Deterministic: the same export gives the same bytes; another model gets other answer ids.
  before = path.read_bytes()
  export.write_arena_hard(path, qids, outputs, "m1", token_lens=lens, tstamp=1700000000.5)
  assert path.read_bytes() == before
  export.write_arena_hard(tmp_path / "m2.jsonl", qids, outputs, "m2")
  other = _lines(tmp_path / "m2.jsonl")
  assert not {r["answer_id"] for r in rows} & {r["answer_id"] for r in other}
  assert other[0]["choices"][0]["turns"] == [{"content": "a"}]  # no token_lens, no field
  export.validate_arena_hard(tmp_path / "m2.jsonl")


def test_arena_hard_500_question_ids(tmp_path):
  questions = _arena_questions()
  qids = [q["question_id"] for q in questions]
  outputs = [f"answer to {q['turns'][0]['content'][:20]}" for q in questions]
  path = tmp_path / "eva.jsonl"
  export.write_arena_hard(path, qids, outputs, "eva", token_lens=list(range(500)))
  rows = _lines(path)
  assert [row["question_id"] for row in rows] == qids
  for row, qid, output, n in zip(rows, qids, outputs, range(500)):
    _check_arena_line(row, qid, output, n, "eva")
  assert len(export.validate_arena_hard(path)) == 500


def test_mt_bench_fields(tmp_path):
  path = tmp_path / "mt" / "m.jsonl"
  qids = [81, 82, np.int64(160)]
  turns = [["first", "second"], ["only one"], ["x ✓", ""]]
  export.write_mt_bench(path, qids, turns, "m", tstamp=5)
  rows = _lines(path)
  assert [row["question_id"] for row in rows] == [81, 82, 160]
  for row, answer_turns in zip(rows, turns):
    assert set(row) == ANSWER_KEYS
    assert type(row["question_id"]) is int  # MT-Bench's ids are ints; the judge matches on them
    assert row["model_id"] == "m" and row["tstamp"] == 5.0
    assert isinstance(row["answer_id"], str) and len(row["answer_id"]) == 22
    assert row["choices"] == [{"index": 0, "turns": answer_turns}]
  assert export.validate_mt_bench(path) == rows


def test_answer_id_deterministic():
  assert export.answer_id("m", "q") == export.answer_id("m", "q")
  ids = {export.answer_id(m, q) for m in ("m", "n") for q in ("q", "r", 1)}
  assert len(ids) == 6
  # An int and a string question id are different questions.
  assert export.answer_id("m", 1) != export.answer_id("m", "1")


def test_writers_reject_bad_input(tmp_path):
  path = tmp_path / "x.jsonl"
  with pytest.raises(ValueError, match="outputs must be a sequence of 2"):
    export.write_arena_hard(path, ["a", "b"], ["only one"], "m")
  with pytest.raises(ValueError, match="duplicate question id 'a'"):
    export.write_arena_hard(path, ["a", "a"], ["x", "y"], "m")
  with pytest.raises(TypeError, match=r"outputs\[1\] must be a string"):
    export.write_arena_hard(path, ["a", "b"], ["x", 3], "m")
  with pytest.raises(TypeError, match=r"token_lens\[0\] must be a non-negative int"):
    export.write_arena_hard(path, ["a"], ["x"], "m", token_lens=[-1])
  with pytest.raises(TypeError, match="model_id must be a non-empty string"):
    export.write_mt_bench(path, [1], [["x"]], "")
  with pytest.raises(ValueError, match=r"turns_outputs\[0\] must be a non-empty list"):
    export.write_mt_bench(path, [1], ["not a list"], "m")
  with pytest.raises(ValueError, match="instructions must be a non-empty"):
    export.write_alpaca_eval(path, [], [], "m")
  assert not path.exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "m.jsonl"
  export.write_arena_hard(path, ["q"], ["old"], "m")
  before = path.read_bytes()

  def failing_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk full"):
    export.write_arena_hard(path, ["q"], ["new"], "m")
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # no temp file left


GOOD_ARENA = {"question_id": "q1", "answer_id": "A" * 22, "model_id": "m", "tstamp": 1.0,
              "choices": [{"index": 0, "turns": [{"content": "hi", "token_len": 1}]}]}
GOOD_MT = {"question_id": 81, "answer_id": "A" * 22, "model_id": "m", "tstamp": 1.0,
           "choices": [{"index": 0, "turns": ["hi", "again"]}]}


def _with(base, **changes):
  row = json.loads(json.dumps(base))
  for key, value in changes.items():
    if value is None:
      del row[key]
    else:
      row[key] = value
  return row


def _second_line_bad(base, bad):
  return json.dumps(base) + "\n" + json.dumps(bad) + "\n"


@pytest.mark.parametrize("validator, content, message", [
    ("arena_hard", _second_line_bad(GOOD_ARENA, _with(GOOD_ARENA, question_id="q2",
                                                       answer_id=None)),
     r":2: missing field 'answer_id'"),
    ("arena_hard", _second_line_bad(GOOD_ARENA, _with(
        GOOD_ARENA, question_id="q2",
        choices=[{"index": 0, "turns": [{"content": 5}]}])),
     r":2: choices\[0\].turns\[0\]: field 'content' must be str"),
    ("arena_hard", _second_line_bad(GOOD_ARENA, _with(
        GOOD_ARENA, question_id="q2",
        choices=[{"index": 0, "turns": [{"content": "x", "token_len": -3}]}])),
     r":2: choices\[0\].turns\[0\]: field 'token_len' must be >= 0"),
    ("arena_hard", _second_line_bad(GOOD_ARENA, _with(GOOD_ARENA, question_id="q2",
                                                       tstamp="now")),
     r":2: field 'tstamp' must be int or float"),
    ("arena_hard", _second_line_bad(GOOD_ARENA, _with(GOOD_ARENA, question_id=7)),
     r":2: field 'question_id' must be str"),
    ("arena_hard", _second_line_bad(GOOD_ARENA, GOOD_ARENA),
     r":2: field 'question_id' 'q1' repeats .*:1"),
    ("arena_hard", _second_line_bad(GOOD_ARENA, _with(GOOD_ARENA, question_id="q2",
                                                       model_id="other")),
     r"field 'model_id' differs between lines"),
    ("arena_hard", _second_line_bad(GOOD_ARENA, _with(GOOD_ARENA, question_id="q2",
                                                       choices=[])),
     r":2: field 'choices' must be list \(non-empty\)"),
    ("arena_hard", json.dumps(GOOD_ARENA) + "\n{oops\n", r":2: not valid JSON"),
    ("arena_hard", "", r"no answers \(empty file\)"),
    ("mt_bench", _second_line_bad(GOOD_MT, _with(GOOD_MT, question_id=82,
                                                 choices=[{"index": 0, "turns": [{"c": 1}]}])),
     r":2: choices\[0\].turns\[0\]: must be a string"),
    ("mt_bench", _second_line_bad(GOOD_MT, _with(GOOD_MT, question_id=82,
                                                 choices=[{"turns": ["x"]}])),
     r":2: choices\[0\]: missing field 'index'"),
    ("mt_bench", _second_line_bad(GOOD_MT, _with(GOOD_MT, question_id=82, model_id=None)),
     r":2: missing field 'model_id'"),
])
def test_answer_validators_reject(tmp_path, validator, content, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(content, encoding="utf-8")
  validate = {"arena_hard": export.validate_arena_hard, "mt_bench": export.validate_mt_bench}
  with pytest.raises(ValueError, match=message):
    validate[validator](path)


@pytest.mark.parametrize("records, message", [
    ([{"instruction": "a", "output": "b", "generator": "m"},
      {"instruction": "a", "output": "b"}], r"item 1: missing field 'generator'"),
    ([{"instruction": "a", "output": 3, "generator": "m"}], r"item 0: field 'output' must be str"),
    ([{"instruction": "a", "output": "b", "generator": "m", "dataset": 1}],
     r"item 0: field 'dataset' must be str"),
    ({"instruction": "a", "output": "b", "generator": "m"}, r"non-empty JSON list"),
    ([], r"non-empty JSON list"),
    (["just a string"], r"item 0: must be an object"),
])
def test_alpaca_eval_validator_rejects(tmp_path, records, message):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(records), encoding="utf-8")
  with pytest.raises(ValueError, match=message):
    export.validate_alpaca_eval(path)


def test_win_rate_by_hand():
  # wins at 0, tie at 1, loss at 2: (1 + 0.5 + 0) / 3
  assert export.win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(0.5)
  assert export.win_rate([3, 3], [1, 1]) == 1.0
  assert export.win_rate([-1.0, -2.0], [0.0, 0.0]) == 0.0
  assert export.win_rate([0.7, 0.7, 0.7, 0.7], [0.7, 0.7, 0.7, 0.7]) == 0.5
  # 3 wins, 1 tie, 1 loss of 5 -> 3.5 / 5
  assert export.win_rate([5, 4, 3, 2, 1], [1, 2, 3, 1, 9]) == pytest.approx(0.7)
  with pytest.raises(ValueError, match="one shape"):
    export.win_rate([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="non-empty"):
    export.win_rate([], [])
  with pytest.raises(ValueError, match="finite"):
    export.win_rate([np.nan], [1.0])


def test_generate_answers_batches_in_order():
  calls = []

  def sample_fn(batch):
    calls.append(list(batch))
    return [p.upper() for p in batch]

  prompts = ["a", "b", "c", "d", "e"]
  assert export.generate_answers(sample_fn, prompts, batch_size=2) == ["A", "B", "C", "D", "E"]
  assert calls == [["a", "b"], ["c", "d"], ["e"]]
  assert export.generate_answers(sample_fn, prompts) == ["A", "B", "C", "D", "E"]
  with pytest.raises(ValueError, match="returned 1 answers for 2 prompts"):
    export.generate_answers(lambda batch: ["x"], ["a", "b"])
  with pytest.raises(TypeError, match="must be a string"):
    export.generate_answers(lambda batch: [1 for _ in batch], ["a"])
