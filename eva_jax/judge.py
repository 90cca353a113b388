"""LLM-as-judge: a generative reward read from a causal LM's distribution over a score scale.

For each (prompt, response) the judge model sees our judging request (`DEFAULT_TEMPLATE`, the
pair inserted) as one user turn of its own chat template, with the generation prompt. One
forward pass gives its next-token distribution at the start of the answer; the probabilities of
the scale's labels ("1" .. "10") are renormalised over the scale and the reward is the expected
score E[s] = sum_s s * P(s) / sum_s' P(s'). A real-text run then needs no separate reward model.

Labels that tokenise into two tokens (a digit-splitting tokenizer reads "10" as "1", "0") are
handled exactly in the same pass: the shared first token ("1") is appended to the sequence, and
the distribution after it splits P("1") into P("10") = P("1") P("0" | "1") and
P("1" as the whole score) = P("1") (1 - sum of the two-token labels' second tokens | "1").

Sequences are batched and padded like `reward.score_sequences` (length buckets, batch buckets,
optional mesh), so a run compiles a bounded number of shapes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eva_jax import models, reward
from eva_jax import sharding as sharding_lib
from eva_jax.models import hf
from eva_jax.models import tokenizer as tokenizer_lib

_log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = """You are grading how well an AI assistant answered a user.

The user wrote:
[USER REQUEST]
{prompt}
[END USER REQUEST]

The assistant answered:
[ASSISTANT ANSWER]
{response}
[END ASSISTANT ANSWER]

Judge the answer on helpfulness, correctness, depth and clarity. An empty, off-topic, wrong or \
evasive answer gets a low score; a complete, correct and clear answer gets a high score. Rate it \
on a scale of {low} to {high}. Reply with the number only."""


def _gather_last_two(config, params, tokens_BxT, mask_BxT, last_B, ids_K):
  """Log-probs [B, 2, K] of the token ids `ids_K` predicted at positions last - 1 and last."""
  hidden_BxTxD = models.forward_hidden(config, params, tokens_BxT, mask_BxT)
  pos_Bx2 = jnp.stack([jnp.maximum(last_B - 1, 0), last_B], axis=1)
  hidden_Bx2xD = jnp.take_along_axis(hidden_BxTxD, pos_Bx2[:, :, None], axis=1)
  logprobs_Bx2xV = jax.nn.log_softmax(models.logits_from_hidden(config, params, hidden_Bx2xD))
  return logprobs_Bx2xV[:, :, ids_K]


@functools.lru_cache(maxsize=None)
def _jitted(config: models.ModelConfig, mesh, rules):
  del rules  # A key of the cache only: the rules shape the trace (see `label_logprobs`).
  out = None if mesh is None else sharding_lib.replicated(mesh)
  return jax.jit(functools.partial(_gather_last_two, config), out_shardings=out)


class JudgeScorer(reward.Scorer):
  """A causal LM as judge behind the `reward.Scorer` interface (module docstring).

  Args:
    config, params, tokenizer: the judge (a causal LM) and its tokenizer, which needs
      `apply_chat_template(messages) -> ids`, `encode(text) -> ids`, `decode(ids) -> str` and
      `pad_id` (`eva_jax.models.tokenizer.Tokenizer`).
    template: the judging request; `{prompt}`, `{response}`, `{low}` and `{high}` are filled
      (other braces must be doubled, as in `str.format`).
    scale: the scores, ints or floats, each written as `str(score)` by the judge.
    max_length: most tokens per judged sequence; a longer pair has its prompt and response cut
      (the response keeps its start, the prompt its start; the request's wording is kept).
    batch_size: sequences per forward (a multiple of the mesh's data * fsdp size).
    mesh: shard batches over it (params already placed on it).
    rules: the run's logical-axis rules (`sharding.rules_from_config`).
    length_buckets: padded lengths (default: powers of two from 16, then max_length).
    truncated_penalty: see `reward.Scorer`.
  """

  def __init__(self, config: models.ModelConfig, params: dict, tokenizer, *,
               template: str = DEFAULT_TEMPLATE, scale: Sequence = range(1, 11),
               max_length: int = 2048, batch_size: int = 8, mesh=None,
               length_buckets: Optional[Sequence[int]] = None, truncated_penalty: float = 0.0,
               rules=sharding_lib.DEFAULT_RULES):
    super().__init__(truncated_penalty=truncated_penalty)
    if config.is_reward_model:
      raise ValueError("JudgeScorer needs a causal LM; the config is a reward model "
                       "(num_labels > 0)")
    for field in ("{prompt}", "{response}"):
      if field not in template:
        raise ValueError(f"JudgeScorer: the template must hold {field}")
    self.scale = np.asarray(list(scale), np.float64)
    if self.scale.size < 2 or len(set(self.scale.tolist())) != self.scale.size:
      raise ValueError(f"JudgeScorer: scale must hold at least two distinct scores, got "
                       f"{list(scale)}")
    buckets = (tuple(length_buckets) if length_buckets
               else reward.default_length_buckets(max_length))
    multiple = 1 if mesh is None else sharding_lib.batch_multiple(mesh)
    if batch_size < 1 or batch_size % multiple:
      raise ValueError(f"batch_size {batch_size} must be a positive multiple of {multiple}")
    if buckets != tuple(sorted(set(buckets))) or buckets[-1] < max_length:
      raise ValueError(f"length_buckets {buckets} must increase and reach max_length "
                       f"{max_length}")
    self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
    self.rules = rules
    self.template, self.max_length, self.batch_size = template, max_length, batch_size
    self.length_buckets, self._batch_sizes = buckets, reward.batch_buckets(batch_size, multiple)
    self._plan_labels([str(s) for s in scale])

  def _plan_labels(self, labels: list[str]) -> None:
    """Token ids of every label; two-token labels must share their first token."""
    ids = [list(self.tokenizer.encode(label)) for label in labels]
    longer = [seq for seq in ids if len(seq) > 1]
    if any(len(seq) not in (1, 2) for seq in ids) or len({seq[0] for seq in longer}) > 1 \
        or len({tuple(seq) for seq in ids}) != len(ids):
      raise ValueError(f"JudgeScorer: every scale label must be one token, or two tokens that "
                       f"share one first token; got {dict(zip(labels, ids))}")
    self._prefix_id = longer[0][0] if longer else None
    self._token_ids = np.asarray(sorted({t for seq in ids for t in seq}), np.int32)
    where = {t: k for k, t in enumerate(self._token_ids.tolist())}
    self._first_K = np.asarray([where[seq[0]] for seq in ids])
    self._second_K = np.asarray([where[seq[1]] if len(seq) == 2 else -1 for seq in ids])
    if self._token_ids.max() >= self.config.vocab_size:
      raise ValueError(f"JudgeScorer: label ids {self._token_ids.tolist()} exceed the judge's "
                       f"vocab_size {self.config.vocab_size}")

  def request(self, prompt: str, response: str) -> str:
    """The judging request for one pair (the user turn's text)."""
    return self.template.format(prompt=prompt, response=response, low=f"{self.scale.min():g}",
                                high=f"{self.scale.max():g}")

  def _render(self, prompt: str, response: str) -> list[int]:
    ids = list(self.tokenizer.apply_chat_template(self.request(prompt, response)))
    return ids + ([self._prefix_id] if self._prefix_id is not None else [])

  def token_ids(self, prompt: str, response: str) -> list[int]:
    """The judged sequence of one pair (with the shared label token, if any), <= max_length."""
    ids = self._render(prompt, response)
    if len(ids) <= self.max_length:
      return ids
    # Cut the texts, not the rendered tokens, so the request's wording and chat markers stay.
    prompt_ids = list(self.tokenizer.encode(prompt))
    response_ids = list(self.tokenizer.encode(response))
    overhead = len(self._render("", ""))
    budget = self.max_length - overhead
    if budget < 2:
      raise ValueError(f"JudgeScorer: max_length={self.max_length} leaves no room for the pair "
                       f"(the request alone takes {overhead} tokens)")
    for _ in range(8):  # Re-encoding a cut text can add a token or two: shrink until it fits.
      keep_response = min(len(response_ids), budget - min(len(prompt_ids), budget // 2))
      keep_prompt = max(budget - keep_response, 0)
      ids = self._render(self.tokenizer.decode(prompt_ids[:keep_prompt]),
                         self.tokenizer.decode(response_ids[:keep_response]))
      if len(ids) <= self.max_length:
        return ids
      budget -= len(ids) - self.max_length
    raise ValueError(f"JudgeScorer: could not fit a pair into max_length={self.max_length}")

  def label_logprobs(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """log P(label) float64 [n, S] over the full vocabulary (not renormalised) of each
    judged sequence, as `token_ids` builds them."""
    lengths = [len(s) for s in seqs]
    plan = reward.plan_batches(lengths, batch_size=self.batch_size,
                               length_buckets=self.length_buckets, batch_sizes=self._batch_sizes)
    fn = _jitted(self.config, self.mesh, self.rules)
    ids_K = jnp.asarray(self._token_ids)
    placement = (sharding_lib.activation_rules(self.mesh, self.rules) if self.mesh is not None
                 else contextlib.nullcontext())
    pad_id = self.tokenizer.pad_id
    pending = []
    with placement:
      for rows, b, t in plan:
        tokens_BxT = np.full((b, t), pad_id, np.int32)
        mask_BxT = np.zeros((b, t), np.int32)
        mask_BxT[len(rows):, 0] = 1  # Filler rows: one pad token, dropped below.
        last_B = np.zeros((b,), np.int32)
        for r, i in enumerate(rows):
          tokens_BxT[r, :lengths[i]] = seqs[i]
          mask_BxT[r, :lengths[i]] = 1
          last_B[r] = lengths[i] - 1
        batch = (tokens_BxT, mask_BxT, last_B)
        if self.mesh is not None:
          batch = sharding_lib.shard_batch(batch, self.mesh)
        pending.append((rows, fn(self.params, *batch, ids_K)))
    out_Nx2xK = np.zeros((len(seqs), 2, len(self._token_ids)), np.float64)
    for rows, out in pending:
      out_Nx2xK[rows] = np.asarray(out, np.float64)[:len(rows)]
    # Without a shared label token the answer starts after the last token, else after the one
    # before it (the appended shared token is the last).
    first_NxK = out_Nx2xK[:, 0 if self._prefix_id is not None else 1]
    logp_NxS = first_NxK[:, self._first_K]
    two = self._second_K >= 0
    if two.any():
      after_NxK = out_Nx2xK[:, 1]
      logp_NxS[:, two] += after_NxK[:, self._second_K[two]]
      # The one-token label equal to the shared token: the shared token not followed by any
      # two-token label's second token.
      rest_N = 1.0 - np.exp(after_NxK[:, self._second_K[two]]).sum(-1)
      shared = ~two & (self._token_ids[self._first_K] == self._prefix_id)
      logp_NxS[:, shared] += np.log(np.maximum(rest_N, 1e-300))[:, None]
    return logp_NxS

  def _raw_scores(self, prompts, responses) -> np.ndarray:
    seqs = [self.token_ids(p, r) for p, r in zip(prompts, responses)]
    logp_NxS = self.label_logprobs(seqs)
    probs_NxS = np.exp(logp_NxS - logp_NxS.max(-1, keepdims=True))
    probs_NxS /= probs_NxS.sum(-1, keepdims=True)
    return (probs_NxS @ self.scale).astype(np.float32)


@reward.SCORERS.register("judge")
def judge_scorer(reward_cfg, *, source=None, dtype: str = "float32", mesh=None,
                 rules=sharding_lib.DEFAULT_RULES) -> JudgeScorer:
  """The causal LM in the local HF folder `reward_cfg.path` as judge (its own tokenizer)."""
  del source
  config, params = hf.load(reward_cfg.path, dtype=dtype,
                           shardings=sharding_lib.param_shardings_for(mesh, rules))
  return JudgeScorer(config, params, tokenizer_lib.load_tokenizer(reward_cfg.path),
                     max_length=reward_cfg.max_length, batch_size=reward_cfg.batch_size,
                     mesh=mesh, truncated_penalty=reward_cfg.truncated_penalty, rules=rules)
