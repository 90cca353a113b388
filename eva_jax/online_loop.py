"""The online eva loop: RLOO with the creator inside it.

    run(config, workdir)        (main.py calls it for a config with an `online` section)

The offline warm-start (`runner.warm_start`, checkpoint θ_0) first; θ_0 stays the frozen
reference of the KL term. Then `online.steps` steps, each (DESIGN.md, "The online loop"):

  draw    P prompts from the buffer (`online_buffer`: base and evolved mixed, unvisited first,
          then by informativeness)
  sample  K responses each from the current params, temperature 1, no top-p / top-k: on-policy
  score   ctx.scorer; the group rewards give each prompt's informativeness for free
  update  RLOO (`online.make_rloo_step`): reward − β·KL(π_old ‖ θ_0) per sequence,
          leave-one-out advantages, `updates_per_step` updates (clipped when > 1)
  buffer  record visits and informativeness; solved and stale prompts leave; the base pool is
          refilled from the source; after the warm-up, every `evolve_every` steps the creator
          evolves the selected prompts (or, static, fresh source prompts take the evolved slots)

The sampler and the update read the same params on the same mesh: no copy, no sync; the gap
between the sampler's and the trainer's log-probs of the same samples is logged. Every draw
derives from (seed, step, stage), so the train state (Orbax, `online/checkpoints/<step>`) and
the buffer (`online/buffer_<step>.json`, written before its checkpoint) are all a resume needs:
a run killed anywhere ends with the same params as an uninterrupted one. Held-out evaluations
are artifacts (`online/evaluate_<step>.json`); report.md is rewritten after each.

`online.token_budget` > 0 ends the run after the step at which its generated tokens (policy
samples + creator rewrites: the buffer's counters) reach it, with the final evaluation, checkpoint
and report of a normal end; a resume reads the end from the counters of the last checkpoint.
"""
from __future__ import annotations

import io
import time

import jax
import ml_collections
import numpy as np

from eva_jax import (config_check, console, context, creator, export, fileio, models, online,
                     report, runner, sampling, sharding, stages, train, train_state)
from eva_jax import workdir as wd
from eva_jax.online_buffer import OnlineBuffer, SourceStream, is_evolve_step

# Stage ids of the online draws, folded into (seed, step) as stages.STAGE_IDS are.
STAGE_IDS = {"draw": 101, "sample": 102, "evolve": 103}
# Per-step metrics that measure time: they differ between runs of the same config.
TIME_KEYS = ("time", "wall_seconds", "time_sample", "time_score", "time_logprobs", "time_update",
             "time_create")


def stage_rng(seed: int, step: int, stage: str) -> np.random.Generator:
  return np.random.default_rng([seed, step + 1, STAGE_IDS[stage]])


def stage_key(seed: int, step: int, stage: str) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step + 1), STAGE_IDS[stage])


def optimizer_config(c) -> train_state.OptimizerConfig:
  """c.train's optimizer and schedule at online.learning_rate, over all the run's updates."""
  return stages.optimizer_config(c.train, c.online.steps * c.online.updates_per_step,
                                 learning_rate=c.online.learning_rate)


class _CountingEvolver:
  """An evolver that counts the tokens of every candidate it proposes (the creator's budget;
  the synthetic evolver generates none, so its texts stand for what an LM would write)."""

  def __init__(self, evolver, count_tokens):
    self.evolver, self.count_tokens, self.tokens = evolver, count_tokens, 0

  def evolve(self, prompts, *, rng, iteration):
    candidates = self.evolver.evolve(prompts, rng=rng, iteration=iteration)
    self.tokens += sum(self.count_tokens(c.text) for c in candidates if c.text)
    return candidates


def budget_reached(counters: dict, token_budget: int) -> bool:
  """Whether a run's generated tokens (`counters`: OnlineBuffer.counters) reach `token_budget`
  (0: no budget)."""
  used = counters.get("policy_tokens", 0) + counters.get("creator_tokens", 0)
  return token_budget > 0 and used >= token_budget


def _path(ctx, name: str) -> str:
  return fileio.join(ctx.workdir, "online", name)


def _rollout(ctx, policy, ref_params, texts, s):
  """Samples, scores and lays out one step's batch -> (rollout batch, rewards [P, K], logs)."""
  c, oc, tok, mesh = ctx.config, ctx.config.online, policy.tokenizer, policy.mesh
  start = time.perf_counter()
  ids = stages.prompt_ids(tok, texts, c.sampling.max_prompt_length)
  out = sampling.sample_batched(
      policy.model_config, policy.params, ids, rng=stage_key(c.seed, s, "sample"),
      # Chunks of sampling.batch_size prompts bound the KV cache (sized by the memory plan).
      batch_size=min(len(ids), c.sampling.batch_size), num_samples=oc.num_samples,
      max_new_tokens=oc.max_new_tokens,
      pad_id=tok.pad_id, temperature=1.0, top_p=1.0, top_k=0, eos_ids=tok.eos_ids,
      mesh=mesh, rules=policy.rules)
  logs = {"time_sample": time.perf_counter() - start}
  start = time.perf_counter()
  gen = {"finished": out.finished, "texts": [
      [tok.decode(out.tokens[p, k, :out.lengths[p, k]]) for k in range(oc.num_samples)]
      for p in range(len(texts))]}
  rewards_PxK = stages.score(ctx.scorer, texts, gen)
  logs["time_score"] = time.perf_counter() - start
  # Fixed prompt width and response length: one compile of the forward and the update.
  prompts_PxS = np.full((len(ids), c.sampling.max_prompt_length), tok.pad_id, np.int32)
  mask_PxS = np.zeros_like(prompts_PxS)
  for p, row in enumerate(ids):
    prompts_PxS[p, :len(row)], mask_PxS[p, :len(row)] = row, 1
  batch = online.make_rollout_batch(
      prompts_PxS, mask_PxS, out.tokens, out.lengths,
      batch_multiple=oc.grad_accum * sharding.batch_multiple(mesh))
  rows, shape = rewards_PxK.size, rewards_PxK.shape
  start = time.perf_counter()
  old_R = online.rollout_logprobs(policy.model_config, policy.params, batch, mesh=mesh)[:rows]
  ref_R = online.rollout_logprobs(policy.model_config, ref_params, batch, mesh=mesh)[:rows]
  logs["time_logprobs"] = time.perf_counter() - start
  sampler_R = np.asarray(out.logprobs, np.float32).sum(-1).reshape(-1)
  batch = online.with_advantages(
      batch, rewards_PxK, kl_PxK=(old_R - ref_R).reshape(shape), beta=oc.beta,
      old_logprobs_PxK=old_R.reshape(shape) if oc.updates_per_step > 1 else None)
  logs.update(sampler_trainer_logp_diff=float(np.abs(sampler_R - old_R).mean()),
              sampler_trainer_logp_diff_max=float(np.abs(sampler_R - old_R).max()),
              truncated=float(1 - np.mean(out.finished)),
              policy_tokens=int(np.sum(out.lengths)))
  return batch, rewards_PxK, logs


def _evolve(ctx, policy, buf: OnlineBuffer, stream, s: int) -> dict:
  """The creator after step s: select among the visited active prompts by informativeness,
  evolve and filter (as stages.create), or under static add as many fresh source prompts."""
  c = ctx.config
  visited = buf.visited()
  if not visited:
    return {}
  rng = stage_rng(c.seed, s, "evolve")
  scores = np.array([buf.active[i].info for i in visited])
  chosen = creator.select(scores, fraction=c.creator.fraction, method=c.creator.selection,
                          rng=rng)
  if not c.creator.enabled:
    count = len(buf.pool("evolved")) + len(chosen) * c.creator.num_evolutions
    added = buf.refill(stream, count, step=s + 1, pool="evolved")
    return {"created": len(added), "creator_tokens": 0}
  count_tokens = lambda text: len(policy.tokenizer.encode(text))  # noqa: E731
  evolver = _CountingEvolver(ctx.evolver(policy), count_tokens)
  rejected: dict[str, int] = {}
  records = creator.evolve_round(
      buf.records, [visited[i] for i in chosen], evolver, rng=rng, iteration=s + 1,
      tokenizer_len_fn=count_tokens, min_tokens=c.creator.min_tokens,
      max_tokens=c.creator.max_tokens, max_similarity=c.creator.max_similarity,
      rejections=rejected)
  buf.add_evolved(records, step=s + 1)
  return {"created": len(records), "rejected": sum(rejected.values()),
          "creator_tokens": evolver.tokens}


def _step(ctx, update, state, ref_params, buf: OnlineBuffer, stream, s: int):
  """Online step s (0-based) -> (new state, its metrics row, rewards [P, K], informativeness
  [P]); `buf` is updated in place."""
  c, oc = ctx.config, ctx.config.online
  start = time.perf_counter()
  policy = ctx.policy.with_params(state.params)
  ids = buf.draw(oc.prompts_per_step, base_ratio=oc.base_ratio, info_floor=oc.info_floor,
                 rng=stage_rng(c.seed, s, "draw"))
  texts = [buf.records.get(i).text for i in ids]
  evolved_P = np.array([buf.active[i].pool == "evolved" for i in ids])
  batch, rewards_PxK, row = _rollout(ctx, policy, ref_params, texts, s)
  update_start = time.perf_counter()
  for _ in range(oc.updates_per_step):
    state, metrics = update(state, batch)
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  train.check_finite(metrics, s)
  row["time_update"] = time.perf_counter() - update_start
  # The creator's side: this step's informativeness, evictions, refill and evolution.
  create_start = time.perf_counter()
  info_P = creator.informativeness(rewards_PxK, c.creator.metric)
  buf.record(ids, rewards_PxK, info_P)
  evicted = buf.evict(ids, solved_reward=oc.solved_reward, max_visits=oc.max_visits,
                      max_zero_visits=oc.max_zero_visits)
  created = {}
  if is_evolve_step(s, warmup_steps=oc.warmup_steps, evolve_every=oc.evolve_every):
    created = _evolve(ctx, policy.with_params(state.params), buf, stream, s)
  evicted["capacity"] = buf.trim("evolved", oc.evolved_pool)
  buf.refill(stream, oc.base_pool, step=s + 1)
  row["time_create"] = time.perf_counter() - create_start
  row["wall_seconds"] = time.perf_counter() - start
  counters = buf.counters
  for key, value in (("policy_tokens", row["policy_tokens"]),
                     ("creator_tokens", created.get("creator_tokens", 0)),
                     ("created", created.get("created", 0)),
                     ("wall_seconds", row["wall_seconds"]),
                     *((f"evicted_{k}", v) for k, v in evicted.items())):
    counters[key] = counters.get(key, 0) + value
  mean = lambda x: float(np.mean(x)) if np.size(x) else float("nan")  # noqa: E731
  row.update(
      {k: metrics[k] for k in ("loss", "adv_abs", "no_signal", "kl", "entropy", "grad_norm",
                               "response_length", "learning_rate", "ratio", "clipped")},
      reward=mean(rewards_PxK), reward_base=mean(rewards_PxK[~evolved_P]),
      reward_evolved=mean(rewards_PxK[evolved_P]), batch_evolved_share=mean(evolved_P),
      batch_informativeness=mean(info_P), evicted=sum(evicted.values()),
      **{f"evicted_{k}": v for k, v in evicted.items()}, created=created.get("created", 0),
      rejected=created.get("rejected", 0), **buf.stats(), updates=int(state.step),
      **{f"total_{k}": v for k, v in counters.items()})
  return state, row, rewards_PxK, info_P


def _evaluate(ctx, params, s: int, baseline=None, **extra) -> dict:
  """The held-out evaluation after step s (an artifact: read back when it exists); `extra`
  (the step's sample rewards and informativeness, for the report) is stored with it."""
  c = ctx.config

  def compute():
    out = stages.evaluate(ctx.policy.with_params(params), ctx.scorer, ctx.source.heldout(),
                          key=stages.stage_key(c.seed, -1, "evaluate"), sampling_cfg=c.sampling,
                          eval_cfg=c.eval, progress=console.bar)
    out["win_rate"] = export.win_rate(out["rewards"], baseline["rewards"]) if baseline else None
    ctx.metrics.log("eval", s, heldout_reward=out["heldout_reward"],
                    **{f"level_{k}": v for k, v in out["heldout_by_level"].items()})
    return dict(out, step=s, **extra)
  with console.Stage(ctx.metrics, "evaluate", s) as st:
    result = wd.cached_json(_path(ctx, f"evaluate_{s:06d}.json"), st.compute(compute))
    st.note(heldout_reward=result["heldout_reward"])
  return result


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the online experiment in `workdir`; returns the last evaluation."""
  c, oc = config, config.online
  source, mesh = config_check.prepare_run(c, workdir)
  ctx = context.setup(c, workdir, source, mesh)
  # Their own manager: keep-N over the online steps must never prune θ_0, the KL reference.
  checkpoints = wd.Checkpoints(fileio.join(workdir, "online"), keep=max(2, c.checkpoint.keep),
                               use_async=c.checkpoint.use_async)
  try:
    runner.warm_start(ctx)  # The offline run's θ_0.
    ref_params = ctx.policy_at(0).params
    ctx.policy = ctx.policy.with_params(None)
    policy = ctx.policy
    base = _evaluate(ctx, ref_params, 0)
    opt_cfg = optimizer_config(c)
    optimizer = train_state.make_optimizer(opt_cfg)
    update = online.make_rloo_step(
        policy.model_config, optimizer, mesh, accum_steps=oc.grad_accum,
        clip_eps=oc.clip_eps if oc.updates_per_step > 1 else None,
        impl=c.train.logprob_impl, schedule=train_state.make_schedule(opt_cfg),
        rules=policy.rules)
    stream, start = SourceStream(source), checkpoints.latest() or 0
    if start:
      state = context.restore_state(checkpoints, ctx.policy, optimizer, start)
      buf = OnlineBuffer.from_json(wd.read_json(_path(ctx, f"buffer_{start:06d}.json")))
    else:
      state = train_state.init_train_state(policy.model_config, optimizer, mesh,
                                           params=ref_params, rules=policy.rules)
      buf = OnlineBuffer()
      buf.refill(stream, oc.base_pool, step=0)
    # The frozen reference only feeds forwards, which read it in the compute dtype: held so
    # (bfloat16 for the paper configs, half the float32 copy; its log-probs are unchanged).
    ref_params = models.inference_params(policy.model_config, ref_params)
    eval_steps = _eval_steps(oc)
    ended = start == oc.steps or budget_reached(buf.counters, oc.token_budget)
    # Evaluated before their checkpoints were saved: read back, never recomputed.
    evals = [base] + [_evaluate(ctx, None, s, base) for s in eval_steps if s <= start]
    if ended and start not in eval_steps:  # Ended by the budget at `start`.
      evals.append(_evaluate(ctx, None, start, base))
    with console.bar("online", oc.steps, "step") as bar:
      bar.update(start)
      for s in range(start, start if ended else oc.steps):
        state, row, rewards_PxK, info_P = _step(ctx, update, state, ref_params, buf, stream, s)
        ctx.metrics.log("online", s + 1, **row)
        wd.kill_point("online_step")
        last = s + 1 == oc.steps or budget_reached(buf.counters, oc.token_budget)
        if (s + 1) % oc.log_every == 0 or last:
          console.say(console.stage_line("online", s + 1, row["wall_seconds"], {
              k: row[k] for k in ("reward", "kl", "no_signal", "buffer_size",
                                  "buffer_evolved")}))
        if last and s + 1 < oc.steps:
          console.say(f"online: token budget {oc.token_budget} reached after step {s + 1}")
        evaluated = s + 1 in eval_steps or last
        if evaluated:  # Before its checkpoint: a resume reads it back.
          evals.append(_evaluate(ctx, state.params, s + 1, base,
                                 sample_rewards=rewards_PxK.ravel().tolist(),
                                 informativeness=info_P.tolist()))
        if (s + 1) % oc.checkpoint_every == 0 or evaluated:
          wd.write_json(_path(ctx, f"buffer_{s + 1:06d}.json"), buf.to_json())
          checkpoints.save(s + 1, state)
        if evaluated:
          _report(ctx, evals, buf)
        bar.update(1)
        if last:
          break
    if ended:  # Finished before: the report again (a kill may have cut it).
      _report(ctx, evals, buf)
    return evals[-1]
  finally:
    checkpoints.close()
    ctx.close()


def _eval_steps(oc) -> list[int]:
  return sorted(set(range(oc.eval_every, oc.steps + 1, oc.eval_every)) | {oc.steps})


# The budget and buffer figures of the report's online table (the last step's).
REPORT_KEYS = ("updates", "total_policy_tokens", "total_creator_tokens", "buffer_size",
               "buffer_evolved", "total_created", "total_evicted_solved",
               "total_evicted_no_signal", "total_evicted_max_visits", "total_evicted_capacity",
               "lineage_depth_max", "total_wall_seconds")


def _report(ctx, evals: list[dict], buf: OnlineBuffer) -> None:
  """The offline report over the evaluations (iteration = online step), then the online
  section: per-step curves from metrics.jsonl and the budget."""
  ctx.metrics.flush()
  report.write_report(ctx.workdir, [
      {"iteration": e["step"], "rewards": e.get("sample_rewards", []),
       "informativeness": e.get("informativeness", []), "heldout_reward": e["heldout_reward"],
       "heldout_by_level": e["heldout_by_level"], "win_rate": e.get("win_rate")}
      for e in evals], buf.records.lineage_counts(), decode=ctx.policy.tokenizer.decode)
  if not wd.is_writer():
    return
  rows = {r["step"]: r for r in ctx.metrics.read("online")}  # The last row of each step.
  steps = sorted(rows)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel  (report: Agg)
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
  for ax, keys in zip(axes, (("reward_base", "reward_evolved"), ("kl", "adv_abs", "no_signal"),
                             ("buffer_size", "buffer_evolved"))):
    for key in keys:
      ax.plot(steps, [rows[s].get(key, np.nan) for s in steps], label=key)
    ax.set(xlabel="online step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=90)
  plt.close(fig)
  fileio.atomic_write(fileio.join(ctx.workdir, "plots", "online.png"), png.getvalue())
  lines = ["", "## Online (RLOO with the creator in the loop)", "",
           "The iterations above are online steps (0 = the warm-start θ_0).", "",
           "![online](plots/online.png)", ""]
  if steps:
    last = rows[steps[-1]]
    lines += ["| step | " + " | ".join(REPORT_KEYS) + " |", "|" + "---|" * (len(REPORT_KEYS) + 1),
              f"| {steps[-1]} | " + " | ".join(f"{last.get(k, float('nan')):.6g}"
                                               for k in REPORT_KEYS) + " |", ""]
  path = fileio.join(ctx.workdir, "report.md")
  fileio.atomic_write(path, fileio.read_text(path) + "\n".join(lines))
