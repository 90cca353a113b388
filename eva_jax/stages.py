"""The stages of one eva iteration, as functions of (run context, inputs) -> artifacts.

generate → score → create (select, evolve, filter; generate + score the evolved prompts) →
pairs → reference → train → evaluate. Each returns plain host data that the runner writes to
the workdir; none of them writes files itself, so every stage can be rerun after a kill with
the same result.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from eva_jax import creator, logprobs, sampling, sharding, train, train_state
from eva_jax import workdir as wd
from eva_jax.models.tokenizer import pad_sequences

# Stage ids fold into the seed: every draw depends on (seed, iteration, stage) only.
STAGE_IDS = {"tokenizer": 1, "init": 2, "sft": 3, "prompts": 4, "generate": 5, "score": 6,
             "create": 7, "generate_evolved": 8, "pairs": 9, "reference": 10, "train": 11,
             "evaluate": 12}


def stage_rng(seed: int, iteration: int, stage: str) -> np.random.Generator:
  return np.random.default_rng([seed, iteration + 1, STAGE_IDS[stage]])


def stage_key(seed: int, iteration: int, stage: str) -> jax.Array:
  key = jax.random.fold_in(jax.random.key(seed), iteration + 1)
  return jax.random.fold_in(key, STAGE_IDS[stage])


def prompt_ids(tokenizer, prompts: Sequence[str], max_prompt_length: int) -> list[list[int]]:
  """Chat-templated prompt ids, each keeping its last max_prompt_length tokens."""
  return [tokenizer.apply_chat_template(p, add_generation_prompt=True)[-max_prompt_length:]
          for p in prompts]


def generate(run, params, prompts: Sequence[str], *, key, num_samples: int, temperature: float,
             max_new_tokens: int) -> dict:
  """N responses per prompt: token ids, lengths, finished flags and decoded texts."""
  c, tok = run.config, run.tokenizer
  ids = prompt_ids(tok, prompts, c.sampling.max_prompt_length)
  tokens, lengths, finished = [], [], []
  # sampling.batch_size prompts per call bound the KV cache (and the compiles).
  chunk_size = c.sampling.batch_size
  for start in range(0, len(ids), chunk_size):
    chunk = ids[start:start + chunk_size]
    prompt_BxP, mask_BxP = pad_sequences(chunk, tok.pad_id)
    out = sampling.sample(
        run.model_config, params, prompt_BxP, mask_BxP,
        rng=jax.random.fold_in(key, start), num_samples=num_samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=c.sampling.top_p,
        top_k=c.sampling.top_k, eos_ids=tok.eos_ids, greedy=temperature == 0, mesh=run.mesh)
    wd.kill_point("sampling")
    tokens.append(sharding.to_host(out.tokens))
    lengths.append(sharding.to_host(out.lengths))
    finished.append(sharding.to_host(out.finished))
  tokens_PxNxT = np.concatenate(tokens)
  lengths_PxN = np.concatenate(lengths)
  texts = [[tok.decode(tokens_PxNxT[p, n, :lengths_PxN[p, n]]) for n in range(num_samples)]
           for p in range(len(prompts))]
  return {"tokens": tokens_PxNxT, "lengths": lengths_PxN, "finished": np.concatenate(finished),
          "texts": texts}


def score(run, prompts: Sequence[str], gen: dict) -> np.ndarray:
  """Rewards [P, N] of the generated responses."""
  return run.scorer.score_grouped(list(prompts), gen["texts"], truncated=~gen["finished"])


def best_worst_pairs(prompts: Sequence[str], gen: dict, rewards_PxN: np.ndarray,
                     source: str, *, min_chosen_reward: float = -math.inf) -> list[dict]:
  """Per prompt: chosen = the highest-reward response, rejected = the lowest.

  A prompt whose rewards all tie carries no preference and gives no pair; neither does one
  whose best response scores below `min_chosen_reward` (off by default, as in the paper).
  """
  pairs = []
  for p, prompt in enumerate(prompts):
    best, worst = int(np.argmax(rewards_PxN[p])), int(np.argmin(rewards_PxN[p]))
    if (rewards_PxN[p, best] <= rewards_PxN[p, worst]
        or rewards_PxN[p, best] < min_chosen_reward):
      continue
    take = lambda n: gen["tokens"][p, n, :gen["lengths"][p, n]].tolist()  # noqa: E731
    pairs.append({"prompt": prompt, "chosen": take(best), "rejected": take(worst),
                  "chosen_reward": float(rewards_PxN[p, best]),
                  "rejected_reward": float(rewards_PxN[p, worst]), "source": source})
  return pairs


def mix(run, base_pairs: list[dict], evolved_pairs: list[dict], rng) -> list[dict]:
  """eva: base/evolved mixed by creator.base_ratio; static: the base pairs. Both capped at
  train.num_pairs, so eva and static train on the same budget."""
  c = run.config
  if c.creator.enabled:
    mixed = creator.mix_pairs(base_pairs, evolved_pairs, base_ratio=c.creator.base_ratio,
                              rng=rng)
  else:
    mixed = [base_pairs[i] for i in rng.permutation(len(base_pairs))]
  return mixed[:c.train.num_pairs]


def _pair_batches(run, pairs: list[dict]) -> list[dict]:
  c, tok = run.config, run.tokenizer
  size = _batch_size(run)
  batches = []
  for start in range(0, len(pairs), size):
    chunk = pairs[start:start + size]
    batches.append(logprobs.make_pair_batch(
        prompt_ids(tok, [p["prompt"] for p in chunk], c.train.max_prompt_length),
        [p["chosen"] for p in chunk], [p["rejected"] for p in chunk],
        max_length=c.train.max_length, max_prompt_length=c.train.max_prompt_length,
        pad_id=tok.pad_id, batch_multiple=size, length_bucket=16))
  return batches


def reference(run, params, pairs: list[dict]) -> dict:
  """Summed log-probs of chosen and rejected under θ_t, computed once for the iteration."""
  if not pairs:
    return {"ref_chosen": np.zeros(0, np.float32), "ref_rejected": np.zeros(0, np.float32)}
  batches = _pair_batches(run, pairs)
  ref_c, ref_r = logprobs.reference_logprobs(run.model_config, params, batches, mesh=run.mesh,
                                             impl=run.config.train.logprob_impl)
  # Each batch is padded to the same row count with weight-0 pairs: keep the real rows.
  size = len(batches[0]["weights"])
  real = np.concatenate([np.arange(i * size, i * size + min(size, len(pairs) - i * size))
                         for i in range(len(batches))])
  return {"ref_chosen": np.asarray(ref_c, np.float32)[real],
          "ref_rejected": np.asarray(ref_r, np.float32)[real]}


def _batch_size(run) -> int:
  multiple = sharding.batch_multiple(run.mesh) * run.config.train.grad_accum
  return max(multiple, int(math.ceil(run.config.train.batch_size / multiple)) * multiple)


def optimizer_config(c, total_steps: int, *, sft: bool = False) -> train_state.OptimizerConfig:
  return train_state.OptimizerConfig(
      name="adamw" if sft else c.train.optimizer,
      learning_rate=c.sft.learning_rate if sft else c.train.learning_rate,
      total_steps=max(1, total_steps), warmup_ratio=c.train.warmup_ratio,
      weight_decay=c.train.weight_decay, max_grad_norm=c.train.grad_clip)


def _cached_step(run, opt_cfg, loss_cfg):
  """One jitted update per (optimizer, loss) config, reused by every iteration (a new closure
  would recompile)."""
  key = (repr(opt_cfg), repr(loss_cfg))
  if key not in run.cache:
    optimizer = train_state.make_optimizer(opt_cfg)
    run.cache[key] = optimizer, train.make_train_step(
        run.model_config, optimizer, run.mesh, loss_cfg,
        schedule=train_state.make_schedule(opt_cfg))
  return run.cache[key]


def train_iteration(run, params, pairs: list[dict], ref: dict, rng, log_step) -> object:
  """Preference optimization θ_t → θ_{t+1} over train.epochs passes of the pairs.

  The schedule spans the step count of a full budget (train.num_pairs pairs), the same for
  every iteration, so one compiled update serves the whole run.
  """
  c = run.config
  opt_cfg = optimizer_config(c, c.train.epochs * math.ceil(c.train.num_pairs / _batch_size(run)))
  loss_cfg = train.LossConfig(c.train.loss, beta=c.train.beta, hparams=dict(c.train.hparams),
                              accum_steps=c.train.grad_accum, logprob_impl=c.train.logprob_impl)
  optimizer, step = _cached_step(run, opt_cfg, loss_cfg)
  state = train_state.init_train_state(run.model_config, optimizer, run.mesh, params=params)
  if not pairs:
    return state
  for epoch in range(c.train.epochs):
    order = rng.permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    ref_c, ref_r = ref["ref_chosen"][order], ref["ref_rejected"][order]
    batches = _pair_batches(run, shuffled)
    sizes = [min(len(b["weights"]), int(b["weights"].sum())) for b in batches]
    for batch in logprobs.with_reference(batches, ref_c, ref_r, num_pairs=sizes):
      state, metrics = train.timed_step(step, state, batch, config=run.model_config)
      train.check_finite(metrics, int(state.step))
      wd.kill_point("train_step")
      log_step(int(state.step), epoch, metrics)
  return state


def sft_warm_start(run, examples: Sequence[tuple[str, str]], steps: int, rng, log_step):
  """Supervised warm-start, `steps` updates on (prompt, answer) examples; returns the state."""
  c, tok = run.config, run.tokenizer
  opt_cfg = optimizer_config(c, steps, sft=True)
  optimizer = train_state.make_optimizer(opt_cfg)
  state = train_state.init_train_state(run.model_config, optimizer, run.mesh, params=run.params)
  if steps == 0:
    return state
  step = train.make_train_step(run.model_config, optimizer, run.mesh, train.LossConfig("sft"),
                               schedule=train_state.make_schedule(opt_cfg))
  prompts = prompt_ids(tok, [p for p, _ in examples], c.train.max_prompt_length)
  responses = []
  for (prompt, answer), ids in zip(examples, prompts):
    # The answer's tokens are what the chat template appends after the generation prompt, so
    # the model learns the turn-end marker that stops sampling.
    full = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": answer}],
                                   add_generation_prompt=False)
    responses.append(full[len(tok.apply_chat_template(prompt, add_generation_prompt=True)):])
  multiple = sharding.batch_multiple(run.mesh)
  size = max(multiple, c.sft.batch_size // multiple * multiple)
  for i in range(steps):
    rows = rng.choice(len(examples), size=size, replace=False)
    batch = logprobs.make_sft_batch([prompts[r] for r in rows], [responses[r] for r in rows],
                                    max_length=c.train.max_length,
                                    max_prompt_length=c.train.max_prompt_length,
                                    pad_id=tok.pad_id, batch_multiple=multiple, length_bucket=16)
    state, metrics = train.timed_step(step, state, batch, config=run.model_config)
    train.check_finite(metrics, i)
    log_step(i, metrics)
  return state


def evaluate(run, params, heldout: Sequence[tuple[str, int, str]], key) -> dict:
  """Greedy answers on the held-out prompts, their rewards, overall and per difficulty level."""
  c = run.config
  prompts = [p for p, _, _ in heldout]
  gen = generate(run, params, prompts, key=key, num_samples=1, temperature=c.eval.temperature,
                 max_new_tokens=c.eval.max_new_tokens)
  rewards = score(run, prompts, gen)[:, 0]
  by_level = {}
  for level in sorted({lv for _, lv, _ in heldout}):
    sel = [i for i, (_, lv, _) in enumerate(heldout) if lv == level]
    by_level[str(level)] = float(rewards[sel].mean())
  return {"rewards": rewards.tolist(), "answers": [t[0] for t in gen["texts"]],
          "heldout_reward": float(rewards.mean()), "heldout_by_level": by_level}
