"""Verifiable synthetic text tasks for the embedded default: prompts, answers, rewards, evolution.

Every prompt is short plain text that describes itself, so the answer (and the reward) follows
from the prompt text alone:

  copy: 3 9 1               -> 3 9 1
  reverse: 3 9 1            -> 1 9 3
  sort: 3 9 1               -> 1 3 9
  inc: 3 9 1                -> 4 0 2        (each digit + 1, mod 10)
  count 3: 3 9 3 1          -> 2            (occurrences of the digit before the colon)
  add: 47 + 385             -> 432
  sort then reverse: 3 9 1  -> 9 3 1        (list operations applied left to right)

Difficulty levels run from 1 to MAX_LEVEL. A single list operation on n digits has level n - 2;
a two-operation chain on n digits has level n - 1 (one level above a single operation on as many
digits); `add` with operands of a and b digits has level a + b - 1.

Held-out prompts are kept apart from every training prompt by a hash partition of the prompt
space (`is_heldout`): generators and the evolver never emit a held-out prompt, whatever their seed.
The seed streams differ too (`_rng(seed, stream)`), so held-out sampling is independent of
training sampling.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import Any, Mapping, Sequence

import numpy as np

MAX_LEVEL = 6
LIST_OPS = ("copy", "reverse", "sort", "inc")
BASE_TASKS = LIST_OPS + ("count", "add")
# Two-operation chains the generators use. Left out: anything with copy (same as the other op),
# reverse-reverse (copy) and reverse-then-sort (same as sort).
COMPOSITIONS = (("sort", "reverse"), ("reverse", "inc"), ("inc", "reverse"), ("sort", "inc"),
                ("inc", "sort"))
TASK_NAMES = BASE_TASKS + tuple(" then ".join(ops) for ops in COMPOSITIONS)

# One prompt in HELDOUT_MODULUS (by a stable hash of its text) is reserved for evaluation.
HELDOUT_MODULUS = 5
# Seed streams: the same user seed gives independent generators for each use.
_STREAM_TRAIN, _STREAM_SFT, _STREAM_HELDOUT = 0, 1, 2
# Rejection sampling bound per prompt; the held-out partition rejects 1 draw in 5 on average.
_MAX_ATTEMPTS = 64

_ADD_RE = re.compile(r"^(\d+) \+ (\d+)$")


@dataclasses.dataclass(frozen=True)
class Task:
  """A task spec: `name` (one of TASK_NAMES, or any chain "op then op ..."), its difficulty
  `level`, and `params`: {"length": digits in the list} for list and count tasks,
  {"digits_a": .., "digits_b": ..} (operand digit counts) for add."""

  name: str
  level: int
  params: Mapping[str, int]

  def __hash__(self):
    return hash((self.name, self.level, tuple(sorted(self.params.items()))))


def _ops_of(name: str) -> tuple[str, ...]:
  """The list operations of a list-task name, () for count and add."""
  return () if name in ("count", "add") else tuple(name.split(" then "))


def tasks_at_level(level: int) -> tuple[str, ...]:
  """Names of the generated tasks that exist at `level` (chains need level >= 2)."""
  if level < 1:
    raise ValueError(f"level must be >= 1, got {level}")
  return BASE_TASKS if level == 1 else TASK_NAMES


def task_spec(name: str, level: int) -> Task:
  """The canonical Task of `name` at `level` (see the module docstring for the size rules)."""
  if name not in TASK_NAMES:
    raise ValueError(f"unknown synthetic task {name!r}; expected one of {TASK_NAMES}")
  if name not in tasks_at_level(level):
    raise ValueError(f"task {name!r} does not exist at level {level} (chains start at level 2)")
  if name == "add":
    return Task(name, level, {"digits_a": (level + 2) // 2, "digits_b": (level + 1) // 2})
  num_ops = len(_ops_of(name)) or 1
  return Task(name, level, {"length": level + 3 - num_ops})


def _list_level(num_ops: int, length: int, prompt_text: str) -> int:
  level = length - 3 + num_ops
  if level < 1:
    raise ValueError(f"list too short for level 1 ({4 - num_ops} digits needed with "
                     f"{num_ops} operation(s)): {prompt_text!r}")
  return level


def _format(name: str, inputs: Mapping[str, Any]) -> str:
  if name == "add":
    return f"add: {inputs['a']} + {inputs['b']}"
  digits = " ".join(str(d) for d in inputs["digits"])
  if name == "count":
    return f"count {inputs['target']}: {digits}"
  return f"{name}: {digits}"


def parse_prompt(prompt_text: str) -> tuple[Task, dict[str, Any]]:
  """Reads a synthetic prompt back into (Task, inputs).

  inputs: {"digits": [int]} for list tasks, plus {"target": int} for count, {"a": int, "b": int}
  for add. Raises ValueError for text that is not a synthetic prompt.
  """
  if not isinstance(prompt_text, str):
    raise TypeError(f"prompt must be a str, got {type(prompt_text).__name__}")
  head, sep, body = prompt_text.strip().partition(":")
  words, body = head.split(), body.strip()
  if not sep or not words or not body:
    raise ValueError(f"not a synthetic prompt (expected 'task: inputs'): {prompt_text!r}")
  if words == ["add"]:
    match = _ADD_RE.match(body)
    if not match:
      raise ValueError(f"add prompt needs 'add: A + B' with integers: {prompt_text!r}")
    a, b = match.groups()
    params = {"digits_a": len(a), "digits_b": len(b)}
    return Task("add", len(a) + len(b) - 1, params), {"a": int(a), "b": int(b)}
  tokens = body.split()
  if not all(len(t) == 1 and t.isdigit() for t in tokens):
    raise ValueError(f"list prompt needs single digits separated by spaces: {prompt_text!r}")
  digits = [int(t) for t in tokens]
  if words[0] == "count":
    if len(words) != 2 or not (len(words[1]) == 1 and words[1].isdigit()):
      raise ValueError(f"count prompt needs 'count D: digits': {prompt_text!r}")
    task = Task("count", _list_level(1, len(digits), prompt_text), {"length": len(digits)})
    return task, {"target": int(words[1]), "digits": digits}
  ops, separators = words[0::2], words[1::2]
  if any(s != "then" for s in separators) or len(words) % 2 == 0 or any(
      op not in LIST_OPS for op in ops):
    raise ValueError(f"unknown task {head!r} in {prompt_text!r}; list operations are "
                     f"{LIST_OPS} joined by 'then'")
  level = _list_level(len(ops), len(digits), prompt_text)
  task = Task(" then ".join(ops), level, {"length": len(digits)})
  return task, {"digits": digits}


def _apply(op: str, digits: list[int]) -> list[int]:
  if op == "copy":
    return list(digits)
  if op == "reverse":
    return digits[::-1]
  if op == "sort":
    return sorted(digits)
  return [(d + 1) % 10 for d in digits]  # inc


def solve(prompt_text: str) -> str:
  """The exact answer text of a synthetic prompt."""
  task, inputs = parse_prompt(prompt_text)
  if task.name == "add":
    return str(inputs["a"] + inputs["b"])
  if task.name == "count":
    return str(inputs["digits"].count(inputs["target"]))
  digits = inputs["digits"]
  for op in _ops_of(task.name):
    digits = _apply(op, digits)
  return " ".join(str(d) for d in digits)


def reward(prompt_text: str, response_text: str) -> float:
  """Graded credit in [0, 1] of a response; 1.0 exactly for the answer, 0.0 for an empty one.

  Surrounding whitespace of the response is ignored. Credit per answer kind:
    lists (copy, reverse, sort, inc, chains): whitespace-separated tokens matched position by
      position, divided by max(len(response tokens), len(answer tokens)) so that missing and
      extra tokens both cost;
    add: characters matched right-aligned (units with units), divided by the longer length;
    count: 1 - |n - answer| / list length (floored at 0) for an integer n, else 0.
  """
  task, inputs = parse_prompt(prompt_text)
  answer, response = solve(prompt_text), response_text.strip()
  if not response:
    return 0.0
  if task.name == "count":
    if not (response.isascii() and response.isdigit()):
      return 0.0
    return max(0.0, 1.0 - abs(int(response) - int(answer)) / len(inputs["digits"]))
  if task.name == "add":
    matches = sum(g == t for g, t in zip(reversed(response), reversed(answer)))
    return matches / max(len(response), len(answer))
  got, want = response.split(), answer.split()
  return sum(g == t for g, t in zip(got, want)) / max(len(got), len(want))


def score_texts(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """Batch `reward`: prompts [B], responses [B] -> rewards float32 [B]."""
  if len(prompts) != len(responses):
    raise ValueError(f"score_texts got {len(prompts)} prompts but {len(responses)} responses")
  return np.asarray([reward(p, r) for p, r in zip(prompts, responses)], np.float32)


def is_heldout(prompt_text: str) -> bool:
  """True for prompts reserved for evaluation: a stable hash of the whitespace-normalised text."""
  key = " ".join(prompt_text.split()).encode()
  return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % HELDOUT_MODULUS == 0


def level_of(prompt_text: str) -> int:
  """Difficulty level of a synthetic prompt."""
  return parse_prompt(prompt_text)[0].level


def _random_number(num_digits: int, rng: np.random.Generator) -> int:
  if num_digits == 1:
    return int(rng.integers(0, 10))
  return int(rng.integers(10 ** (num_digits - 1), 10 ** num_digits))


def _random_inputs(task: Task, rng: np.random.Generator) -> dict[str, Any]:
  if task.name == "add":
    return {"a": _random_number(task.params["digits_a"], rng),
            "b": _random_number(task.params["digits_b"], rng)}
  digits = [int(d) for d in rng.integers(0, 10, size=task.params["length"])]
  if task.name != "count":
    return {"digits": digits}
  return {"target": _count_target(digits, rng), "digits": digits}


def _count_target(digits: list[int], rng: np.random.Generator) -> int:
  """Half the time a digit that occurs in the list, so that count answers are not mostly 0."""
  if rng.random() < 0.5:
    return digits[int(rng.integers(len(digits)))]
  return int(rng.integers(0, 10))


def make_prompt(task: Task, rng: np.random.Generator, *,
                heldout: bool = False) -> tuple[str, dict[str, Any]]:
  """Draws a prompt of `task` with random inputs -> (prompt_text, meta).

  meta: {"task": name, "level": level, "answer": answer text}. The prompt lies in the training
  part of the prompt space, or in the held-out part with `heldout=True`.
  """
  if task.name not in TASK_NAMES:
    raise ValueError(f"unknown synthetic task {task.name!r}; expected one of {TASK_NAMES}")
  for _ in range(_MAX_ATTEMPTS):
    text = _format(task.name, _random_inputs(task, rng))
    if is_heldout(text) == heldout:
      return text, {"task": task.name, "level": task.level, "answer": solve(text)}
  raise ValueError(f"could not draw a {'held-out' if heldout else 'training'} prompt for {task}")


def _fit_length(digits: list[int], length: int, rng: np.random.Generator) -> list[int]:
  """Inserts random digits at random places, or drops random places, until len == length."""
  digits = list(digits)
  while len(digits) < length:
    digits.insert(int(rng.integers(len(digits) + 1)), int(rng.integers(0, 10)))
  while len(digits) > length:
    digits.pop(int(rng.integers(len(digits))))
  return digits


def _deepen_once(task: Task, inputs: dict[str, Any], rng: np.random.Generator,
                 max_level: int) -> tuple[str, str]:
  """One harder child of a parsed prompt -> (child_text, method)."""
  if task.level >= max_level:
    # Difficulty saturates: same task at the cap, fresh inputs.
    return _format(task.name, _random_inputs(task, rng)), "depth:resample"
  if task.name == "add":
    a, b = str(inputs["a"]), str(inputs["b"])
    # Lengthen the shorter operand with a leading nonzero digit: level + 1, no leading zeros.
    lead = str(int(rng.integers(1, 10)))
    a, b = (lead + a, b) if len(a) <= len(b) else (a, lead + b)
    return _format("add", {"a": int(a), "b": int(b)}), "depth:digits"
  ops = _ops_of(task.name)
  # A single list operation may become a chain that contains it (any chain, for copy).
  chains = [c for c in COMPOSITIONS if len(ops) == 1 and (ops[0] in c or ops[0] == "copy")]
  methods = ["depth:longer"] + (["depth:compose"] if chains else [])
  method = methods[int(rng.integers(len(methods)))]
  if method == "depth:longer":
    inputs = dict(inputs, digits=_fit_length(inputs["digits"], len(inputs["digits"]) + 1, rng))
    return _format(task.name, inputs), method
  chain = " then ".join(chains[int(rng.integers(len(chains)))])
  return _format(chain, inputs), method


def _widen_once(task: Task, inputs: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
  """One sibling of a parsed prompt at the same level -> (child_text, method)."""
  names = [n for n in tasks_at_level(task.level) if n != task.name]
  name = names[int(rng.integers(len(names)))]
  sibling = task_spec(name, task.level)
  if name == "add" or task.name == "add":
    return make_prompt(sibling, rng)[0], "breadth:sibling"
  # Keep the parent's digits where the sibling is a list task too, fitted to its length.
  child = {"digits": _fit_length(inputs["digits"], sibling.params["length"], rng)}
  if name == "count":
    child["target"] = _count_target(child["digits"], rng)
  return _format(name, child), "breadth:sibling"


def _evolve_checked(prompt_text: str, rng: np.random.Generator, step) -> tuple[str, str]:
  """Retries a mutation until the child is new and in the training part of the prompt space."""
  task, inputs = parse_prompt(prompt_text)
  for _ in range(_MAX_ATTEMPTS):
    child, method = step(task, inputs, rng)
    if child != prompt_text.strip() and not is_heldout(child):
      return child, method
  raise ValueError(f"no new training prompt evolved from {prompt_text!r}")


def evolve_in_depth(prompt_text: str, rng: np.random.Generator, *,
                    max_level: int = MAX_LEVEL) -> str:
  """A harder prompt one level up: a longer list, a second list operation, or a longer add
  operand. At `max_level` the difficulty saturates and the child is the same task, new inputs."""
  return _evolve_checked(prompt_text, rng, functools.partial(_deepen_once, max_level=max_level))[0]


def evolve_in_breadth(prompt_text: str, rng: np.random.Generator) -> str:
  """A sibling prompt: a different task at the same level (reusing the digits of list tasks)."""
  return _evolve_checked(prompt_text, rng, _widen_once)[0]


@dataclasses.dataclass(frozen=True)
class SyntheticEvolver:
  """EvolInstruct mirrored on synthetic tasks, an `eva_jax.creator.Evolver`: each step is
  in-depth with probability `depth_prob`, else in-breadth; `num_chained` chained steps per
  selected prompt, every step kept."""

  depth_prob: float = 0.5
  max_level: int = MAX_LEVEL
  num_chained: int = 1

  def __post_init__(self):
    if not 0.0 <= self.depth_prob <= 1.0:
      raise ValueError(f"depth_prob must lie in [0, 1], got {self.depth_prob}")
    if self.num_chained < 1 or self.max_level < 1:
      raise ValueError(f"num_chained and max_level must be >= 1, got {self.num_chained}, "
                       f"{self.max_level}")

  def evolve_chain(self, prompt_text: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`num_chained` steps from one prompt -> [(child_text, method)], step s rewriting step s - 1;
    method is "depth:longer|compose|digits|resample" or "breadth:sibling"."""
    chain, parent = [], prompt_text.strip()
    for _ in range(self.num_chained):
      if rng.random() < self.depth_prob:
        step = functools.partial(_deepen_once, max_level=self.max_level)
      else:
        step = _widen_once
      parent, method = _evolve_checked(parent, rng, step)
      chain.append((parent, method))
    return chain

  def evolve(self, prompts, *, rng, iteration: int) -> list:
    """The `Evolver` interface: prompt records -> `eva_jax.creator.Candidate`s, one chain per
    record. `rng` (int seed, numpy Generator or JAX key) fixes every draw; `iteration` is unused,
    the caller folds it into `rng`."""
    from eva_jax import creator  # Deferred: keeps this module free of the JAX import.
    gen = creator.numpy_rng(rng)
    return [creator.Candidate(text=child, parent_id=record.id, method=method, step=step)
            for record in prompts
            for step, (child, method) in enumerate(self.evolve_chain(record.text, gen), 1)]


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([stream, seed])


def _draw_distinct(n: int, rng: np.random.Generator, pick_task, heldout: bool) -> list[str]:
  """n distinct prompts; prompt i is drawn from task pick_task(i, rng)."""
  seen, out = set(), []
  for i in range(n):
    for _ in range(_MAX_ATTEMPTS):
      text, _ = make_prompt(pick_task(i, rng), rng, heldout=heldout)
      if text not in seen:
        seen.add(text)
        out.append(text)
        break
    else:
      raise ValueError(f"could not draw {n} distinct prompts; ask for fewer or allow harder levels")
  return out


def _uniform_task(max_level: int):
  """Level uniform in 1..max_level, then a task uniform over those existing at that level."""
  if max_level < 1:
    raise ValueError(f"max_level must be >= 1, got {max_level}")

  def pick(_, rng):
    level = int(rng.integers(1, max_level + 1))
    names = tasks_at_level(level)
    return task_spec(names[int(rng.integers(len(names)))], level)
  return pick


def base_prompts(n: int, seed: int, max_level: int = 3) -> list[str]:
  """The static training prompt set: n distinct prompts, levels uniform in 1..max_level."""
  return _draw_distinct(n, _rng(seed, _STREAM_TRAIN), _uniform_task(max_level), False)


def sft_examples(n: int, seed: int, max_level: int = 2) -> list[tuple[str, str]]:
  """Warm-start pairs (prompt, exact answer) on easy levels, from their own seed stream."""
  texts = _draw_distinct(n, _rng(seed, _STREAM_SFT), _uniform_task(max_level), False)
  return [(text, solve(text)) for text in texts]


def heldout_set(seed: int, per_level: int,
                max_level: int = MAX_LEVEL) -> list[tuple[str, int, str]]:
  """Evaluation prompts: per_level distinct prompts at each level 1..max_level, the tasks of a
  level in round robin -> [(prompt, level, task_name)]. Disjoint from every training prompt
  (hash partition, see `is_heldout`) and drawn from its own seed stream."""
  specs = [task_spec(names[j % len(names)], level) for level in range(1, max_level + 1)
           for names in [tasks_at_level(level)] for j in range(per_level)]
  texts = _draw_distinct(len(specs), _rng(seed, _STREAM_HELDOUT), lambda i, _: specs[i], True)
  return [(text, spec.level, spec.name) for text, spec in zip(texts, specs)]
