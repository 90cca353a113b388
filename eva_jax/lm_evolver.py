"""The language-model evolver: EvolInstruct-style chained rewriting with a JAX creator model.

For each selected prompt, `LMEvolver.evolve` grows one chain of `num_chained` rewrites; step s asks
the creator model to rewrite the output of step s - 1 (step 1 rewrites the selected prompt), and
every step is returned as a `creator.Candidate` for `creator.evolve_round` to filter and keep.

One step of one chain:
1. a method is drawn (`plan_chains`) from the template set (`templates.TEMPLATE_SETS`): for "eva"
   (ours, the default), in-depth with probability `depth_prob`, else in-breadth, then a method
   of that group in proportion to `method_weights`; "mix" also draws a second prompt, another
   selected prompt (the original text, not its chain's rewrite). For "evolinstruct" (the eva
   authors' WizardLM mutations), one of its five uniformly;
2. `templates.render_evolution_request` writes the meta-prompt, the creator's chat template turns
   it into token ids (one user turn plus the generation prompt);
3. `eva_jax.sampling.sample_batched` draws one reply, batched over every chain at this step
   (chunks of `batch_size` requests), and the reply's tokens up to its eos are decoded;
4. `templates.parse_evolved` reads the new prompt out of the reply.

A chain stops early (no later steps) when its request is longer than `max_prompt_tokens`: the
request is skipped and no candidate is emitted for that step, with a logged warning. Cutting
tokens would either drop the chat header and the instructions (left truncation) or ask for a
rewrite of a fragment of the prompt, and neither reply would be a rewrite of the text its
candidate is filtered against; the next step would send the same text again.

An unusable reply (it does not parse, or was cut off by `max_new_tokens` before its closing
marker, unless `keep_unfinished`) is emitted with `text=None` (the filters count it as "empty").
Then, by `continue_after_unusable` (default: the template set's):
- False ("eva"): the chain ends (our original choice: later steps need a text to rewrite, and
  the round's sampling budget goes to the chains still growing).
- True ("evolinstruct"): the next step rewrites the chain's last usable prompt (the selected
  prompt if none), so every chain makes all `num_chained` requests. The authors' chain
  (distilabel 1.2's EvolInstruct, store_evolutions=True) never ends early: each step rewrites
  the previous step's raw output, whatever it is (the text after its last "Prompt#:"), a reply
  cut off at the token limit included; an API reply without content crashes their whole run.
  Rewriting a reply that holds no prompt (or a cut-off one) would not be a rewrite of a prompt
  here, so the chain resumes from the last text that is one; it keeps their fixed number of
  rewrites per selected prompt. `evolve_round` filters each step against that same text.

Progress: each step opens one bar of `progress(desc, total, unit)` (the protocol of
`eva_jax.stages.no_progress`, silent by default; the runner passes `eva_jax.console.bar`) over
that step's requests, advanced after each sampled chunk, with the parsed count as its postfix.

Randomness: `rng` is anything `creator.numpy_rng` accepts. All method and mix-partner draws come
first, then one uint32 seed for the sampling key, so the plan does not depend on the replies.
"""
from __future__ import annotations

import collections
import functools
import logging
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from eva_jax import creator, sampling, sharding, stages, templates
from eva_jax.buffer import PromptRecord
from eva_jax.models.config import ModelConfig
from eva_jax.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# A request longer than this is skipped by default (also capped by the model's positions).
DEFAULT_MAX_PROMPT_TOKENS = 2048


class PlannedStep(NamedTuple):
  """One step of a chain: the method and, for "mix", the index of the second prompt."""
  method: str
  other: Optional[int] = None


def method_probabilities(depth_prob: float = 0.5,
                         method_weights: Optional[Mapping[str, float]] = None, *,
                         allow_mix: bool = True, template_set: str = "eva") -> np.ndarray:
  """Probability of each method of a template set (in its `methods` order) at one step -> [M]
  (the "eva" set: `templates.EVOLUTION_METHODS`, M = 10).

  Args:
    depth_prob: chance of an in-depth method; in-breadth gets 1 - depth_prob. A group whose
      weights are all 0 hands its share to the other group.
    method_weights: method -> weight >= 0 within its group; None weighs every method 1, a
      mapping weighs the methods it names (the others 0).
    allow_mix: False (a single selected prompt, nothing to mix with) sets "mix" to 0 before the
      group shares are computed.
    template_set: a name in `templates.TEMPLATE_SETS`; a uniform set ("evolinstruct") gives each
      of its methods 1 / M and takes no method_weights (depth_prob is only validated).
  """
  if isinstance(depth_prob, bool) or not 0.0 <= depth_prob <= 1.0:
    raise ValueError(f"depth_prob must be in [0, 1], got {depth_prob!r}")
  tset = templates.TEMPLATE_SETS.get(template_set)
  methods = tset.methods
  if tset.uniform:
    if method_weights is not None:
      raise ValueError(f"template set {template_set!r} draws its methods uniformly; "
                       f"method_weights applies to the 'eva' set only")
    return np.full(len(methods), 1.0 / len(methods))
  if method_weights is None:
    weights_M = np.ones(len(methods))
  else:
    unknown = set(method_weights) - set(methods)
    if unknown:
      raise ValueError(f"unknown evolution methods in method_weights: {sorted(unknown)}; "
                       f"expected names from {methods}")
    weights_M = np.array([float(method_weights.get(m, 0.0)) for m in methods])
    if not (np.isfinite(weights_M) & (weights_M >= 0)).all():
      raise ValueError(f"method weights must be finite and >= 0, got {dict(method_weights)}")
  if not allow_mix and "mix" in methods:
    weights_M[methods.index("mix")] = 0.0
  in_depth_M = np.isin(methods, tset.in_depth)
  totals = {True: weights_M[in_depth_M].sum(), False: weights_M[~in_depth_M].sum()}
  shares = {True: depth_prob, False: 1.0 - depth_prob}
  for group in (True, False):
    if totals[group] == 0:
      shares[not group], shares[group] = 1.0, 0.0
  if totals[True] == 0 and totals[False] == 0:
    raise ValueError(f"no evolution method has a positive weight (method_weights="
                     f"{method_weights}{', mix needs two prompts' if not allow_mix else ''})")
  probs_M = np.array([shares[bool(d)] * w / totals[bool(d)] if w > 0 else 0.0
                      for d, w in zip(in_depth_M, weights_M)])
  return probs_M / probs_M.sum()


def plan_chains(num_prompts: int, num_chained: int, gen: np.random.Generator, *,
                depth_prob: float = 0.5,
                method_weights: Optional[Mapping[str, float]] = None,
                template_set: str = "eva") -> list[list[PlannedStep]]:
  """Draws every chain's methods -> [num_prompts][num_chained] `PlannedStep`s.

  Draw order is prompt by prompt, step by step: one method draw, then (for "mix") one draw of the
  other prompt, uniform over the other prompts.
  """
  probs_M = method_probabilities(depth_prob, method_weights, allow_mix=num_prompts > 1,
                                 template_set=template_set)
  methods = templates.TEMPLATE_SETS.get(template_set).methods
  plan = []
  for prompt in range(num_prompts):
    chain = []
    for _ in range(num_chained):
      method = methods[gen.choice(len(probs_M), p=probs_M)]
      other = None
      if method == "mix":
        other = int(gen.integers(num_prompts - 1))
        other += other >= prompt  # Skips the prompt itself.
      chain.append(PlannedStep(method, other))
    plan.append(chain)
  return plan


def generate_replies(config: ModelConfig, params: dict, tokenizer: Tokenizer,
                     requests: Sequence[Sequence[int]], *, rng: jax.Array, max_new_tokens: int,
                     temperature: float, top_p: float, batch_size: int, mesh=None,
                     rules=sharding.DEFAULT_RULES, on_chunk=None) -> list[tuple[str, bool]]:
  """One sampled reply per tokenised request -> [(decoded text, finished)] in request order.

  Requests go through `sampling.sample_batched` in chunks of at most `batch_size` (the chunk at
  request `start` samples with `fold_in(rng, start)`). The text is the reply's tokens up to and
  including its eos, decoded without special tokens; finished is False when it hit
  `max_new_tokens` first. on_chunk(number of requests) is called after each chunk.
  """
  out = sampling.sample_batched(config, params, requests, rng=rng, batch_size=batch_size,
                                num_samples=1, max_new_tokens=max_new_tokens,
                                pad_id=tokenizer.pad_id, temperature=temperature, top_p=top_p,
                                eos_ids=tokenizer.eos_ids, mesh=mesh, rules=rules,
                                on_chunk=on_chunk)
  return [(tokenizer.decode(tokens_T[:length]), bool(finished))
          for tokens_T, length, finished in zip(out.tokens[:, 0], out.lengths[:, 0],
                                                out.finished[:, 0])]


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  return int(value)


class LMEvolver:
  """`creator.Evolver` that rewrites prompts with a creator language model.

  The creator is the policy (its config, params and tokenizer) or another checkpoint loaded
  with `eva_jax.models.hf.load` and `eva_jax.models.tokenizer.load_tokenizer`.

  Args:
    config, params, tokenizer: the creator model and its tokenizer (which has a chat template).
    num_chained: rewrites per chain, every step kept (eva: 4).
    depth_prob, method_weights, template_set: how methods are drawn; see
      `method_probabilities`.
    continue_after_unusable: after an unusable reply, go on from the chain's last usable prompt
      (True) or end the chain (False); None: the template set's choice (module docstring).
    max_new_tokens: reply budget per step, in tokens.
    temperature, top_p: sampling settings of the replies.
    max_prompt_tokens: longest request (chat-templated, in tokens) sent to the model; longer ones
      are skipped (module docstring). Default: min(2048, positions left after max_new_tokens).
    batch_size: most requests per `sampling.sample` call.
    keep_unfinished: parse replies cut off by max_new_tokens before their closing marker too
      (by default they count as unparsed: the new prompt is likely cut mid-sentence).
    mesh, rules: passed to `sampling.sample` (params already placed on the mesh by the rules).
    progress: a bar factory (`eva_jax.stages.no_progress` protocol): one bar per step.
  """

  def __init__(self, config: ModelConfig, params: dict, tokenizer: Tokenizer, *,
               num_chained: int = 4, depth_prob: float = 0.5,
               method_weights: Optional[Mapping[str, float]] = None, template_set: str = "eva",
               continue_after_unusable: Optional[bool] = None,
               max_new_tokens: int = 1024, temperature: float = 0.7, top_p: float = 0.9,
               max_prompt_tokens: Optional[int] = None, batch_size: int = 64,
               keep_unfinished: bool = False, mesh=None, rules=sharding.DEFAULT_RULES,
               progress=stages.no_progress):
    if config.is_reward_model:
      raise ValueError("LMEvolver: the creator config is a reward model (num_labels > 0)")
    self.num_chained = _positive_int("num_chained", num_chained)
    self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    self.batch_size = _positive_int("batch_size", batch_size)
    positions_left = config.max_position_embeddings - self.max_new_tokens
    if positions_left < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a request in the "
                       f"creator's max_position_embeddings={config.max_position_embeddings}")
    if max_prompt_tokens is None:
      max_prompt_tokens = min(DEFAULT_MAX_PROMPT_TOKENS, positions_left)
    self.max_prompt_tokens = _positive_int("max_prompt_tokens", max_prompt_tokens)
    if self.max_prompt_tokens > positions_left:
      raise ValueError(f"max_prompt_tokens={max_prompt_tokens} + max_new_tokens={max_new_tokens} "
                       f"exceeds the creator's max_position_embeddings="
                       f"{config.max_position_embeddings}")
    if not temperature >= 0 or not 0 < top_p <= 1:
      raise ValueError(f"need temperature >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    # Validates them now, not mid-run.
    method_probabilities(depth_prob, method_weights, template_set=template_set)
    self.depth_prob, self.method_weights = depth_prob, method_weights
    self.template_set = template_set
    if continue_after_unusable is None:
      continue_after_unusable = templates.TEMPLATE_SETS.get(template_set).continue_after_unusable
    self.continue_after_unusable = bool(continue_after_unusable)
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.temperature, self.top_p = float(temperature), float(top_p)
    self.keep_unfinished = bool(keep_unfinished)
    self.mesh, self.rules, self.progress = mesh, rules, progress

  def _parse(self, reply: str, finished: bool) -> Optional[str]:
    if not finished and not self.keep_unfinished and templates.PROMPT_CLOSE not in reply:
      return None
    return templates.parse_evolved(reply)

  def evolve(self, prompts: Sequence[PromptRecord], *, rng: Any,
             iteration: int) -> list[creator.Candidate]:
    """Every step of one chain per prompt -> candidates, chain by chain, step by step.

    `iteration` is unused: the caller's rng already derives from it.
    """
    del iteration
    records = list(prompts)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
      raise ValueError(f"prompts must have distinct ids, got {ids[:20]}")
    gen = creator.numpy_rng(rng)
    plan = plan_chains(len(records), self.num_chained, gen, depth_prob=self.depth_prob,
                       method_weights=self.method_weights, template_set=self.template_set)
    key = jax.random.key(int(gen.integers(2**32, dtype=np.uint64)))
    current = [r.text for r in records]
    alive = list(range(len(records)))
    candidates: dict[int, list[creator.Candidate]] = collections.defaultdict(list)
    for step in range(1, self.num_chained + 1):
      requests, chains, skipped = [], [], []
      for i in alive:
        planned = plan[i][step - 1]
        other = None if planned.other is None else records[planned.other].text
        request = self.tokenizer.apply_chat_template(
            templates.render_evolution_request(planned.method, current[i], other))
        if len(request) > self.max_prompt_tokens:
          skipped.append((records[i].id, len(request)))
          continue
        requests.append(request)
        chains.append(i)
      if skipped:
        log.warning("evolution step %d: skipped %d request(s) longer than max_prompt_tokens=%d "
                    "(their chains end here): %s", step, len(skipped), self.max_prompt_tokens,
                    skipped[:10])
      if not requests:
        break
      with self.progress(f"evolve {step}/{self.num_chained}", len(requests), "request") as bar:
        replies = generate_replies(
            self.config, self.params, self.tokenizer, requests,
            rng=jax.random.fold_in(key, step), max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, batch_size=self.batch_size,
            mesh=self.mesh, rules=self.rules, on_chunk=bar.update)
        alive, parsed, unfinished = [], 0, 0
        for i, (reply, finished) in zip(chains, replies):
          text = self._parse(reply, finished)
          unfinished += not finished
          candidates[i].append(creator.Candidate(text=text, parent_id=records[i].id,
                                                 method=plan[i][step - 1].method, step=step))
          if text is not None:
            current[i] = text
            parsed += 1
          if text is not None or self.continue_after_unusable:
            alive.append(i)
        bar.set_postfix(parsed=parsed, cut_off=unfinished)
      log.info("evolution step %d: %d requests, %d replies parsed, %d hit max_new_tokens=%d",
               step, len(requests), parsed, unfinished, self.max_new_tokens)
    return [cand for i in range(len(records)) for cand in candidates[i]]


@functools.lru_cache(maxsize=2)
def load_creator(path: str, param_dtype: str, dtype: str, mesh,
                 rules) -> tuple[ModelConfig, dict, Tokenizer]:
  """A separate creator model: (config, params placed on `mesh` by `rules`, tokenizer), read
  once per run (every iteration's evolver reuses it; the policy changes, the creator does not)."""
  from eva_jax.models import hf, tokenizer as tokenizer_lib
  config, params = hf.load(path, dtype=param_dtype, compute_dtype=dtype,
                           shardings=sharding.param_shardings_for(mesh, rules))
  if config.is_reward_model:
    raise ValueError(f"creator.model {path!r}: a reward model, not a causal LM")
  return config, params, tokenizer_lib.load_tokenizer(path)


@creator.EVOLVERS.register("lm")
def from_config(creator_cfg, *, source, policy, progress=stages.no_progress) -> LMEvolver:
  """The LM evolver of the config's creator section (`creator.EVOLVERS` factory; source is
  unused): the policy θ_t as its own creator, or the model in the folder `creator_cfg.model`
  (`load_creator`, in the policy's dtypes, on its mesh). Sampling settings come from the
  creator section (temperature, top_p, max_new_tokens), the templates and the chain's policy
  from creator.template_set."""
  del source
  model = (policy.model_config, policy.params, policy.tokenizer)
  if creator_cfg.get("model"):
    model = load_creator(creator_cfg.model, policy.model_config.param_dtype,
                         policy.model_config.dtype, policy.mesh, policy.rules)
  return LMEvolver(*model,
                   num_chained=creator_cfg.num_evolutions, depth_prob=creator_cfg.depth_prob,
                   template_set=creator_cfg.template_set,
                   max_new_tokens=creator_cfg.max_new_tokens,
                   temperature=creator_cfg.temperature, top_p=creator_cfg.top_p,
                   mesh=policy.mesh, rules=policy.rules, progress=progress)
