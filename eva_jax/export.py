"""Evaluation exports: a policy's answers in the files public judges read, and the RM win rate.

Formats (field names as the judges' own answer generators write them):

- AlpacaEval 2 (tatsu-lab/alpaca_eval, `--model_outputs`): one JSON list of
  `{"instruction", "output", "generator"}` objects, optionally `"dataset"`.
- Arena-Hard v0.1 (lmarena/arena-hard-auto, `data/arena-hard-v0.1/model_answer/<model_id>.jsonl`):
  one object a line, `{"question_id", "answer_id", "model_id", "tstamp",
  "choices": [{"index": 0, "turns": [{"content", "token_len"}]}]}`.
- MT-Bench (lm-sys/FastChat llm_judge, `data/mt_bench/model_answer/<model_id>.jsonl`): one object
  a line, `{"question_id", "answer_id", "model_id", "tstamp", "choices": [{"index": 0,
  "turns": [str, ...]}]}`, one string per conversation turn.

Both judges take the model name from the answer file's name, so name it `<model_id>.jsonl`.
`answer_id` is derived from (model_id, question_id) rather than random so that a re-export gives
the same file. Writers write atomically (`fileio.atomic_write`; paths may be local or gs://);
validators raise ValueError naming the line (or item) and field at fault.
"""
from __future__ import annotations

import json
import numbers
import os
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import numpy as np

from eva_jax import fileio

# shortuuid's alphabet (no 0/1/I/O/l) and length: 22 symbols of base 57 hold 128 bits.
_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_ANSWER_ID_LENGTH = 22
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/eva_jax/answer_id")


def answer_id(model_id: str, question_id: Any) -> str:
  """Deterministic shortuuid-style id (22 characters) of one model's answer to one question."""
  value = uuid.uuid5(_NAMESPACE, json.dumps([model_id, question_id])).int
  digits = []
  for _ in range(_ANSWER_ID_LENGTH):
    value, digit = divmod(value, len(_ALPHABET))
    digits.append(_ALPHABET[digit])
  return "".join(reversed(digits))


def _jsonl(records: Sequence[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)


def _check_name(what: str, value: Any) -> None:
  if not isinstance(value, str) or not value:
    raise TypeError(f"{what} must be a non-empty string, got {value!r:.80}")


def _check_texts(what: str, values: Sequence[Any], count: int) -> None:
  if isinstance(values, str) or len(values) != count:
    raise ValueError(f"{what} must be a sequence of {count} strings, got {values!r:.80}")
  for i, value in enumerate(values):
    if not isinstance(value, str):
      raise TypeError(f"{what}[{i}] must be a string, got {type(value).__name__}")


def _check_question_ids(question_ids: Sequence[Any]) -> list:
  if isinstance(question_ids, str) or not len(question_ids):
    raise ValueError(f"question_ids must be a non-empty sequence, got {question_ids!r:.80}")
  ids = []
  for i, qid in enumerate(question_ids):
    if isinstance(qid, np.integer):
      qid = int(qid)
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
      raise TypeError(f"question_ids[{i}] must be a non-empty string or an int, got {qid!r:.80}")
    ids.append(qid)
  seen = set()
  for qid in ids:
    if qid in seen:
      raise ValueError(f"duplicate question id {qid!r}")
    seen.add(qid)
  return ids


def _tstamp(tstamp: Optional[float]) -> float:
  return time.time() if tstamp is None else float(tstamp)


def write_alpaca_eval(path: str | os.PathLike, instructions: Sequence[str],
                      outputs: Sequence[str], generator: str, *,
                      dataset: Optional[str | Sequence[str]] = None) -> None:
  """AlpacaEval 2 model outputs: a JSON list, one {"instruction", "output", "generator"
  [, "dataset"]} per instruction, in the given order. `dataset`: one name for all, or one per
  instruction (the eval set's own, e.g. "helpful_base")."""
  _check_name("generator", generator)
  if isinstance(dataset, str):
    _check_name("dataset", dataset)
  if isinstance(instructions, str) or not len(instructions):
    raise ValueError(f"instructions must be a non-empty sequence of strings, got "
                     f"{instructions!r:.80}")
  _check_texts("instructions", instructions, len(instructions))
  _check_texts("outputs", outputs, len(instructions))
  if dataset is None or isinstance(dataset, str):
    datasets = [dataset] * len(instructions)
  else:
    _check_texts("dataset", dataset, len(instructions))
    datasets = list(dataset)
  records = []
  for instruction, output, name in zip(instructions, outputs, datasets):
    record = {"instruction": instruction, "output": output, "generator": generator}
    if name is not None:
      record["dataset"] = name
    records.append(record)
  fileio.atomic_write(path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")


def write_arena_hard(path: str | os.PathLike, question_ids: Sequence[str], outputs: Sequence[str],
                     model_id: str, token_lens: Optional[Sequence[int]] = None, *,
                     tstamp: Optional[float] = None) -> None:
  """Arena-Hard v0.1 answer JSONL, one single-turn answer a question.

  `token_lens[i]` is the answer's length in tokens (Arena-Hard's own generator counts
  tiktoken gpt-3.5-turbo tokens; our tokenizer's count is a close stand-in); left out of the
  file when None. `tstamp` (seconds since the epoch) defaults to now.
  """
  _check_name("model_id", model_id)
  question_ids = _check_question_ids(question_ids)
  _check_texts("outputs", outputs, len(question_ids))
  if token_lens is not None:
    if len(token_lens) != len(question_ids):
      raise ValueError(f"token_lens has {len(token_lens)} entries for {len(question_ids)} answers")
    for i, n in enumerate(token_lens):
      if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise TypeError(f"token_lens[{i}] must be a non-negative int, got {n!r}")
  stamp = _tstamp(tstamp)
  records = []
  for i, (qid, output) in enumerate(zip(question_ids, outputs)):
    turn = {"content": output}
    if token_lens is not None:
      turn["token_len"] = int(token_lens[i])
    records.append({"question_id": qid, "answer_id": answer_id(model_id, qid),
                    "model_id": model_id, "choices": [{"index": 0, "turns": [turn]}],
                    "tstamp": stamp})
  fileio.atomic_write(path, _jsonl(records))


def write_mt_bench(path: str | os.PathLike, question_ids: Sequence[Any],
                   turns_outputs: Sequence[Sequence[str]], model_id: str, *,
                   tstamp: Optional[float] = None) -> None:
  """MT-Bench (FastChat llm_judge) answer JSONL: `turns_outputs[i]` holds the answers to
  question i's turns, in order. Integer question ids (MT-Bench's own) stay integers."""
  _check_name("model_id", model_id)
  question_ids = _check_question_ids(question_ids)
  if isinstance(turns_outputs, str) or len(turns_outputs) != len(question_ids):
    raise ValueError(f"turns_outputs must hold one list of turns for each of the "
                     f"{len(question_ids)} questions")
  for i, turns in enumerate(turns_outputs):
    if isinstance(turns, str) or not len(turns):
      raise ValueError(f"turns_outputs[{i}] must be a non-empty list of strings, got {turns!r:.80}")
    _check_texts(f"turns_outputs[{i}]", turns, len(turns))
  stamp = _tstamp(tstamp)
  records = [{"question_id": qid, "answer_id": answer_id(model_id, qid), "model_id": model_id,
              "choices": [{"index": 0, "turns": list(turns)}], "tstamp": stamp}
             for qid, turns in zip(question_ids, turns_outputs)]
  fileio.atomic_write(path, _jsonl(records))


def _require(obj: dict, key: str, types: tuple, where: str, *, non_empty: bool = False) -> Any:
  if key not in obj:
    raise ValueError(f"{where}: missing field {key!r}")
  value = obj[key]
  if isinstance(value, bool) or not isinstance(value, types) or (non_empty and not value):
    names = " or ".join(t.__name__ for t in types)
    raise ValueError(f"{where}: field {key!r} must be {names}"
                     f"{' (non-empty)' if non_empty else ''}, got {value!r:.80}")
  return value


def validate_alpaca_eval(path: str | os.PathLike) -> list[dict]:
  """Checks an AlpacaEval model-outputs file; returns its records."""
  try:
    records = json.loads(fileio.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(records, list) or not records:
    raise ValueError(f"{path}: must hold a non-empty JSON list of outputs")
  for i, record in enumerate(records):
    where = f"{path}: item {i}"
    if not isinstance(record, dict):
      raise ValueError(f"{where}: must be an object, got {type(record).__name__}")
    for key in ("instruction", "output", "generator"):
      _require(record, key, (str,), where, non_empty=key == "generator")
    if "dataset" in record:
      _require(record, "dataset", (str,), where)
  return records


def _read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict]]:
  rows = []
  for line_number, line in enumerate(fileio.iter_lines(path), start=1):
    where = f"{path}:{line_number}"
    if not line.strip():
      raise ValueError(f"{where}: blank line")
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{where}: must be an object, got {type(row).__name__}")
    rows.append((where, row))
  if not rows:
    raise ValueError(f"{path}: no answers (empty file)")
  return rows


def _validate_answers(path: str | os.PathLike, check_turn: Callable[[Any, str], None],
                      qid_types: tuple) -> list[dict]:
  """Fields shared by Arena-Hard and MT-Bench answers; `check_turn(turn, where)` per turn."""
  rows = _read_jsonl(path)
  first_line: dict[Any, str] = {}
  model_ids = set()
  for where, row in rows:
    qid = _require(row, "question_id", qid_types, where)
    if qid in first_line:
      raise ValueError(f"{where}: field 'question_id' {qid!r} repeats {first_line[qid]}")
    first_line[qid] = where
    _require(row, "answer_id", (str,), where, non_empty=True)
    model_ids.add(_require(row, "model_id", (str,), where, non_empty=True))
    _require(row, "tstamp", (int, float), where)
    choices = _require(row, "choices", (list,), where, non_empty=True)
    for c, choice in enumerate(choices):
      at = f"{where}: choices[{c}]"
      if not isinstance(choice, dict):
        raise ValueError(f"{at}: must be an object")
      _require(choice, "index", (int,), at)
      turns = _require(choice, "turns", (list,), at, non_empty=True)
      for t, turn in enumerate(turns):
        check_turn(turn, f"{at}.turns[{t}]")
  if len(model_ids) > 1:
    # Both judges name the model after the file, so one file must hold one model's answers.
    raise ValueError(f"{path}: field 'model_id' differs between lines: {sorted(model_ids)}")
  return [row for _, row in rows]


def _arena_hard_turn(turn: Any, where: str) -> None:
  if not isinstance(turn, dict):
    raise ValueError(f"{where}: must be an object with 'content'")
  _require(turn, "content", (str,), where)
  if "token_len" in turn:
    n = _require(turn, "token_len", (int,), where)
    if n < 0:
      raise ValueError(f"{where}: field 'token_len' must be >= 0, got {n}")


def _mt_bench_turn(turn: Any, where: str) -> None:
  if not isinstance(turn, str):
    raise ValueError(f"{where}: must be a string, got {type(turn).__name__}")


def validate_arena_hard(path: str | os.PathLike) -> list[dict]:
  """Checks an Arena-Hard v0.1 answer JSONL; returns its records."""
  return _validate_answers(path, _arena_hard_turn, (str,))


def validate_mt_bench(path: str | os.PathLike) -> list[dict]:
  """Checks a FastChat MT-Bench answer JSONL; returns its records."""
  return _validate_answers(path, _mt_bench_turn, (int, str))


def win_rate(rewards_new, rewards_ref) -> float:
  """Fraction of prompts where the new policy's reward beats the reference's; a tie counts 1/2.

  Args:
    rewards_new, rewards_ref: [P] rewards of the two policies' answers to the same P prompts.
  """
  new_P = np.asarray(rewards_new, dtype=np.float64)
  ref_P = np.asarray(rewards_ref, dtype=np.float64)
  if new_P.ndim != 1 or new_P.shape != ref_P.shape or new_P.size == 0:
    raise ValueError(f"need two non-empty [P] reward arrays of one shape, got {new_P.shape} "
                     f"and {ref_P.shape}")
  if not (np.isfinite(new_P).all() and np.isfinite(ref_P).all()):
    raise ValueError("rewards must be finite")
  return float(np.mean((new_P > ref_P) + 0.5 * (new_P == ref_P)))


def generate_answers(sample_fn: Callable[[list[str]], Sequence[str]], prompts: Sequence[str], *,
                     batch_size: Optional[int] = None) -> list[str]:
  """Answers to `prompts` from `sample_fn(batch_of_prompts) -> answers`, in order.

  `batch_size` splits the calls (all prompts at once when None). Checks each call returns one
  string per prompt.
  """
  _check_texts("prompts", prompts, len(prompts))
  if batch_size is not None and (isinstance(batch_size, bool)
                                 or not isinstance(batch_size, int) or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
  step = batch_size or max(len(prompts), 1)
  answers: list[str] = []
  for start in range(0, len(prompts), step):
    batch = list(prompts[start:start + step])
    out = list(sample_fn(batch))
    if len(out) != len(batch):
      raise ValueError(f"sample_fn returned {len(out)} answers for {len(batch)} prompts "
                       f"(prompts {start}..{start + len(batch) - 1})")
    _check_texts(f"sample_fn answers for prompts {start}..", out, len(batch))
    answers.extend(out)
  return answers
