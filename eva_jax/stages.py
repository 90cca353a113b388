"""The stages of one eva iteration as pure functions: a `Policy` handle, the config section each
needs, and plain inputs in; plain host data out.

generate → score → create (select, evolve, filter) → pairs → reference → train → evaluate.
No stage reads the whole config or writes files: the offline runner caches their outputs in the
workdir, and an online loop can call generate / score / create / train as plain pieces.

Config sections: `sampling_cfg` (num_samples, temperature, top_p, top_k, max_new_tokens,
max_prompt_length, batch_size), `creator_cfg`, `train_cfg`, `sft_cfg`, `eval_cfg` are the
config's sections of those names (any object with those attributes).

Progress: the long stages take `progress(desc, total, unit) -> bar`, a bar factory (tqdm's
signature; the bar has `update(n)`, `set_postfix(**values)` and is a context manager). The
default draws nothing; the runner passes `eva_jax.console.bar`.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from eva_jax import continuous, creator, logprobs, losses, reward, sampling, sharding, train
from eva_jax import train_state
from eva_jax import workdir as wd
from eva_jax.buffer import PromptBuffer

# Stage ids fold into the seed: every draw depends on (seed, iteration, stage) only.
STAGE_IDS = {"tokenizer": 1, "init": 2, "sft": 3, "prompts": 4, "generate": 5, "score": 6,
             "create": 7, "generate_evolved": 8, "pairs": 9, "reference": 10, "train": 11,
             "evaluate": 12}


# Prompts per scorer call: the score stage's progress steps (a reward model batches within each).
SCORE_CHUNK = 256


class _NoBar:
  """The silent progress bar."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, **values) -> None:
    del values

  def __enter__(self) -> "_NoBar":
    return self

  def __exit__(self, *exc) -> None:
    del exc


def no_progress(desc: str, total: int, unit: str = "it") -> _NoBar:
  del desc, total, unit
  return _NoBar()


@dataclasses.dataclass(frozen=True)
class Policy:
  """What a stage needs of the policy: its model config, params, tokenizer, mesh and the
  logical-axis rules that place it there (`sharding.rules_from_config(c.mesh.rules)`)."""
  model_config: Any
  params: Any
  tokenizer: Any
  mesh: Any
  rules: tuple = sharding.DEFAULT_RULES

  def with_params(self, params) -> "Policy":
    return dataclasses.replace(self, params=params)


def stage_rng(seed: int, iteration: int, stage: str) -> np.random.Generator:
  return np.random.default_rng([seed, iteration + 1, STAGE_IDS[stage]])


def stage_key(seed: int, iteration: int, stage: str) -> jax.Array:
  key = jax.random.fold_in(jax.random.key(seed), iteration + 1)
  return jax.random.fold_in(key, STAGE_IDS[stage])


def prompt_ids(tokenizer, prompts: Sequence[str], max_prompt_length: int) -> list[list[int]]:
  """Chat-templated prompt ids, each keeping its last max_prompt_length tokens."""
  return [tokenizer.apply_chat_template(p, add_generation_prompt=True)[-max_prompt_length:]
          for p in prompts]


# ---------------------------------------------------------------------------------------------
# generate, score, create


def generate(policy: Policy, prompts: Sequence[str], *, key, sampling_cfg,
             progress=no_progress, desc: str = "generate") -> dict:
  """N responses per prompt -> {tokens [P, N, T], lengths [P, N], finished [P, N], texts}.

  Chunks of sampling_cfg.batch_size prompts (they bound the KV cache and the compiles); the
  chunk at prompt `start` samples with fold_in(key, start). With sampling_cfg.continuous (absent
  = False), one pool of batch_size x num_samples slots instead (`eva_jax.continuous`).
  """
  s, tok = sampling_cfg, policy.tokenizer
  ids = prompt_ids(tok, prompts, s.max_prompt_length)
  kw = dict(num_samples=s.num_samples, max_new_tokens=s.max_new_tokens, pad_id=tok.pad_id,
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_ids=tok.eos_ids,
            greedy=s.temperature == 0, mesh=policy.mesh, rules=policy.rules)
  with progress(desc, len(prompts), "prompt") as bar:
    if getattr(s, "continuous", False):
      # The fixed chunks' KV-cache rows as one pool of slots, refilled as rows end; row (p, n)
      # draws with fold_in(fold_in(key, p), n), whatever the pool size.
      out = continuous.sample_continuous(
          policy.model_config, policy.params, ids, rng=key,
          slots=s.batch_size * s.num_samples, on_prompt=bar.update, **kw)
    else:
      out = sampling.sample_batched(policy.model_config, policy.params, ids, rng=key,
                                    batch_size=s.batch_size, on_chunk=bar.update, **kw)
  wd.kill_point("sampling")
  texts = [[tok.decode(out.tokens[p, n, :out.lengths[p, n]]) for n in range(s.num_samples)]
           for p in range(len(prompts))]
  return {"tokens": out.tokens, "lengths": out.lengths, "finished": out.finished,
          "texts": texts}


def score(scorer, prompts: Sequence[str], gen: dict, *, progress=no_progress,
          desc: str = "score") -> np.ndarray:
  """Rewards [P, N] of the generated responses, SCORE_CHUNK prompts per scorer call."""
  truncated_PxN = ~np.asarray(gen["finished"])
  if not len(prompts):
    return scorer.score_grouped([], gen["texts"], truncated=truncated_PxN)
  parts = []
  with progress(desc, len(prompts), "prompt") as bar:
    for start in range(0, len(prompts), SCORE_CHUNK):
      end = min(start + SCORE_CHUNK, len(prompts))
      try:
        parts.append(scorer.score_grouped(list(prompts[start:end]), gen["texts"][start:end],
                                          truncated=truncated_PxN[start:end]))
      except reward.NonFiniteScoreError as e:
        # The scorer counts from the chunk's first prompt; name the position in the stage.
        raise reward.NonFiniteScoreError(
            f"{e} [the index counts from prompt {start} of {len(prompts)}]",
            e.index + start * truncated_PxN.shape[1]) from None
      bar.update(end - start)
  return np.concatenate(parts)


def create(buffer: PromptBuffer, prompts: Sequence[str], rewards_PxN: np.ndarray,
           informativeness_P: np.ndarray, *, iteration: int, creator_cfg, evolver, rng,
           token_count: Callable[[str], int],
           dataset_ids: Optional[Sequence[Optional[str]]] = None,
           topics: Optional[Sequence[Optional[str]]] = None) -> tuple[PromptBuffer, dict]:
  """The creator step: add this iteration's prompts (with their scores) to a copy of `buffer`,
  select by informativeness, evolve and filter the selected ones.

  rng: a numpy Generator, drawn first by the selection, then by the evolver.
  dataset_ids: the dataset's id of each prompt (kept in the record's `extra`), or None.
  topics: each prompt's topic (`sources.Prompt.topic`, kept in the record's `extra`), or None;
    creator_cfg.selection "topic_weighted" needs them (with creator_cfg.topic_coef).
  Returns (the new buffer, {"selected", "informativeness", "evolved", "methods", "parents"
  (the parent text of each evolved prompt), "rejected" ({filter reason: count})}).
  """
  if creator_cfg.selection in creator.TOPIC_METHODS and (topics is None
                                                         or all(t is None for t in topics)):
    raise ValueError(f"creator.selection {creator_cfg.selection!r} needs each prompt's topic, "
                     "and these prompts have none: set data.topic_field (jsonl / tfds prompts) "
                     "or pick another creator.selection")
  buffer = PromptBuffer(list(buffer))
  none = [None] * len(prompts)
  ids = [buffer.add(p, iteration=iteration,
                    extra={k: v for k, v in (("dataset_id", d), ("topic", t)) if v is not None}).id
         for p, d, t in zip(prompts, dataset_ids or none, topics or none)]
  buffer.record_scores(ids, rewards_PxN, informativeness_P)
  chosen = creator.select(informativeness_P, fraction=creator_cfg.fraction,
                          method=creator_cfg.selection, rng=rng, topics=topics,
                          topic_coef=creator_cfg.topic_coef)
  rejected: dict[str, int] = {}
  records = creator.evolve_round(
      buffer, [ids[i] for i in chosen], evolver, rng=rng, iteration=iteration,
      tokenizer_len_fn=token_count, min_tokens=creator_cfg.min_tokens,
      max_tokens=creator_cfg.max_tokens, max_similarity=creator_cfg.max_similarity,
      rejections=rejected)
  return buffer, {"selected": [ids[i] for i in chosen],
                  "informativeness": np.asarray(informativeness_P).tolist(),
                  "evolved": [r.text for r in records], "methods": [r.method for r in records],
                  "parents": [buffer.get(r.parent_id).text for r in records],
                  "rejected": dict(sorted(rejected.items()))}


# ---------------------------------------------------------------------------------------------
# pairs


def best_worst_pairs(prompts: Sequence[str], gen: dict, rewards_PxN: np.ndarray,
                     source: str, *, min_chosen_reward: float = -math.inf,
                     win_prob_scale: float = 1.0) -> list[dict]:
  """Per prompt: chosen = the highest-reward response, rejected = the lowest.

  A prompt whose rewards all tie carries no preference and gives no pair; neither does one
  whose best response scores below `min_chosen_reward` (off by default, as in the paper).
  Each pair also carries `chosen_win_prob` / `rejected_win_prob`, its responses' win
  probabilities against the prompt's N samples (`losses.win_probabilities` at
  `win_prob_scale`), the targets of soft SPPO.
  """
  pairs = []
  win_PxN = losses.win_probabilities(rewards_PxN, scale=win_prob_scale) if len(prompts) else None
  for p, prompt in enumerate(prompts):
    best, worst = int(np.argmax(rewards_PxN[p])), int(np.argmin(rewards_PxN[p]))
    if (rewards_PxN[p, best] <= rewards_PxN[p, worst]
        or rewards_PxN[p, best] < min_chosen_reward):
      continue
    take = lambda n: gen["tokens"][p, n, :gen["lengths"][p, n]].tolist()  # noqa: E731
    pairs.append({"prompt": prompt, "chosen": take(best), "rejected": take(worst),
                  "chosen_reward": float(rewards_PxN[p, best]),
                  "rejected_reward": float(rewards_PxN[p, worst]), "source": source,
                  "chosen_win_prob": float(win_PxN[p, best]),
                  "rejected_win_prob": float(win_PxN[p, worst])})
  return pairs


def mix(base_pairs: list[dict], evolved_pairs: list[dict], rng, *, creator_cfg,
        num_pairs: int) -> list[dict]:
  """eva: base/evolved mixed by creator_cfg.base_ratio (with creator_cfg.top_up, then topped
  up with more base pairs to num_pairs); static (creator off) or no evolved pairs: the base
  pairs, shuffled. Both capped at num_pairs, so eva and static train on the same budget."""
  # No evolved pairs (every evolved prompt's responses tied, or scored below the floor): the
  # same shuffle as mix_pairs would draw, without its warning; the runner's pairs line shows
  # the count.
  if creator_cfg.enabled and evolved_pairs:
    mixed = creator.mix_pairs(base_pairs, evolved_pairs, base_ratio=creator_cfg.base_ratio,
                              rng=rng)
    if creator_cfg.top_up and len(mixed) < num_pairs:
      # Too few evolved pairs for num_pairs at base_ratio: fill the budget with base pairs
      # the mix left out, so eva trains on as many pairs (and updates) as static.
      used = {id(p) for p in mixed}
      rest = [p for p in base_pairs if id(p) not in used]
      mixed += [rest[i] for i in rng.permutation(len(rest))[:num_pairs - len(mixed)]]
      mixed = [mixed[i] for i in rng.permutation(len(mixed))]
  else:
    mixed = [base_pairs[i] for i in rng.permutation(len(base_pairs))]
  return mixed[:num_pairs]


# ---------------------------------------------------------------------------------------------
# reference, train


def train_batch_size(mesh, train_cfg) -> int:
  """train_cfg.batch_size rounded up to a multiple of (batch shards x accumulation steps)."""
  multiple = sharding.batch_multiple(mesh) * train_cfg.grad_accum
  return max(multiple, int(math.ceil(train_cfg.batch_size / multiple)) * multiple)


def _pair_batches(policy: Policy, pairs: list[dict], train_cfg) -> list[dict]:
  tok, size = policy.tokenizer, train_batch_size(policy.mesh, train_cfg)
  # Pairs cached before win probabilities existed have none: their batches go without (only
  # soft SPPO needs them, and its step says so).
  with_win = sum("chosen_win_prob" in p for p in pairs)
  if 0 < with_win < len(pairs):
    raise ValueError(f"{with_win} of {len(pairs)} pairs carry win probabilities; rebuild the "
                     "pairs (their artifacts) so that all or none do")
  batches = []
  for start in range(0, len(pairs), size):
    chunk = pairs[start:start + size]
    win = {key: [p[key] for p in chunk] if with_win else None for key in logprobs.WIN_PROB_KEYS}
    batches.append(logprobs.make_pair_batch(
        prompt_ids(tok, [p["prompt"] for p in chunk], train_cfg.max_prompt_length),
        [p["chosen"] for p in chunk], [p["rejected"] for p in chunk],
        max_length=train_cfg.max_length, max_prompt_length=train_cfg.max_prompt_length,
        pad_id=tok.pad_id, batch_multiple=size, length_bucket=16, **win))
  return batches


def reference(policy: Policy, pairs: list[dict], *, train_cfg, progress=no_progress) -> dict:
  """Summed log-probs of chosen and rejected under θ_t, computed once for the iteration."""
  if not pairs:
    return {"ref_chosen": np.zeros(0, np.float32), "ref_rejected": np.zeros(0, np.float32)}
  batches = _pair_batches(policy, pairs, train_cfg)
  parts = []
  with progress("reference", len(batches), "batch") as bar:
    for batch in batches:
      parts.append(logprobs.reference_logprobs(policy.model_config, policy.params, [batch],
                                               mesh=policy.mesh, rules=policy.rules,
                                               impl=train_cfg.logprob_impl))
      bar.update(1)
  ref_c, ref_r = (np.concatenate(xs) for xs in zip(*parts))
  # Each batch is padded to the same row count with weight-0 pairs: keep the real rows.
  size = len(batches[0]["weights"])
  real = np.concatenate([np.arange(i * size, i * size + min(size, len(pairs) - i * size))
                         for i in range(len(batches))])
  return {"ref_chosen": np.asarray(ref_c, np.float32)[real],
          "ref_rejected": np.asarray(ref_r, np.float32)[real]}


def optimizer_config(train_cfg, total_steps: int, *, name: Optional[str] = None,
                     learning_rate: Optional[float] = None,
                     schedule: Optional[str] = None) -> train_state.OptimizerConfig:
  """The optimizer of train_cfg (name, learning rate and schedule overridable: the SFT
  warm-start)."""
  return train_state.OptimizerConfig(
      name=name or train_cfg.optimizer,
      learning_rate=train_cfg.learning_rate if learning_rate is None else learning_rate,
      total_steps=max(1, total_steps), warmup_ratio=train_cfg.warmup_ratio,
      weight_decay=train_cfg.weight_decay, max_grad_norm=train_cfg.grad_clip,
      schedule=schedule or train_cfg.schedule)


def sft_optimizer_config(train_cfg, sft_cfg, total_steps: int) -> train_state.OptimizerConfig:
  return optimizer_config(train_cfg, total_steps, name="adamw",
                          learning_rate=sft_cfg.learning_rate, schedule="cosine")


# One jitted update per (model, mesh, rules, optimizer, loss), reused by every iteration: a new
# closure would recompile.
_STEPS: dict = {}


def _train_step(policy: Policy, opt_cfg, loss_cfg):
  key = (policy.model_config, policy.mesh, policy.rules, repr(opt_cfg), repr(loss_cfg))
  if key not in _STEPS:
    optimizer = train_state.make_optimizer(opt_cfg)
    _STEPS[key] = optimizer, train.make_train_step(
        policy.model_config, optimizer, policy.mesh, loss_cfg,
        schedule=train_state.make_schedule(opt_cfg), rules=policy.rules)
  return _STEPS[key]


def train_iteration(policy: Policy, pairs: list[dict], ref: dict, rng, log_step, *,
                    train_cfg, progress=no_progress,
                    donate: bool = False) -> train_state.TrainState:
  """Preference optimization θ_t → θ_{t+1} over train_cfg.epochs passes of the pairs.

  The schedule spans the step count of a full budget (train_cfg.num_pairs pairs), the same for
  every iteration, so one compiled update serves the whole run. log_step(step, epoch, metrics).
  `donate`: the train state takes policy.params' buffers over (the caller is done with θ_t),
  so the device holds one copy of the weights during the update, not two.
  """
  t = train_cfg
  opt_cfg = optimizer_config(
      t, t.epochs * math.ceil(t.num_pairs / train_batch_size(policy.mesh, t)))
  loss_cfg = train.LossConfig(t.loss, beta=t.beta, hparams=dict(t.hparams),
                              accum_steps=t.grad_accum, logprob_impl=t.logprob_impl)
  optimizer, step = _train_step(policy, opt_cfg, loss_cfg)
  state = train_state.init_train_state(policy.model_config, optimizer, policy.mesh,
                                       params=policy.params, rules=policy.rules, donate=donate)
  if not pairs:
    return state
  steps = t.epochs * math.ceil(len(pairs) / train_batch_size(policy.mesh, t))
  with progress("train", steps, "step") as bar:
    for epoch in range(t.epochs):
      order = rng.permutation(len(pairs))
      shuffled = [pairs[i] for i in order]
      ref_c, ref_r = ref["ref_chosen"][order], ref["ref_rejected"][order]
      batches = _pair_batches(policy, shuffled, t)
      sizes = [min(len(b["weights"]), int(b["weights"].sum())) for b in batches]
      for batch in logprobs.with_reference(batches, ref_c, ref_r, num_pairs=sizes):
        state, metrics = train.timed_step(step, state, batch, config=policy.model_config)
        train.check_finite(metrics, int(state.step))
        wd.kill_point("train_step")
        log_step(int(state.step), epoch, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", epoch=epoch)
        bar.update(1)
  return state


def sft_warm_start(policy: Policy, examples: Sequence[tuple[str, str]], steps: int, rng,
                   log_step, *, sft_cfg, train_cfg,
                   progress=no_progress) -> train_state.TrainState:
  """Supervised warm-start, `steps` updates on (prompt, answer) examples; returns the state.

  Lengths come from train_cfg; log_step(step, metrics).
  """
  tok = policy.tokenizer
  opt_cfg = sft_optimizer_config(train_cfg, sft_cfg, steps)
  optimizer = train_state.make_optimizer(opt_cfg)
  state = train_state.init_train_state(policy.model_config, optimizer, policy.mesh,
                                       params=policy.params, rules=policy.rules)
  if steps == 0:
    return state
  step = train.make_train_step(policy.model_config, optimizer, policy.mesh,
                               train.LossConfig("sft"),
                               schedule=train_state.make_schedule(opt_cfg), rules=policy.rules)
  prompts = prompt_ids(tok, [p for p, _ in examples], train_cfg.max_prompt_length)
  responses = []
  for (prompt, answer), ids in zip(examples, prompts):
    # The answer's tokens are what the chat template appends after the generation prompt, so
    # the model learns the turn-end marker that stops sampling.
    full = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": answer}],
                                   add_generation_prompt=False)
    responses.append(full[len(tok.apply_chat_template(prompt, add_generation_prompt=True)):])
  multiple = sharding.batch_multiple(policy.mesh)
  size = max(multiple, sft_cfg.batch_size // multiple * multiple)
  with progress("sft warm-start", steps, "step") as bar:
    for i in range(steps):
      rows = rng.choice(len(examples), size=size, replace=False)
      batch = logprobs.make_sft_batch([prompts[r] for r in rows], [responses[r] for r in rows],
                                      max_length=train_cfg.max_length,
                                      max_prompt_length=train_cfg.max_prompt_length,
                                      pad_id=tok.pad_id, batch_multiple=multiple,
                                      length_bucket=16)
      state, metrics = train.timed_step(step, state, batch, config=policy.model_config)
      train.check_finite(metrics, i)
      log_step(i, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")
      bar.update(1)
  return state


# ---------------------------------------------------------------------------------------------
# evaluate


def evaluate(policy: Policy, scorer, heldout: Sequence, *, key, sampling_cfg,
             eval_cfg, progress=no_progress) -> dict:
  """One answer per held-out prompt (eval_cfg.temperature 0: greedy), its reward, overall and
  per difficulty level. heldout: `eva_jax.sources.Prompt`s (text, id, level)."""
  settings = types.SimpleNamespace(
      max_prompt_length=sampling_cfg.max_prompt_length, batch_size=sampling_cfg.batch_size,
      top_p=sampling_cfg.top_p, top_k=sampling_cfg.top_k, num_samples=1,
      temperature=eval_cfg.temperature, max_new_tokens=eval_cfg.max_new_tokens,
      continuous=getattr(sampling_cfg, "continuous", False))
  prompts = [h.text for h in heldout]
  gen = generate(policy, prompts, key=key, sampling_cfg=settings, progress=progress,
                 desc="evaluate")
  rewards = score(scorer, prompts, gen, progress=progress, desc="evaluate: score")[:, 0]
  by_level = {}
  for level in sorted({h.level for h in heldout}):
    sel = [i for i, h in enumerate(heldout) if h.level == level]
    by_level[str(level)] = float(rewards[sel].mean())
  out = {"rewards": rewards.tolist(), "answers": [t[0] for t in gen["texts"]],
         "heldout_reward": float(rewards.mean()), "heldout_by_level": by_level}
  if any(h.id is not None for h in heldout):
    out["ids"] = [h.id for h in heldout]  # For exports (Arena-Hard question_id).
  return out
