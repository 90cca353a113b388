"""The prompt buffer: every prompt the run has trained on, with where it came from.

Each prompt is a `PromptRecord`: a base prompt from the dataset has no parent and is its own root;
an evolved prompt points at the prompt it was rewritten from and at the base prompt its lineage
started with, and records the iteration, the evolution method and its step in the chain. After
scoring, a record also holds its informativeness and a summary of its responses' rewards.

Ids are `f"{iteration}-{n}"`, n counting the prompts added in that iteration, so the same adds in
the same order give the same ids after any number of restarts; a loaded buffer continues the
count. The buffer is saved as JSONL, one record a line in insertion order (parents before
children), written atomically (`fileio.atomic_write`) so a killed run never leaves a half-written
buffer.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from eva_jax import fileio

BASE_METHOD = "base"
_ID = re.compile(r"(\d+)-(\d+)")


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One prompt and its provenance.

  Attributes:
    id: stable id, `f"{iteration}-{n}"`.
    text: the prompt.
    parent_id: id of the prompt this one was rewritten from; None for a base prompt.
    root_id: id of the base prompt its lineage starts at (its own id for a base prompt).
    iteration: the iteration it was added in (0 for the dataset's prompts).
    method: evolution method that produced it (`BASE_METHOD` for base prompts).
    step: position in its evolution chain, 1 for the first rewrite; 0 for base prompts.
    informativeness: the creator's score from its latest scoring, None before any.
    reward_summary: {"mean", "max", "min", "std"} of its latest N rewards, None before any.
    extra: free-form JSON-serialisable data (e.g. the dataset's own question id).
  """

  id: str
  text: str
  parent_id: Optional[str]
  root_id: str
  iteration: int
  method: str
  step: int = 0
  informativeness: Optional[float] = None
  reward_summary: Optional[dict[str, float]] = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def is_base(self) -> bool:
    return self.parent_id is None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: dict[str, Any]) -> "PromptRecord":
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(obj, dict) or not required <= obj.keys() or not obj.keys() <= names:
      raise ValueError(f"not a prompt record (needs {sorted(required)}, allows {sorted(names)}): "
                       f"{obj!r:.200}")
    return cls(**obj)


def reward_summary(rewards_N) -> dict[str, float]:
  """mean / max / min / population std of one prompt's N rewards, as Python floats."""
  rewards_N = np.asarray(rewards_N, dtype=np.float64)
  if rewards_N.ndim != 1 or rewards_N.size == 0 or not np.isfinite(rewards_N).all():
    raise ValueError(f"need a non-empty 1-D array of finite rewards, got {rewards_N!r}")
  return {"mean": float(rewards_N.mean()), "max": float(rewards_N.max()),
          "min": float(rewards_N.min()), "std": float(rewards_N.std())}


class PromptBuffer:
  """Prompts in insertion order, by id."""

  def __init__(self, records: Iterable[PromptRecord] = ()):
    self._records: dict[str, PromptRecord] = {}
    self._next_n: collections.Counter = collections.Counter()
    for record in records:
      self._insert(record)

  def _insert(self, record: PromptRecord) -> None:
    if record.id in self._records:
      raise ValueError(f"duplicate prompt id {record.id!r}")
    if record.parent_id is None:
      if record.root_id != record.id:
        raise ValueError(f"base prompt {record.id!r} must be its own root, got {record.root_id!r}")
    else:
      if record.parent_id not in self._records:
        raise ValueError(f"prompt {record.id!r}: parent {record.parent_id!r} is not in the buffer")
      if record.root_id != self._records[record.parent_id].root_id:
        raise ValueError(f"prompt {record.id!r}: root {record.root_id!r} differs from its "
                         f"parent's root {self._records[record.parent_id].root_id!r}")
    self._records[record.id] = record
    match = _ID.fullmatch(record.id)
    if match and int(match.group(1)) == record.iteration:
      self._next_n[record.iteration] = max(self._next_n[record.iteration],
                                           int(match.group(2)) + 1)

  def add(self, text: str, *, iteration: int, method: str = BASE_METHOD,
          parent_id: Optional[str] = None, step: int = 0,
          extra: Optional[dict[str, Any]] = None) -> PromptRecord:
    """Adds a prompt and returns its record. A prompt with a parent inherits the parent's root."""
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"prompt text must be a non-empty string, got {text!r:.80}")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
      raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not isinstance(method, str) or not method:
      raise ValueError(f"method must be a non-empty string, got {method!r}")
    if (parent_id is None) != (method == BASE_METHOD):
      raise ValueError(f"method {method!r} with parent {parent_id!r}: base prompts (method "
                       f"{BASE_METHOD!r}) have no parent and evolved prompts need one")
    if parent_id is not None and parent_id not in self._records:
      raise ValueError(f"parent {parent_id!r} is not in the buffer")
    n = self._next_n[iteration]
    while f"{iteration}-{n}" in self._records:
      n += 1
    prompt_id = f"{iteration}-{n}"
    root_id = prompt_id if parent_id is None else self._records[parent_id].root_id
    record = PromptRecord(id=prompt_id, text=text, parent_id=parent_id, root_id=root_id,
                          iteration=iteration, method=method, step=step, extra=dict(extra or {}))
    self._insert(record)
    return record

  def get(self, prompt_id: str) -> PromptRecord:
    try:
      return self._records[prompt_id]
    except KeyError:
      raise KeyError(f"no prompt with id {prompt_id!r} in the buffer") from None

  def __len__(self) -> int:
    return len(self._records)

  def __iter__(self) -> Iterator[PromptRecord]:
    return iter(self._records.values())

  def __contains__(self, prompt_id: object) -> bool:
    return prompt_id in self._records

  def base_records(self) -> list[PromptRecord]:
    return [r for r in self if r.is_base]

  def evolved_records(self) -> list[PromptRecord]:
    return [r for r in self if not r.is_base]

  def lineage_counts(self, by: str = "method") -> dict[str, int]:
    """Number of evolved prompts per method, root id or iteration (by = "method" | "root" |
    "iteration"); base prompts are not counted."""
    fields = {"method": "method", "root": "root_id", "iteration": "iteration"}
    if by not in fields:
      raise ValueError(f"by must be one of {sorted(fields)}, got {by!r}")
    counts = collections.Counter(str(getattr(r, fields[by])) for r in self.evolved_records())
    return dict(sorted(counts.items()))

  def record_scores(self, prompt_ids: Sequence[str], rewards_PxN, informativeness_P) -> None:
    """Stores each prompt's informativeness and reward summary from its latest scoring."""
    rewards_PxN = np.asarray(rewards_PxN, dtype=np.float64)
    informativeness_P = np.asarray(informativeness_P, dtype=np.float64)
    num = len(prompt_ids)
    if rewards_PxN.ndim != 2 or rewards_PxN.shape[0] != num or informativeness_P.shape != (num,):
      raise ValueError(f"{num} ids need rewards [{num}, N] and informativeness [{num}], got "
                       f"{rewards_PxN.shape} and {informativeness_P.shape}")
    for prompt_id, rewards_N, score in zip(prompt_ids, rewards_PxN, informativeness_P):
      if not np.isfinite(score):
        raise ValueError(f"prompt {prompt_id!r}: informativeness {score} is not finite")
      self._records[prompt_id] = dataclasses.replace(
          self.get(prompt_id), informativeness=float(score),
          reward_summary=reward_summary(rewards_N))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the buffer as JSONL atomically (`fileio.atomic_write`; a local path or gs://)."""
    fileio.atomic_write(path, "".join(
        json.dumps(record.to_json(), ensure_ascii=False, allow_nan=False) + "\n"
        for record in self))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "PromptBuffer":
    """Reads a buffer written by `save`; a malformed line raises ValueError naming it."""
    buffer = cls()
    for line_number, line in enumerate(fileio.iter_lines(path), start=1):
      if not line.strip():
        continue
      try:
        buffer._insert(PromptRecord.from_json(json.loads(line)))
      except (ValueError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)}:{line_number}: {e}") from e
    return buffer
