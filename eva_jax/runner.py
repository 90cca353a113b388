"""The offline eva loop: warm-start, then eva iterations, each stage's output cached in the workdir.

    run(config, workdir)

Per iteration t (DESIGN.md): prompts → generate → score → create → generate/score the evolved
prompts → pairs → reference → train → evaluate → report. The stages are `eva_jax.stages`; this
module only orders them, caches each artifact under `iter_{t:03d}/` (written atomically; on
restart an artifact that exists is loaded instead of recomputed, and training resumes from the
Orbax checkpoint of θ_t) and reports. Every draw derives from (seed, iteration, stage), so a run
killed anywhere and restarted ends with the same params as an uninterrupted one.

Multi-host: every process runs every stage on the same (small, host-side) text data and so makes
the same global decisions; device work is sharded over the global mesh; only process 0 writes.
"""
from __future__ import annotations

import json
from typing import Optional

import ml_collections
import numpy as np

from eva_jax import config_check, context, creator, export, fileio, report, sources, stages
from eva_jax import workdir as wd
from eva_jax.buffer import PromptBuffer

_RUN_FILES = ("metrics.jsonl", "report.md", "config.json", config_check.RUN_INFO)


def _cached_json(path: str, compute):
  if fileio.exists(path):
    return wd.read_json(path)
  value = compute()
  wd.write_json(path, value)
  return value


def _cached_npz(path: str, compute) -> dict:
  if fileio.exists(path):
    return wd.read_npz(path)
  value = compute()
  wd.write_npz(path, **value)
  return value


def _generate_scored(ctx, policy, t: int, name: str, prompts: list[str]) -> tuple:
  """generate + score for a prompt list, each an artifact; returns (gen dict, rewards [P, N])."""
  c = ctx.config
  if not prompts:
    return None, np.zeros((0, c.sampling.num_samples), np.float32)

  def compute():
    gen = stages.generate(policy, prompts, key=stages.stage_key(c.seed, t, name),
                          sampling_cfg=c.sampling)
    gen["texts_json"] = np.asarray(json.dumps(gen.pop("texts")))
    return gen
  gen = dict(_cached_npz(ctx.path(t, f"{name}.npz"), compute))
  gen["texts"] = json.loads(str(gen.pop("texts_json")))
  scores = _cached_npz(ctx.path(t, f"{name}_scores.npz"),
                       lambda: {"rewards": stages.score(ctx.scorer, prompts, gen)})
  ctx.metrics.log("stage", t, stage=name, prompts=len(prompts),
                  mean_reward=float(np.mean(scores["rewards"])),
                  finished=float(np.mean(gen["finished"])))
  return gen, scores["rewards"]


def _warm_start(ctx) -> None:
  c = ctx.config
  if ctx.checkpoints.has(0):
    return
  examples = ctx.source.sft_examples(c.sft.num_examples, c.sft.max_level)
  steps = c.sft.steps if examples else 0  # A source without SFT data keeps the loaded weights.
  state = stages.sft_warm_start(
      ctx.policy, examples, steps, stages.stage_rng(c.seed, -1, "sft"),
      lambda i, m: ctx.metrics.log("sft", i, **m) if i % 20 == 0 or i == steps - 1 else None,
      sft_cfg=c.sft, train_cfg=c.train)
  ctx.checkpoints.save(0, state)


def _create(ctx, policy, t: int, prompts: list[dict], rewards, info) -> dict:
  c, prev = ctx.config, ctx.path(t - 1, "buffer.jsonl")
  buffer = PromptBuffer.load(prev) if t > 0 and fileio.exists(prev) else PromptBuffer()
  buffer, created = stages.create(
      buffer, [p["text"] for p in prompts], rewards, info, iteration=t, creator_cfg=c.creator,
      evolver=ctx.evolver(policy), rng=stages.stage_rng(c.seed, t, "create"),
      token_count=lambda s: len(policy.tokenizer.encode(s)),
      dataset_ids=[p["id"] for p in prompts])
  if wd.is_writer():
    buffer.save(ctx.path(t, "buffer.jsonl"))
  return created


def _iteration(ctx, t: int, baseline: Optional[dict]) -> dict:
  c, done_path = ctx.config, ctx.path(t, "evaluate.json")
  latest = ctx.checkpoints.latest()
  # Finished: evaluated, and θ_{t+1} (or a later checkpoint: keep-N drops old ones) is saved.
  if fileio.exists(done_path) and latest is not None and latest >= t + 1:
    return wd.read_json(done_path)
  policy = ctx.policy_at(t)
  prompts = _cached_json(ctx.path(t, "prompts.json"), lambda: [
      {"text": p.text, "id": p.id} for p in ctx.source.base_prompts(t)])
  texts = [p["text"] for p in prompts]
  gen, rewards = _generate_scored(ctx, policy, t, "generate", texts)
  floor = c.train.min_chosen_reward
  base_pairs = stages.best_worst_pairs(texts, gen, rewards, "base", min_chosen_reward=floor)
  evolved_pairs, info = [], creator.informativeness(rewards, c.creator.metric)
  if c.creator.enabled:
    created = _cached_json(ctx.path(t, "create.json"),
                           lambda: _create(ctx, policy, t, prompts, rewards, info))
    gen_e, rewards_e = _generate_scored(ctx, policy, t, "generate_evolved", created["evolved"])
    if created["evolved"]:
      evolved_pairs = stages.best_worst_pairs(created["evolved"], gen_e, rewards_e, "evolved",
                                              min_chosen_reward=floor)
  pairs = _cached_json(ctx.path(t, "pairs.json"), lambda: stages.mix(
      base_pairs, evolved_pairs, stages.stage_rng(c.seed, t, "pairs"), creator_cfg=c.creator,
      num_pairs=c.train.num_pairs))
  ref = _cached_npz(ctx.path(t, "reference.npz"),
                    lambda: stages.reference(policy, pairs, train_cfg=c.train))
  ctx.metrics.log("stage", t, stage="pairs", pairs=len(pairs),
                  base=sum(p["source"] == "base" for p in pairs), evolved=len(evolved_pairs),
                  mean_informativeness=float(np.mean(info)))
  if not ctx.checkpoints.has(t + 1):
    state = stages.train_iteration(
        policy, pairs, ref, stages.stage_rng(c.seed, t, "train"),
        lambda s, e, m: ctx.metrics.log("train", t * 100_000 + s, iteration=t, epoch=e, **m),
        train_cfg=c.train)
    ctx.checkpoints.save(t + 1, state)

  def evaluate():
    out = _evaluate(ctx, ctx.policy_at(t + 1), t)
    out["win_rate"] = export.win_rate(out["rewards"], baseline["rewards"]) if baseline else None
    out.update(iteration=t + 1, sample_rewards=np.asarray(rewards).ravel().tolist(),
               informativeness=np.asarray(info).tolist())
    return out
  result = _cached_json(done_path, evaluate)
  ctx.metrics.log("eval", t + 1, heldout_reward=result["heldout_reward"],
                  win_rate=result["win_rate"] if result["win_rate"] is not None else float("nan"),
                  **{f"level_{k}": v for k, v in result["heldout_by_level"].items()})
  return result


def _evaluate(ctx, policy, t: int) -> dict:
  c = ctx.config
  return stages.evaluate(policy, ctx.scorer, ctx.source.heldout(),
                         key=stages.stage_key(c.seed, t, "evaluate"), sampling_cfg=c.sampling,
                         eval_cfg=c.eval)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the last evaluation summary."""
  c = config
  config_check.validate(c)
  source = sources.make(c)  # Refuses a prompt set too small for the run before any writing.
  wd.check_writable(workdir)
  config_check.check_workdir_config(c, fileio.join(workdir, "config.json"))
  mesh = context.make_mesh(c.mesh)
  run_info = {"mesh": context.mesh_shape(mesh)}
  config_check.check_workdir_run_info(c, run_info, fileio.join(workdir, config_check.RUN_INFO))
  if c.overwrite and wd.is_writer():
    _clear(workdir)
  wd.write_json(fileio.join(workdir, "config.json"), json.loads(c.to_json()))
  wd.write_json(fileio.join(workdir, config_check.RUN_INFO), run_info)
  ctx = context.setup(c, workdir, source, mesh)
  try:
    _warm_start(ctx)
    ctx.policy = ctx.policy.with_params(None)  # θ_t comes from the checkpoints from here on.
    base = _cached_json(ctx.path(0, "evaluate_warmstart.json"),
                        lambda: _evaluate(ctx, ctx.policy_at(0), -1))
    ctx.metrics.log("eval", 0, heldout_reward=base["heldout_reward"],
                    **{f"level_{k}": v for k, v in base["heldout_by_level"].items()})
    summaries = [dict(base, iteration=0)]
    for t in range(c.iterations):
      summaries.append(_iteration(ctx, t, base))
      _report(ctx, summaries)
    return summaries[-1]
  finally:
    ctx.close()


def _report(ctx, summaries: list[dict]) -> None:
  last = ctx.path(len(summaries) - 2, "buffer.jsonl")
  lineage = PromptBuffer.load(last).lineage_counts() if fileio.exists(last) else {}
  report.write_report(ctx.workdir, [
      {"iteration": s["iteration"], "rewards": s.get("sample_rewards", []),
       "informativeness": s.get("informativeness", []), "heldout_reward": s["heldout_reward"],
       "heldout_by_level": s["heldout_by_level"], "win_rate": s.get("win_rate")}
      for s in summaries], lineage)


def _clear(workdir: str) -> None:
  """--config.overwrite: removes a previous run's artifacts (only what the runner writes)."""
  for name in fileio.listdir(workdir):
    if name.startswith("iter_") or name in ("checkpoints", "tb", "plots") + _RUN_FILES:
      fileio.remove(fileio.join(workdir, name))
