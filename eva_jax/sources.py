"""Prompt sources, picked by name (`data.source`): where the base and held-out prompts come from.

A source gives
- `base_prompts(iteration)`: iteration t's fresh base prompts (a new chunk every
  iteration, like new human prompts), each a `Prompt` carrying the dataset's own id;
- `heldout()`: the evaluation prompts, never among any iteration's base prompts;
- `sft_examples(num, max_level)`: (prompt, answer) pairs for the warm-start (synthetic only);
- `checker`: a programmatic reward (prompt, response) -> float, or None;
- `evolver(creator_cfg)`: its own programmatic evolver, or None.

Sources: "synthetic" (the verifiable tasks of `eva_jax.synthetic`), "jsonl" (a prompt file,
`data.path`) and "tfds" (a prepared `prompt_set/<config>` in `data.data_dir`). File and tfds
prompts are shuffled once with the seed; the held-out prompts are a fixed slice of that order
and every iteration takes its own chunk of the rest, so held-out and training prompts are
disjoint by construction, and a set too small for the requested iterations is refused here,
before any compute.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

from eva_jax import registry, synthetic


# The `eva_jax.data.PromptExample` fields `data.topic_field` may name.
TOPIC_FIELDS = ("source", "category", "cluster")


class Prompt(NamedTuple):
  """One prompt. id: the dataset's own id (Arena-Hard `question_id`), None for synthetic
  prompts; level: the synthetic difficulty level of a held-out prompt (0 elsewhere); topic: what
  creator.selection "topic_weighted" balances (the synthetic task name, or a prompt file's
  `data.topic_field`), None when the source has none."""
  text: str
  id: Optional[str] = None
  level: int = 0
  topic: Optional[str] = None


def prompts_per_iteration(data_cfg, creator_cfg) -> int:
  """Base prompts drawn per iteration. The static baseline draws as many extra fresh prompts as
  eva evolves, so both choose their train.num_pairs pairs from pools of about the same size."""
  if creator_cfg.enabled:
    return data_cfg.num_prompts
  return data_cfg.num_prompts + int(round(data_cfg.num_prompts * creator_cfg.fraction
                                          * creator_cfg.num_evolutions))


# Prompt sources by name: factory(data_cfg, *, seed, count, iterations) -> source, where count
# is `prompts_per_iteration` and iterations the number of eva iterations.
SOURCES = registry.Registry("prompt source")


@SOURCES.register("synthetic")
class SyntheticSource:
  """The embedded default's verifiable tasks, with their checker and evolver."""

  name = "synthetic"
  checker: Callable[[str, str], float] = staticmethod(synthetic.reward)

  def __init__(self, data_cfg, *, seed: int, count: int, iterations: int):
    del iterations  # Synthetic prompts never run out.
    self.seed, self.count, self.max_level = seed, count, data_cfg.max_level
    self.heldout_per_level = data_cfg.heldout_per_level

  def base_prompts(self, iteration: int) -> list[Prompt]:
    texts = synthetic.base_prompts(self.count, self.seed * 1000 + iteration,
                                   max_level=self.max_level)
    return [Prompt(p, topic=synthetic.parse_prompt(p)[0].name) for p in texts]

  def heldout(self) -> list[Prompt]:
    # Disjoint from every training prompt by synthetic's hash partition.
    return [Prompt(p, None, level, task)
            for p, level, task in synthetic.heldout_set(self.seed + 10_000,
                                                        self.heldout_per_level)]

  def sft_examples(self, num: int, max_level: int) -> list[tuple[str, str]]:
    return synthetic.sft_examples(num, self.seed, max_level=max_level)

  def evolver(self, creator_cfg) -> synthetic.SyntheticEvolver:
    return synthetic.SyntheticEvolver(depth_prob=creator_cfg.depth_prob,
                                      num_chained=creator_cfg.num_evolutions)


class DatasetSource:
  """A fixed prompt set, shuffled once with the seed: the held-out prompts are its last
  `heldout_count` prompts in that order, iteration t's base prompts the t-th chunk of the rest.
  Each prompt's topic is its example's `topic_field` (one of TOPIC_FIELDS; "" = no topics)."""

  checker = None

  def __init__(self, name: str, examples, *, seed: int, heldout_count: int, count: int,
               iterations: int, where: str, topic_field: str = ""):
    self.name = name
    total = len(examples)
    needed = heldout_count + iterations * count
    if total < needed:
      raise ValueError(
          f"{where}: has {total} prompts, but {heldout_count} held-out (data.heldout_per_level) "
          f"+ {iterations} iterations x {count} prompts per iteration need {needed}; use a "
          "larger prompt set or fewer iterations / prompts")
    if topic_field and topic_field not in TOPIC_FIELDS:
      raise ValueError(f"data.topic_field: {topic_field!r} is not a prompt field; expected one "
                       f"of {TOPIC_FIELDS} or '' (no topics)")
    # A row without the field ("" category) has no topic; a set where no row has one is an error.
    topics = [(getattr(e, topic_field) or None) if topic_field else None for e in examples]
    if topic_field and not any(topics):
      raise ValueError(f"{where}: no prompt has a {topic_field!r} (data.topic_field)")
    order = np.random.default_rng([seed, 0]).permutation(total)
    ordered = [Prompt(examples[i].text, examples[i].id, topic=topics[i]) for i in order]
    self._train, self._heldout = ordered[:total - heldout_count], ordered[total - heldout_count:]
    self.count = count

  def base_prompts(self, iteration: int) -> list[Prompt]:
    start = iteration * self.count
    if not 0 <= start <= len(self._train) - self.count:
      raise ValueError(f"prompt source {self.name!r}: iteration {iteration} needs training "
                       f"prompts {start}..{start + self.count} of {len(self._train)}")
    return self._train[start:start + self.count]

  def heldout(self) -> list[Prompt]:
    return list(self._heldout)

  def sft_examples(self, num: int, max_level: int) -> list[tuple[str, str]]:
    del num, max_level
    return []

  def evolver(self, creator_cfg) -> None:
    del creator_cfg


def _load(spec: str, data_dir: Optional[str] = None):
  from eva_jax import data  # Deferred: tensorflow_datasets is slow to import.
  # Every process reads the whole set: they all make the same (host-side) decisions.
  return data.load_prompts(spec, data_dir=data_dir, process_index=0, process_count=1)


@SOURCES.register("jsonl")
def jsonl_source(data_cfg, *, seed: int, count: int, iterations: int) -> DatasetSource:
  """Prompts from a file (`data.path`: .jsonl, .json, .txt or .parquet)."""
  return DatasetSource("jsonl", _load(data_cfg.path), seed=seed,
                       heldout_count=data_cfg.heldout_per_level, count=count,
                       iterations=iterations, where=f"data.path: prompt file {data_cfg.path!r}",
                       topic_field=data_cfg.topic_field)


@SOURCES.register("tfds")
def tfds_source(data_cfg, *, seed: int, count: int, iterations: int) -> DatasetSource:
  """A prepared tfds prompt set: `data.path` "prompt_set/<config>[:<version>]" in
  `data.data_dir` (tfds' default folder when empty); see `eva_jax.data.prepare_prompt_set`."""
  return DatasetSource("tfds", _load(data_cfg.path, data_cfg.data_dir or None), seed=seed,
                       heldout_count=data_cfg.heldout_per_level, count=count,
                       iterations=iterations, where=f"data.path: prompt set {data_cfg.path!r}",
                       topic_field=data_cfg.topic_field)


def make(config):
  """The config's prompt source (`data.source`), sized for `iterations` iterations."""
  return SOURCES.get(config.data.source)(
      config.data, seed=config.seed, count=prompts_per_iteration(config.data, config.creator),
      iterations=config.iterations)
