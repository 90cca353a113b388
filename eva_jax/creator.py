"""The creator: which prompts to evolve, and one evolution round.

eva's creator step (DESIGN.md, "create"): score every prompt's informativeness from the N rewards
of its sampled responses (`informativeness`), pick a fraction of the prompts biased towards the
informative ones (`select`), rewrite each picked prompt through an `Evolver` (the LM evolver asks
its creator model with the meta-prompts of `eva_jax.templates`), drop bad rewrites
(`eva_jax.filters`) and keep the rest in the prompt buffer with their provenance
(`evolve_round`). `mix_pairs` then mixes base-prompt and evolved-prompt
preference pairs for training.

Randomness: functions that draw take `rng`, primarily an int seed (derived from
(config.seed, iteration, stage), so every process of a multi-host run draws the same selection);
a `numpy.random.Generator` (advanced in place) or a JAX PRNG key are accepted as well.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Hashable, Optional, Protocol, Sequence, runtime_checkable

import jax
import numpy as np

from eva_jax import filters, registry
from eva_jax.buffer import PromptBuffer, PromptRecord

log = logging.getLogger(__name__)

NUM_STRATA = 10


# ----------------------------------------------------------------------------- informativeness


def _minmax(x_P: np.ndarray) -> np.ndarray:
  """(x - min) / (max - min); all zeros when every value is equal."""
  spread = x_P.max() - x_P.min()
  return (x_P - x_P.min()) / spread if spread > 0 else np.zeros_like(x_P)


def _gap(r_PxN):
  return r_PxN.max(axis=1) - r_PxN.min(axis=1)


def _loo(r_PxN):
  num = r_PxN.shape[1]
  others_mean_PxN = (r_PxN.sum(axis=1, keepdims=True) - r_PxN) / (num - 1)
  # The signed leave-one-out advantages of a prompt always average to exactly 0, so the metric
  # averages their magnitudes.
  return np.abs(r_PxN - others_mean_PxN).mean(axis=1)


def _dts(r_PxN):
  top2_Px2 = -np.sort(-r_PxN, axis=1)[:, :2]
  return top2_Px2[:, 0] - top2_Px2[:, 1]


# Informativeness metrics by name: [P, N] float64 rewards -> [P] scores.
INFORMATIVENESS = registry.Registry("informativeness metric")
INFORMATIVENESS.register("gap", _gap)
INFORMATIVENESS.register("var", lambda r: r.var(axis=1))
INFORMATIVENESS.register("mean", lambda r: r.mean(axis=1))
INFORMATIVENESS.register("maxmean", lambda r: r.max(axis=1) - r.mean(axis=1))
INFORMATIVENESS.register("loo", _loo)
INFORMATIVENESS.register("dts", _dts)
INFORMATIVENESS.register("gap_inv", lambda r: 1.0 - _minmax(_gap(r)))
INFORMATIVENESS.register("mean_inv", lambda r: 1.0 - _minmax(r.mean(axis=1)))
METRICS = INFORMATIVENESS.names()


def informativeness(rewards, metric: str = "gap") -> np.ndarray:
  """Per-prompt informativeness from the rewards of its sampled responses.

  Args:
    rewards: [P, N] rewards, N >= 2 responses per prompt (NumPy or JAX array, any float dtype).
    metric: one of `METRICS`, with r the N rewards of one prompt:
      gap       max r - min r (eva's default),
      var       population variance of r,
      mean      mean of r,
      maxmean   max r - mean r,
      loo       mean over i of |r_i - mean_{j != i} r_j|, the mean magnitude of the
                leave-one-out advantage (N / (N - 1) times the mean absolute deviation).
                The authors' `reward_loo` (`leave_one_out` in their src/reward_hf.py) is
                the mean of the signed advantages, mean_i (r_i - mean_{j != i} r_j), which is
                0 for every prompt: with S = sum r, the advantages sum to
                S - (N S - S) / (N - 1) = 0. Their values are float rounding noise (~1e-17),
                and their sampler min-max normalises the metric over the prompts, so their
                `loo` ablation selected by that noise; ours keeps the magnitudes,
      dts       best minus second-best reward (0 when the top two tie),
      gap_inv   1 - gap min-max normalised over the P prompts,
      mean_inv  1 - mean min-max normalised over the P prompts
      (a normalised vector whose values are all equal is all zeros, so its inverse is all ones).
      For N = 2, gap, loo and dts coincide.

  Returns:
    [P] float64 NumPy array.
  """
  rewards_PxN = np.asarray(rewards, dtype=np.float64)
  if rewards_PxN.ndim != 2 or rewards_PxN.shape[0] < 1:
    raise ValueError(f"rewards must be a [P, N] array with P >= 1, got shape {rewards_PxN.shape}")
  if rewards_PxN.shape[1] < 2:
    raise ValueError(f"informativeness needs N >= 2 rewards per prompt, got N = "
                     f"{rewards_PxN.shape[1]}")
  bad_P = ~np.isfinite(rewards_PxN).all(axis=1)
  if bad_P.any():
    raise ValueError(f"non-finite rewards for prompt index(es) "
                     f"{np.flatnonzero(bad_P)[:20].tolist()}")
  return INFORMATIVENESS.get(metric)(rewards_PxN)


# ----------------------------------------------------------------------------------- selection


def numpy_rng(rng) -> np.random.Generator:
  """A NumPy Generator from an int seed (primary), a Generator (returned as is) or a JAX key."""
  if isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    if rng < 0:
      raise ValueError(f"seed must be >= 0, got {rng}")
    return np.random.default_rng(int(rng))
  if isinstance(rng, jax.Array):
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return np.random.default_rng(np.asarray(rng, dtype=np.uint32).ravel().tolist())
  raise TypeError(f"rng must be an int seed, a numpy Generator or a JAX PRNG key, got "
                  f"{type(rng).__name__}")


def num_selected(num_prompts: int, fraction: float) -> int:
  """max(1, round(fraction * num_prompts)), rounding halves up (0.25 * 10 = 2.5 -> 3)."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)):
    raise TypeError(f"fraction must be a float, got {fraction!r}")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  return max(1, math.floor(fraction * num_prompts + 0.5))


def _draw_weighted(weights_P, num, gen):
  # Efraimidis-Spirakis: with E_i ~ Exp(1), the order of the keys E_i / w_i is distributed exactly
  # as successive draws without replacement with probability w_i / (sum of the remaining w).
  # Weight-0 keys are +inf, so those prompts come only after every positive-weight one, in a
  # uniformly random order (the permutation breaks their ties).
  exp_P = gen.exponential(size=weights_P.size)
  keys_P = np.full(weights_P.size, np.inf)
  positive_P = weights_P > 0
  keys_P[positive_P] = exp_P[positive_P] / weights_P[positive_P]
  return np.lexsort((gen.permutation(weights_P.size), keys_P))[:num]


def _score_weights(scores_P):
  """The min-max normalised scores as a distribution (uniform when every score is equal)."""
  minmax_P = _minmax(scores_P)
  total = minmax_P.sum()
  return minmax_P / total if total > 0 else np.full(scores_P.size, 1.0 / scores_P.size)


def _select_weighted(scores_P, num, gen):
  return _draw_weighted(_score_weights(scores_P), num, gen)


def _select_greedy(scores_P, num, gen):
  del gen  # deterministic: highest scores first, lower index first among ties
  return np.lexsort((np.arange(scores_P.size), -scores_P))[:num]


def _select_uniform(scores_P, num, gen):
  return gen.choice(scores_P.size, size=num, replace=False)


def _select_stratified(scores_P, num, gen):
  num_bins = min(NUM_STRATA, scores_P.size)
  # Quantile bins by rank: equal-count bins of the score order (sizes differ by at most 1), ties
  # ordered at random, so heavily tied scores still fill every bin.
  bins = np.array_split(np.lexsort((gen.permutation(scores_P.size), scores_P)), num_bins)
  sizes_B = np.array([b.size for b in bins])
  quota_B = np.minimum(num // num_bins, sizes_B)
  while (left := num - quota_B.sum()) > 0:
    # The remainder goes one draw each to random bins that still have prompts to give.
    spare = np.flatnonzero(quota_B < sizes_B)
    quota_B[gen.choice(spare, size=min(left, spare.size), replace=False)] += 1
  return np.concatenate([gen.choice(b, size=q, replace=False) for b, q in zip(bins, quota_B)])


def _check_topic_coef(topic_coef) -> None:
  if (isinstance(topic_coef, bool) or not isinstance(topic_coef, (int, float, np.floating))
      or not 0.0 <= topic_coef <= 1.0):
    raise ValueError(f"topic_coef must be a number in [0, 1], got {topic_coef!r}")


def topic_weights(scores, topics: Sequence[Hashable], topic_coef: float = 0.25) -> np.ndarray:
  """The draw weights of "topic_weighted" selection: [P] float64, summing to 1.

  weights = (1 - topic_coef) * w + topic_coef * v, with w the min-max normalised scores divided
  by their sum (uniform when every score is equal) and v the inverse topic frequencies
  P / count(topic_i) divided by their sum. That sum is P x (number of distinct topics T), so
  v_i = 1 / (T count(topic_i)): each topic gets topic_coef / T of the mass, shared evenly by its
  prompts. The eva authors' `iw_topic` sampling, which they ran with topic_coef 0.25.

  Args:
    scores: [P] informativeness.
    topics: one hashable per prompt (None counts as a topic of its own).
    topic_coef: in [0, 1]; 0 gives the weights of "weighted", 1 balances topics alone.
  """
  scores_P = np.asarray(scores, dtype=np.float64)
  _check_topic_coef(topic_coef)
  if topics is None:
    raise ValueError("selection method 'topic_weighted' needs topics, one per prompt")
  topics = list(topics)
  if len(topics) != scores_P.size:
    raise ValueError(f"topics must hold one topic per prompt: got {len(topics)} for "
                     f"{scores_P.size} scores")
  counts = collections.Counter(topics)
  inverse_P = 1.0 / (len(counts) * np.array([counts[t] for t in topics], dtype=np.float64))
  return (1.0 - topic_coef) * _score_weights(scores_P) + topic_coef * inverse_P


def _select_topic_weighted(scores_P, num, gen, *, topics, topic_coef):
  return _draw_weighted(topic_weights(scores_P, topics, topic_coef), num, gen)


# Selection methods by name: (scores [P], how many, numpy Generator) -> indices; the ones in
# TOPIC_METHODS also take keyword arguments topics and topic_coef.
SELECTORS = registry.Registry("selection method")
SELECTORS.register("weighted", _select_weighted)
SELECTORS.register("greedy", _select_greedy)
SELECTORS.register("uniform", _select_uniform)
SELECTORS.register("stratified", _select_stratified)
SELECTORS.register("topic_weighted", _select_topic_weighted)
SELECTION_METHODS = SELECTORS.names()
TOPIC_METHODS = ("topic_weighted",)


def select(scores, *, fraction: float, method: str = "weighted", rng,
           topics: Optional[Sequence[Hashable]] = None, topic_coef: float = 0.25) -> np.ndarray:
  """Picks which prompts to evolve.

  Args:
    scores: [P] informativeness.
    fraction: in (0, 1]; picks `num_selected(P, fraction)` = max(1, round-half-up(fraction * P)).
    method: one of `SELECTION_METHODS`:
      weighted    without replacement, each draw with probability proportional to the min-max
                  normalised score among the prompts left; the lowest-scoring prompts have
                  weight 0 and are drawn (uniformly) only once every positive-weight prompt is in;
      greedy      the highest scores, ties by lower index (ignores rng);
      uniform     uniformly without replacement;
      stratified  10 equal-count quantile bins of the scores, equal draws from each as far as
                  the count allows (the remainder to random bins), uniform within a bin;
      topic_weighted  like weighted, by the weights `topic_weights(scores, topics, topic_coef)`:
                  a blend of the normalised scores and the inverse topic frequency (rare topics
                  get drawn too); topic_coef 0 draws exactly the indices of weighted.
      When every score is equal (P > 1) the other methods fall back to uniform, with a
      warning; topic_weighted keeps its topic part and makes its score part uniform.
    rng: int seed (primary), numpy Generator or JAX PRNG key; the same seed gives the same pick.
    topics: one hashable per prompt (e.g. `sources.Prompt.topic`); required by topic_weighted,
      unused by the others.
    topic_coef: in [0, 1], topic_weighted's share of the topic part (the eva authors': 0.25).

  Returns:
    [K] int64 sorted distinct prompt indices.
  """
  scores_P = np.asarray(scores, dtype=np.float64)
  if scores_P.ndim != 1 or scores_P.size == 0:
    raise ValueError(f"scores must be a non-empty [P] array, got shape {scores_P.shape}")
  bad_P = ~np.isfinite(scores_P)
  if bad_P.any():
    raise ValueError(f"non-finite scores at prompt index(es) {np.flatnonzero(bad_P)[:20].tolist()}")
  _check_topic_coef(topic_coef)
  select_fn = SELECTORS.get(method)
  if method in TOPIC_METHODS:
    select_fn = functools.partial(select_fn, topics=topics, topic_coef=topic_coef)
  num = num_selected(scores_P.size, fraction)
  gen = numpy_rng(rng)
  if (scores_P.size > 1 and scores_P.max() == scores_P.min()
      and method not in ("uniform",) + TOPIC_METHODS):
    log.warning("all %d informativeness scores equal %g: selecting uniformly instead of %r",
                scores_P.size, scores_P[0], method)
    select_fn = SELECTORS.get("uniform")
  return np.sort(select_fn(scores_P, num, gen)).astype(np.int64)


# ------------------------------------------------------------------------------------ evolving


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One rewrite proposed by an Evolver.

  Attributes:
    text: the new prompt (None when the reply could not be parsed).
    parent_id: buffer id of the selected prompt its chain starts from.
    method: the evolution method (a template name, or the evolver's own name for it).
    step: 1-based position in the chain; step s rewrites step s - 1 (step 1 rewrites the parent).
    chain: tells apart several chains grown from the same parent.
  """

  text: Optional[str]
  parent_id: str
  method: str
  step: int
  chain: int = 0


@runtime_checkable
class Evolver(Protocol):
  """Proposes rewrites of selected prompts: every step of every chain, in any order."""

  def evolve(self, prompts: Sequence[PromptRecord], *, rng: Any,
             iteration: int) -> list[Candidate]:
    ...


# Evolvers by name: factory(creator_cfg, *, source, policy, progress) -> Evolver, where
# creator_cfg is the config's `creator` section, source an `eva_jax.sources` prompt source,
# policy the current `eva_jax.stages.Policy` and progress a bar factory (the protocol of
# `eva_jax.stages.no_progress`). eva_jax.lm_evolver registers "lm".
EVOLVERS = registry.Registry("evolver")


@EVOLVERS.register("synthetic")
def source_evolver(creator_cfg, *, source, policy, progress=None) -> Evolver:
  """The prompt source's own programmatic evolver (the synthetic tasks have one; it is fast and
  shows no bar)."""
  del policy, progress
  evolver = source.evolver(creator_cfg)
  if evolver is None:
    raise ValueError(f"creator.evolver 'synthetic': prompt source {source.name!r} has no "
                     "evolver of its own; use 'lm'")
  return evolver


def _chains(candidates: Sequence[Candidate], selected: set[str]) -> list[list[Candidate]]:
  """Groups candidates by (parent_id, chain) in order of first appearance, sorted by step."""
  chains = collections.defaultdict(list)
  for cand in candidates:
    if cand.parent_id not in selected:
      raise ValueError(f"candidate of parent {cand.parent_id!r}, which was not selected")
    chains[(cand.parent_id, cand.chain)].append(cand)
  ordered = []
  for (parent_id, chain), members in chains.items():
    members.sort(key=lambda c: c.step)
    if [c.step for c in members] != list(range(1, len(members) + 1)):
      raise ValueError(f"chain {chain} of {parent_id!r} must hold steps 1..{len(members)}, got "
                       f"{[c.step for c in members]}")
    ordered.append(members)
  return ordered


def evolve_round(buffer: PromptBuffer, selected_ids: Sequence[str], evolver: Evolver, *,
                 rng: Any, iteration: int, tokenizer_len_fn: Callable[[str], int],
                 rejections: Optional[dict] = None, **filter_kwargs) -> list[PromptRecord]:
  """Evolves the selected prompts, filters the rewrites and adds the survivors to `buffer`.

  Each candidate is filtered against the text it was rewritten from (the latest earlier step of
  its chain with a text, or the selected prompt: a step without one, an unusable reply, does not
  move the chain on) and against the buffer. A survivor's parent is its nearest
  surviving ancestor in the chain (the selected prompt if none survived).

  Args:
    buffer: the prompt buffer; survivors are added in chain order.
    selected_ids: ids of the prompts to evolve.
    evolver: an `Evolver`; `rng` and `iteration` are passed to it unchanged.
    tokenizer_len_fn, **filter_kwargs: forwarded to `eva_jax.filters.filter_candidates`.
    rejections: a dict that receives {reason: count} of the rejected candidates (the reasons
      the filters gave), for the run's report; None: not returned.

  Returns:
    The added records; empty, with a warning, when nothing survived (the iteration then trains
    on the base prompts alone).
  """
  unknown = [prompt_id for prompt_id in selected_ids if prompt_id not in buffer]
  if unknown or len(set(selected_ids)) != len(selected_ids):
    raise ValueError(f"selected ids must be distinct ids in the buffer; unknown: {unknown[:10]}, "
                     f"{len(selected_ids) - len(set(selected_ids))} repeated")
  selected = [buffer.get(prompt_id) for prompt_id in selected_ids]
  if not selected:
    log.warning("iteration %d: no prompts selected, nothing to evolve", iteration)
    return []
  chains = _chains(evolver.evolve(selected, rng=rng, iteration=iteration),
                   {r.id for r in selected})
  flat, parents = [], []
  for chain in chains:
    parent_text = buffer.get(chain[0].parent_id).text
    for cand in chain:
      flat.append(cand)
      parents.append(parent_text)
      if cand.text is not None:
        parent_text = cand.text
  kept, rejected = filters.filter_candidates(
      [c.text for c in flat], parents, (r.text for r in buffer),
      tokenizer_len_fn=tokenizer_len_fn, **filter_kwargs)
  kept = set(kept)
  added = []
  for position, cand in enumerate(flat):  # chain by chain, each from step 1
    if cand.step == 1:
      parent_id = cand.parent_id
    if position in kept:
      record = buffer.add(cand.text, iteration=iteration, method=cand.method,
                          parent_id=parent_id, step=cand.step)
      added.append(record)
      parent_id = record.id
  reasons = dict(collections.Counter(reason for _, reason in rejected))
  if rejections is not None:
    rejections.update(reasons)
  if not added:
    log.warning("iteration %d: none of %d evolved prompts survived the filters (%s); training "
                "on the base prompts", iteration, len(flat), reasons)
  else:
    log.info("iteration %d: kept %d of %d evolved prompts; rejected %s", iteration, len(added),
             len(flat), reasons)
  return added


def mix_pairs(base_items: Sequence, evolved_items: Sequence, *, base_ratio: float = 0.2,
              rng, total: Optional[int] = None) -> list:
  """Mixes base-prompt and evolved-prompt training pairs by ratio, shuffled.

  n_base = round-half-up(base_ratio * total) items are drawn from `base_items` and
  total - n_base from `evolved_items`, both without replacement, then shuffled together.
  With `total` None it is the largest total both sides can supply at that ratio: when evolved
  pairs are the short side (the usual case) all of them are used and base pairs are subsampled,
  and vice versa. With no evolved pairs at all (nothing survived the filters) the result is every
  base pair, shuffled, with a warning. A `total` larger than the sides allow is an error.
  """
  if isinstance(base_ratio, bool) or not 0.0 <= base_ratio <= 1.0:
    raise ValueError(f"base_ratio must be in [0, 1], got {base_ratio!r}")
  gen = numpy_rng(rng)
  if not evolved_items:
    log.warning("no evolved pairs to mix: training on the %d base pairs only", len(base_items))
    return [base_items[i] for i in gen.permutation(len(base_items))]

  def split(n):
    n_base = math.floor(base_ratio * n + 0.5)
    return n_base, n - n_base

  def fits(n):
    n_base, n_evolved = split(n)
    return n_base <= len(base_items) and n_evolved <= len(evolved_items)

  if total is None:
    # Both parts of split(n) grow by 0 or 1 with n, so the totals that fit are 0..max: bisect.
    lo, hi = 0, len(base_items) + len(evolved_items)
    while lo < hi:
      mid = (lo + hi + 1) // 2
      lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    total = lo
  elif isinstance(total, bool) or not isinstance(total, int) or total < 0 or not fits(total):
    raise ValueError(f"total={total!r} needs {split(total) if isinstance(total, int) else '?'} "
                     f"(base, evolved) pairs at base_ratio={base_ratio}, have "
                     f"({len(base_items)}, {len(evolved_items)})")
  n_base, n_evolved = split(total)
  mixed = ([base_items[i] for i in gen.choice(len(base_items), n_base, replace=False)] +
           [evolved_items[i] for i in gen.choice(len(evolved_items), n_evolved, replace=False)])
  return [mixed[i] for i in gen.permutation(len(mixed))]
