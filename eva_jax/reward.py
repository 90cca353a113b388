"""Reward scoring: one interface for neural reward models and programmatic checkers.

Every scorer maps text pairs to one float32 reward per response:

  scorer.score(prompts [n], responses [n], truncated=None)           -> float32 [n]
  scorer.score_grouped(prompts [P], responses [P][N], truncated=None) -> float32 [P, N]

`truncated` (bool, same shape as the rewards) marks responses that hit the generation length
limit without an EOS; each such reward is lowered by the scorer's `truncated_penalty`. A
non-finite reward is an error naming the prompt index; an empty response is scored like any
other.

`NeuralScorer` renders each pair with the reward model's own tokenizer and chat template (which
may differ from the policy's) and runs `models.forward` of a `*ForSequenceClassification` model
in sharded, length-bucketed batches; `ArmoRMScorer` does the same with ArmoRM's gated head
(`eva_jax.models.armorm`). `ProgrammaticScorer` wraps a Python checker such as
`eva_jax.synthetic.reward`.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import logging
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from eva_jax import models, registry
from eva_jax import sharding as sharding_lib
from eva_jax.models import armorm

_log = logging.getLogger(__name__)

MIN_BUCKET = 16


class NonFiniteScoreError(ValueError):
  """A scorer produced NaN or inf; `index` is the flat index of the (prompt, response) pair."""

  def __init__(self, message: str, index: int):
    super().__init__(message)
    self.index = index


def _check_texts(prompts: Sequence[str], responses: Sequence[str]) -> None:
  for name, texts in (("prompts", prompts), ("responses", responses)):
    if isinstance(texts, str):
      raise TypeError(f"score: {name} must be a list of strings, got one string")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
      raise TypeError(f"score: {name}[{bad}] is {type(texts[bad]).__name__}, not str")
  if len(prompts) != len(responses):
    raise ValueError(f"score: got {len(prompts)} prompts but {len(responses)} responses")


def _truncated_mask(truncated, shape: tuple[int, ...]) -> np.ndarray:
  if truncated is None:
    return np.zeros(shape, bool)
  mask = np.asarray(truncated)
  if mask.shape != shape or mask.dtype != bool:
    raise ValueError(f"score: truncated must be a bool array of shape {shape}, got "
                     f"{mask.dtype} {mask.shape}")
  return mask


class Scorer(abc.ABC):
  """Text pairs -> rewards. Subclasses implement `_raw_scores`; the checks live here."""

  def __init__(self, *, truncated_penalty: float = 0.0):
    if not np.isfinite(truncated_penalty) or truncated_penalty < 0:
      raise ValueError(f"truncated_penalty must be finite and >= 0, got {truncated_penalty}")
    self.truncated_penalty = float(truncated_penalty)

  @abc.abstractmethod
  def _raw_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Rewards float32 [n] of n validated pairs, before the checks and the penalty."""

  def _checked(self, prompts, responses, where: Callable[[int], str]) -> np.ndarray:
    if not prompts:
      return np.zeros((0,), np.float32)
    scores_N = np.asarray(self._raw_scores(prompts, responses), np.float32)
    if scores_N.shape != (len(prompts),):
      raise ValueError(f"{type(self).__name__} returned shape {scores_N.shape} for "
                       f"{len(prompts)} pairs")
    bad = np.flatnonzero(~np.isfinite(scores_N))
    if bad.size:
      i = int(bad[0])
      raise NonFiniteScoreError(
          f"{type(self).__name__}: non-finite score {scores_N[i]} at {where(i)} "
          f"({bad.size} non-finite in all); prompt starts {prompts[i][:80]!r}", i)
    return scores_N

  def score(self, prompts: Sequence[str], responses: Sequence[str],
            truncated=None) -> np.ndarray:
    """Rewards float32 [n] for prompts [n] and responses [n]; truncated: bool [n] or None."""
    _check_texts(prompts, responses)
    mask_N = _truncated_mask(truncated, (len(prompts),))
    scores_N = self._checked(list(prompts), list(responses), lambda i: f"prompt index {i}")
    return (scores_N - np.float32(self.truncated_penalty) * mask_N).astype(np.float32)

  def score_grouped(self, prompts: Sequence[str], responses_PxN: Sequence[Sequence[str]],
                    truncated=None) -> np.ndarray:
    """Rewards float32 [P, N] for P prompts with N responses each; truncated: bool [P, N]."""
    if len(prompts) != len(responses_PxN):
      raise ValueError(f"score_grouped: got {len(prompts)} prompts but {len(responses_PxN)} "
                       "response groups")
    sizes = {len(group) for group in responses_PxN}
    if len(sizes) > 1:
      raise ValueError(f"score_grouped: every prompt needs the same number of responses, got "
                       f"group sizes {sorted(sizes)}")
    n = sizes.pop() if sizes else 0
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_responses = [r for group in responses_PxN for r in group]
    _check_texts(flat_prompts, flat_responses)
    mask_PxN = _truncated_mask(truncated, (len(prompts), n))
    scores = self._checked(flat_prompts, flat_responses,
                           lambda i: f"prompt index {i // n} (response {i % n})")
    scores_PxN = scores.reshape(len(prompts), n)
    return (scores_PxN - np.float32(self.truncated_penalty) * mask_PxN).astype(np.float32)


class ProgrammaticScorer(Scorer):
  """Wraps fn(prompt, response) -> float, e.g. the synthetic tasks' `eva_jax.synthetic.reward`."""

  def __init__(self, fn: Callable[[str, str], float], *, truncated_penalty: float = 0.0):
    super().__init__(truncated_penalty=truncated_penalty)
    if not callable(fn):
      raise TypeError(f"ProgrammaticScorer needs a callable, got {type(fn).__name__}")
    self.fn = fn

  def _raw_scores(self, prompts, responses) -> np.ndarray:
    return np.asarray([float(self.fn(p, r)) for p, r in zip(prompts, responses)], np.float32)


# --- neural reward models ---


def default_length_buckets(max_length: int) -> tuple[int, ...]:
  """Powers of two from 16 below max_length, then max_length itself."""
  buckets, b = [], MIN_BUCKET
  while b < max_length:
    buckets.append(b)
    b *= 2
  return tuple(buckets) + (max_length,)


def batch_buckets(batch_size: int, multiple: int) -> tuple[int, ...]:
  """Allowed batch sizes: multiple * 2^k below batch_size, then batch_size."""
  sizes, b = [], multiple
  while b < batch_size:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (batch_size,)


def _check_batching(batch_size: int, length_buckets: Sequence[int], mesh) -> int:
  """Validates the batching settings; returns the batch multiple the mesh needs."""
  multiple = 1 if mesh is None else sharding_lib.batch_multiple(mesh)
  if batch_size < 1 or batch_size % multiple:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of {multiple} (the "
                     "mesh's data*fsdp size)")
  if not length_buckets or list(length_buckets) != sorted(set(length_buckets)) \
      or length_buckets[0] < 1:
    raise ValueError(f"length_buckets must be increasing positive ints, got {length_buckets}")
  return multiple


def _bucket(n: int, buckets: Sequence[int]) -> int:
  return next(b for b in buckets if b >= n)


def plan_batches(lengths: Sequence[int], *, batch_size: int, length_buckets: Sequence[int],
                 batch_sizes: Sequence[int]) -> list[tuple[np.ndarray, int, int]]:
  """Groups sequences into padded batches: a list of (row indices, batch rows B, length T).

  Sequences are sorted by length and grouped by their length bucket, so a batch pads only to
  its own bucket; each group is cut into batches of `batch_size` rows, the last one padded up to
  the next allowed batch size. The compiled shapes are therefore at most
  len(length_buckets) * len(batch_sizes), whatever the inputs.
  """
  lengths = np.asarray(lengths, np.int64)
  order = np.argsort(lengths, kind="stable")
  buckets_N = np.asarray([_bucket(int(n), length_buckets) for n in lengths[order]])
  plan = []
  for t in np.unique(buckets_N):
    rows = order[buckets_N == t]
    for start in range(0, len(rows), batch_size):
      chunk = rows[start:start + batch_size]
      plan.append((chunk, _bucket(len(chunk), batch_sizes), int(t)))
  return plan


@functools.lru_cache(maxsize=None)
def _jitted_forward(config: models.ModelConfig, mesh, rules, head=None):
  """One jitted reward forward per (config, mesh, rules, ArmoRM head or None): the rules shape
  the trace (the model's activation constraints); scores come back replicated on every host."""
  del rules
  out = None if mesh is None else sharding_lib.replicated(mesh)
  fn = (functools.partial(models.forward, config) if head is None
        else functools.partial(armorm.forward, config, head))
  return jax.jit(fn, out_shardings=out)


def score_sequences(config: models.ModelConfig, params: dict, seqs: Sequence[Sequence[int]], *,
                    pad_id: int, batch_size: int, length_buckets: Sequence[int],
                    mesh=None, rules=sharding_lib.DEFAULT_RULES, head=None) -> np.ndarray:
  """Rewards float32 [n] of n token sequences, by a reward model (config.num_labels == 1), or
  with `head` (an `armorm.ArmoHeadConfig`) by ArmoRM, whose params are then {"model", "head"}.

  Each sequence must be non-empty and no longer than the largest length bucket. Batches are
  right-padded with `pad_id` (the model reads the score at each row's last real token, so the
  padding side does not matter) and, with a mesh, sharded over its data+fsdp axes; `batch_size`
  must then be a multiple of their size. Filler rows of a partial batch hold one pad token and
  are dropped from the result.
  """
  if head is None and config.num_labels != 1:
    raise ValueError(f"score_sequences needs a scalar reward model (num_labels == 1), got "
                     f"num_labels={config.num_labels}")
  multiple = _check_batching(batch_size, length_buckets, mesh)
  lengths = [len(s) for s in seqs]
  for i, n in enumerate(lengths):
    if not 0 < n <= length_buckets[-1]:
      raise ValueError(f"score_sequences: sequence {i} has {n} tokens; need 1.."
                       f"{length_buckets[-1]}")
  scores_N = np.zeros((len(seqs),), np.float32)
  if not seqs:
    return scores_N
  forward = _jitted_forward(config, mesh, rules, head)
  plan = plan_batches(lengths, batch_size=batch_size, length_buckets=length_buckets,
                      batch_sizes=batch_buckets(batch_size, multiple))
  placement = (sharding_lib.activation_rules(mesh, rules) if mesh is not None
               else contextlib.nullcontext())
  pending = []
  with placement:
    for rows, b, t in plan:
      tokens_BxT = np.full((b, t), pad_id, np.int32)
      mask_BxT = np.zeros((b, t), np.int32)
      mask_BxT[len(rows):, 0] = 1
      for r, i in enumerate(rows):
        tokens_BxT[r, :lengths[i]] = seqs[i]
        mask_BxT[r, :lengths[i]] = 1
      if mesh is not None:
        tokens_BxT, mask_BxT = sharding_lib.shard_batch((tokens_BxT, mask_BxT), mesh)
      # Dispatch is asynchronous: the next batch is built while this one runs.
      pending.append((rows, forward(params, tokens_BxT, mask_BxT)))
  for rows, out_B in pending:
    scores_N[rows] = np.asarray(out_B)[:len(rows)]
  return scores_N


def truncate_pair(full_ids: Sequence[int], prompt_ids: Optional[Sequence[int]], max_length: int,
                  bos_id: Optional[int] = None) -> list[int]:
  """Cuts a rendered (prompt, response) to max_length tokens.

  `prompt_ids` is the rendering of the prompt alone with the generation prompt; where it is a
  prefix of `full_ids` it splits them into a prompt part and a response part (the response text
  and the template's closing tokens). The response part keeps up to max_length - min(prompt,
  max_length // 2) tokens, cut from the right; the prompt part fills the rest and is cut from
  the left, after a leading bos (kept so the model still sees its start token). Where the prompt
  rendering is not a prefix (an unusual template), the whole sequence is cut from the left,
  keeping the end the score is read at.
  """
  full = list(full_ids)
  if len(full) <= max_length:
    return full
  head = full[:1] if bos_id is not None and full[0] == bos_id else []
  budget = max_length - len(head)
  if prompt_ids is None or list(prompt_ids) != full[:len(prompt_ids)]:
    return head + full[len(full) - budget:]
  split = max(len(head), len(prompt_ids))
  prompt, response = full[len(head):split], full[split:]
  keep_response = min(len(response), budget - min(len(prompt), budget // 2))
  keep_prompt = budget - keep_response
  return head + prompt[len(prompt) - keep_prompt:] + response[:keep_response]


class NeuralScorer(Scorer):
  """A `*ForSequenceClassification` reward model behind the Scorer interface.

  Each pair becomes the chat [{"role": "user", "content": prompt}, {"role": "assistant",
  "content": response}] rendered by the reward model's tokenizer (add_generation_prompt=False),
  cut to `max_length` tokens by `truncate_pair` (a warning counts the pairs cut), then scored by
  `score_sequences` with lengths padded to `length_buckets` (default: powers of two >= 16, and
  max_length). `tokenizer` needs `apply_chat_template(messages, add_generation_prompt=...)
  -> list[int]` and `pad_id` (and `bos_id`, if it has one) -- `eva_jax.models.tokenizer.Tokenizer`.
  With a mesh, params should already be placed on it (`hf.load(..., shardings=
  sharding.param_shardings_for(mesh, rules))`); `rules` are the run's logical-axis rules. `head`
  is for `ArmoRMScorer`, which sets it.
  """

  def __init__(self, config: models.ModelConfig, params: dict, tokenizer, *, max_length: int,
               batch_size: int, mesh=None, length_buckets: Optional[Sequence[int]] = None,
               truncated_penalty: float = 0.0, rules=sharding_lib.DEFAULT_RULES, head=None):
    super().__init__(truncated_penalty=truncated_penalty)
    if head is None and config.num_labels != 1:
      raise ValueError(f"NeuralScorer needs a scalar reward model (num_labels == 1), got "
                       f"num_labels={config.num_labels}")
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2, got {max_length}")
    buckets = tuple(length_buckets) if length_buckets else default_length_buckets(max_length)
    _check_batching(batch_size, buckets, mesh)
    if buckets[-1] < max_length:
      raise ValueError(f"length_buckets {buckets} must reach max_length {max_length}")
    self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
    self.max_length, self.batch_size, self.length_buckets = max_length, batch_size, buckets
    self.rules, self.head = rules, head

  def token_ids(self, prompt: str, response: str) -> list[int]:
    """The reward model's input ids for one pair, cut to max_length."""
    user = {"role": "user", "content": prompt}
    full = self.tokenizer.apply_chat_template(
        [user, {"role": "assistant", "content": response}], add_generation_prompt=False)
    if len(full) <= self.max_length:
      return list(full)
    prompt_ids = self.tokenizer.apply_chat_template([user], add_generation_prompt=True)
    return truncate_pair(full, prompt_ids, self.max_length,
                         getattr(self.tokenizer, "bos_id", None))

  def _raw_scores(self, prompts, responses) -> np.ndarray:
    seqs = [self.token_ids(p, r) for p, r in zip(prompts, responses)]
    cut = sum(len(s) == self.max_length for s in seqs)
    if cut:
      _log.warning("reward: %d of %d pairs reach max_length=%d tokens (longer ones were cut)",
                   cut, len(seqs), self.max_length)
    return score_sequences(self.config, self.params, seqs, pad_id=self.tokenizer.pad_id,
                           batch_size=self.batch_size, length_buckets=self.length_buckets,
                           mesh=self.mesh, rules=self.rules, head=self.head)


class ArmoRMScorer(NeuralScorer):
  """ArmoRM (`LlamaForRewardModelWithGating`, the eva paper's default) behind the Scorer
  interface: NeuralScorer's chat rendering, truncation and batching, scored by `armorm.forward`
  (its objectives mixed by a gate read at the prompt's end). `tokenizer` must encode
  `armorm.GATING_TEXT` as the head's gating pattern, as ArmoRM's own Llama 3 tokenizer does; the
  other arguments are NeuralScorer's.
  """

  def __init__(self, config: models.ModelConfig, params: dict, head: armorm.ArmoHeadConfig,
               head_params: dict, tokenizer, **kwargs):
    pattern = tuple(tokenizer.encode(armorm.GATING_TEXT))
    if pattern != tuple(head.gating_pattern):
      raise ValueError(f"ArmoRM: the tokenizer encodes {armorm.GATING_TEXT!r} as {pattern}, not "
                       f"as the head's gating pattern {tuple(head.gating_pattern)} (not "
                       "ArmoRM's Llama 3 tokenizer?)")
    super().__init__(config, {"model": params, "head": head_params}, tokenizer, head=head,
                     **kwargs)

  def token_ids(self, prompt: str, response: str) -> list[int]:
    ids = super().token_ids(prompt, response)
    try:
      armorm.gating_position(ids, self.head.gating_pattern)
    except ValueError as err:
      raise ValueError(f"{err}; the prompt starts {prompt[:80]!r}") from None
    return ids


def load_reward_model(path: str, *, dtype: str = "float32", mesh=None, max_length: int = 4096,
                      batch_size: int = 8, truncated_penalty: float = 0.0,
                      length_buckets: Optional[Sequence[int]] = None,
                      rules=sharding_lib.DEFAULT_RULES) -> NeuralScorer:
  """A NeuralScorer for a local HF `*ForSequenceClassification` folder and its tokenizer."""
  from eva_jax.models import hf, tokenizer as tokenizer_lib
  config, params = hf.load(path, dtype=dtype,
                           shardings=sharding_lib.param_shardings_for(mesh, rules))
  if not config.is_reward_model:
    raise ValueError(f"{path}: a causal LM, not a reward model (*ForSequenceClassification)")
  return NeuralScorer(config, params, tokenizer_lib.load_tokenizer(path), max_length=max_length,
                      batch_size=batch_size, mesh=mesh, length_buckets=length_buckets,
                      truncated_penalty=truncated_penalty, rules=rules)


def load_armorm(path: str, *, dtype: str = "float32", mesh=None, max_length: int = 4096,
                batch_size: int = 8, truncated_penalty: float = 0.0,
                length_buckets: Optional[Sequence[int]] = None,
                rules=sharding_lib.DEFAULT_RULES) -> ArmoRMScorer:
  """An ArmoRMScorer for a local ArmoRM folder and its tokenizer; the small head is replicated."""
  from eva_jax.models import tokenizer as tokenizer_lib
  config, params, head, head_params = armorm.load(
      path, dtype=dtype, shardings=sharding_lib.param_shardings_for(mesh, rules))
  if mesh is not None:
    head_params = jax.tree.map(
        lambda x: sharding_lib.put_global(x, sharding_lib.replicated(mesh)),
        head_params)
  return ArmoRMScorer(config, params, head, head_params, tokenizer_lib.load_tokenizer(path),
                      max_length=max_length, batch_size=batch_size, mesh=mesh,
                      length_buckets=length_buckets, truncated_penalty=truncated_penalty,
                      rules=rules)


# Scorers by name: factory(reward_cfg, *, source, dtype, mesh, rules) -> Scorer, where reward_cfg
# is the config's `reward` section, source an `eva_jax.sources` prompt source and rules the run's
# logical-axis rules (`sharding.rules_from_config`).
SCORERS = registry.Registry("scorer")


@SCORERS.register("synthetic")
def programmatic_scorer(reward_cfg, *, source, dtype=None, mesh=None,
                        rules=None) -> ProgrammaticScorer:
  """The prompt source's own checker (the synthetic tasks have one)."""
  del dtype, mesh, rules
  if source.checker is None:
    raise ValueError(f"reward.kind 'synthetic': prompt source {source.name!r} has no "
                     "programmatic checker; use 'neural'")
  return ProgrammaticScorer(source.checker, truncated_penalty=reward_cfg.truncated_penalty)


@SCORERS.register("neural")
def neural_scorer(reward_cfg, *, source=None, dtype: str = "float32", mesh=None,
                  rules=sharding_lib.DEFAULT_RULES) -> NeuralScorer:
  """The reward model in the local HF folder `reward_cfg.path`."""
  del source
  return load_reward_model(reward_cfg.path, dtype=dtype, mesh=mesh, rules=rules,
                           max_length=reward_cfg.max_length, batch_size=reward_cfg.batch_size,
                           truncated_penalty=reward_cfg.truncated_penalty)


@SCORERS.register("armorm")
def armorm_scorer(reward_cfg, *, source=None, dtype: str = "float32", mesh=None,
                  rules=sharding_lib.DEFAULT_RULES) -> ArmoRMScorer:
  """ArmoRM in the local HF folder `reward_cfg.path` (weights, config.json and tokenizer)."""
  del source
  return load_armorm(reward_cfg.path, dtype=dtype, mesh=mesh, rules=rules,
                     max_length=reward_cfg.max_length, batch_size=reward_cfg.batch_size,
                     truncated_penalty=reward_cfg.truncated_penalty)
