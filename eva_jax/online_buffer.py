"""The online loop's prompt buffer and schedule: which prompts each step trains on, which leave.

The buffer holds every prompt the run has seen in a `PromptBuffer` (text, lineage, latest
informativeness) and, for the prompts still *active*, an `Entry`: its pool, visits, latest
informativeness and mean reward, and how many visits in a row gave no signal. Two pools:

  base     prompts from the source, refilled in source order up to `base_pool` prompts;
  evolved  the creator's rewrites (eva), or under `static` fresh source prompts in the same
           slots; at most `evolved_pool`, the oldest leaving first ("capacity").

A step draws `draw` P prompts: P − round-half-up(base_ratio · P) evolved slots (as many as the
pool has), the rest base. Within a pool the unvisited prompts come first, in the order they
joined; the other slots are drawn without replacement with probability ∝ informativeness +
info_floor (the floor keeps a no-signal prompt drawable, so that it can be seen again and
leave). After scoring, `record` stores each group's informativeness; `evict` removes the
solved (mean reward ≥ solved_reward) and the stale (visits ≥ max_visits, or
max_zero_visits visits in a row with informativeness 0).

The whole buffer, with the source cursor and the run's budget counters, round-trips through
`to_json` / `from_json`: the loop saves it beside each checkpoint, so no draw depends on state
that is not saved (every rng comes from (seed, step, stage)).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

from eva_jax.buffer import PromptBuffer, PromptRecord

# Why a prompt leaves the buffer (`OnlineBuffer.evict`, `OnlineBuffer.trim`).
EVICTION_REASONS = ("solved", "no_signal", "max_visits", "capacity")


@dataclasses.dataclass
class Entry:
  """An active prompt's record in the schedule."""
  pool: str
  added: int  # The step it joined.
  visits: int = 0
  info: Optional[float] = None  # Latest informativeness (None before its first visit).
  mean_reward: Optional[float] = None  # Of its latest group.
  zero_streak: int = 0  # Visits in a row with informativeness 0.


def is_evolve_step(step: int, *, warmup_steps: int, evolve_every: int) -> bool:
  """Whether the creator runs after online step `step` (0-based): after the warm-up's
  `warmup_steps` steps, then every `evolve_every` steps (steps warmup − 1, warmup − 1 + every,
  ...)."""
  done = step + 1
  return done >= warmup_steps and (done - warmup_steps) % evolve_every == 0


def slot_counts(num: int, base_ratio: float, evolved_available: int) -> tuple[int, int]:
  """(base, evolved) prompts of a batch of `num`: the evolved slots are
  num − round-half-up(base_ratio · num), as many as the pool has; base prompts fill the rest."""
  evolved = min(num - math.floor(base_ratio * num + 0.5), evolved_available)
  return num - evolved, evolved


def weighted_order(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A draw without replacement, each pick with probability w_i / Σ of the remaining w:
  Efraimidis–Spirakis keys Exp(1) / w_i, smallest first. Weights must be positive."""
  return np.argsort(rng.exponential(size=len(weights)) / weights, kind="stable")


class SourceStream:
  """The source's base prompts as one stream: chunk c = `source.base_prompts(c)`, read in
  order from a cursor (the prompts consumed so far)."""

  def __init__(self, source):
    self.source = source
    self._chunks: dict[int, list[str]] = {}

  def _chunk(self, c: int) -> list[str]:
    if c not in self._chunks:
      self._chunks[c] = [p.text for p in self.source.base_prompts(c)]
    return self._chunks[c]

  def take(self, num: int, cursor: int, skip: Callable[[str], bool]) -> tuple[list[str], int]:
    """Up to `num` texts from `cursor` on, leaving out those `skip` refuses (already in the
    buffer) -> (texts, the new cursor)."""
    out = []
    while len(out) < num:
      size = len(self._chunk(0))
      text = self._chunk(cursor // size)[cursor % size]
      cursor += 1
      if not skip(text):
        out.append(text)
    return out, cursor


class OnlineBuffer:
  """Every prompt seen (`records`), the active ones (`active`, in the order they joined), the
  source cursor and the run's counters (budget, evictions)."""

  def __init__(self, records: Optional[PromptBuffer] = None,
               active: Optional[dict[str, Entry]] = None, cursor: int = 0,
               counters: Optional[dict] = None):
    self.records = records if records is not None else PromptBuffer()
    self.active = dict(active or {})
    self.cursor = cursor
    self.counters = dict(counters or {})
    self._texts = {r.text for r in self.records}

  # --- membership ------------------------------------------------------------------------------

  def pool(self, name: str) -> list[str]:
    return [i for i, e in self.active.items() if e.pool == name]

  def has_text(self, text: str) -> bool:
    return text in self._texts

  def add_base(self, texts: Sequence[str], *, step: int, pool: str = "base") -> list[str]:
    ids = []
    for text in texts:
      ids.append(self.records.add(text, iteration=step).id)
      self._texts.add(text)
      self.active[ids[-1]] = Entry(pool=pool, added=step)
    return ids

  def add_evolved(self, records: Sequence[PromptRecord], *, step: int) -> None:
    """Records `creator.evolve_round` already put in `self.records` join the evolved pool."""
    for r in records:
      self._texts.add(r.text)
      self.active[r.id] = Entry(pool="evolved", added=step)

  def refill(self, stream: SourceStream, capacity: int, *, step: int,
             pool: str = "base") -> list[str]:
    """Fresh source prompts until `pool` holds `capacity` (or `capacity` more for a pool of
    fresh prompts in the evolved slots: pass the count as capacity)."""
    missing = capacity - len(self.pool(pool))
    if missing <= 0:
      return []
    texts, self.cursor = stream.take(missing, self.cursor, self.has_text)
    return self.add_base(texts, step=step, pool=pool)

  # --- the step's batch, its scores, evictions -------------------------------------------------

  def draw(self, num: int, *, base_ratio: float, info_floor: float,
           rng: np.random.Generator) -> list[str]:
    """`num` distinct active ids: the base picks, then the evolved ones (module docstring)."""
    base, evolved = self.pool("base"), self.pool("evolved")
    num_base, num_evolved = slot_counts(num, base_ratio, len(evolved))
    if num_base > len(base):
      raise ValueError(f"draw: {num_base} base prompts needed, the base pool holds {len(base)}")
    return self._pick(base, num_base, info_floor, rng) + self._pick(evolved, num_evolved,
                                                                    info_floor, rng)

  def _pick(self, ids: list[str], num: int, info_floor: float, rng) -> list[str]:
    unvisited = [i for i in ids if self.active[i].visits == 0][:num]
    visited = [i for i in ids if self.active[i].visits > 0]
    weights = np.array([self.active[i].info + info_floor for i in visited], np.float64)
    rest = [visited[j] for j in weighted_order(weights, rng)[:num - len(unvisited)]] \
        if visited else []
    return unvisited + rest

  def record(self, ids: Sequence[str], rewards_PxK: np.ndarray, info_P: np.ndarray) -> None:
    self.records.record_scores(ids, rewards_PxK, info_P)
    for i, rewards_K, info in zip(ids, np.asarray(rewards_PxK), np.asarray(info_P)):
      e = self.active[i]
      e.visits += 1
      e.info, e.mean_reward = float(info), float(np.mean(rewards_K))
      e.zero_streak = e.zero_streak + 1 if info == 0 else 0

  def evict(self, ids: Sequence[str], *, solved_reward: float, max_visits: int,
            max_zero_visits: int) -> dict[str, int]:
    """Removes the solved and stale prompts among `ids` -> {reason: count}."""
    reasons = dict.fromkeys(EVICTION_REASONS[:3], 0)
    for i in ids:
      e = self.active.get(i)
      if e is None:
        continue
      if e.mean_reward is not None and e.mean_reward >= solved_reward:
        reason = "solved"
      elif e.zero_streak >= max_zero_visits:
        reason = "no_signal"
      elif e.visits >= max_visits:
        reason = "max_visits"
      else:
        continue
      del self.active[i]
      reasons[reason] += 1
    return reasons

  def trim(self, pool: str, capacity: int) -> int:
    """The oldest prompts of `pool` leave until it holds `capacity`; returns how many left."""
    ids = self.pool(pool)
    for i in ids[:max(0, len(ids) - capacity)]:
      del self.active[i]
    return max(0, len(ids) - capacity)

  # --- what the creator and the logs read --------------------------------------------------------

  def visited(self) -> list[str]:
    return [i for i, e in self.active.items() if e.visits > 0]

  def depth(self, prompt_id: str) -> int:
    """Evolutions between a prompt and its base prompt (0 for a base prompt)."""
    d, r = 0, self.records.get(prompt_id)
    while r.parent_id is not None:
      d, r = d + 1, self.records.get(r.parent_id)
    return d

  def stats(self) -> dict:
    infos = np.array([e.info for e in self.active.values() if e.info is not None])
    depths = [self.depth(i) for i in self.pool("evolved")]
    q = np.quantile(infos, [0.1, 0.5, 0.9]) if infos.size else [float("nan")] * 3
    return {"buffer_size": len(self.active), "buffer_evolved": len(self.pool("evolved")),
            "buffer_evolved_share": len(self.pool("evolved")) / max(1, len(self.active)),
            "buffer_unvisited": len(self.active) - len(self.visited()),
            "info_q10": float(q[0]), "info_q50": float(q[1]), "info_q90": float(q[2]),
            "lineage_depth_mean": float(np.mean(depths)) if depths else 0.0,
            "lineage_depth_max": max(depths, default=0), "prompts_seen": len(self.records)}

  # --- persistence ------------------------------------------------------------------------------

  def to_json(self) -> dict:
    return {"records": [r.to_json() for r in self.records],
            "active": {i: dataclasses.asdict(e) for i, e in self.active.items()},
            "cursor": self.cursor, "counters": self.counters}

  @classmethod
  def from_json(cls, obj: dict) -> "OnlineBuffer":
    records = PromptBuffer(PromptRecord.from_json(r) for r in obj["records"])
    return cls(records, {i: Entry(**e) for i, e in obj["active"].items()}, obj["cursor"],
               obj["counters"])
