"""The offline eva loop: warm-start, then eva iterations, each stage's output cached in the workdir.

    run(config, workdir)

Per iteration t (DESIGN.md): prompts → generate → score → create → generate/score the evolved
prompts → pairs → reference → train → evaluate → report. The stages are `eva_jax.stages`; this
module only orders them, caches each artifact under `iter_{t:03d}/` (written atomically; on
restart an artifact that exists is loaded instead of recomputed, and training resumes from the
Orbax checkpoint of θ_t) and reports. Every draw derives from (seed, iteration, stage), so a run
killed anywhere and restarted ends with the same params as an uninterrupted one.

Faults: a corrupt (zero-byte, truncated) stage artifact is recomputed with a warning naming it,
identically; what cannot be recomputed (a committed checkpoint, the prompt buffer an iteration
hands on once its checkpoint is pruned) stops the run with one CorruptArtifact naming it; a
failed write (disk full) stops the run and leaves the earlier artifacts as they were.

Multi-host: every process runs every stage on the same (small, host-side) text data and so makes
the same global decisions; device work is sharded over the global mesh; only process 0 writes.
"""
from __future__ import annotations

import json
from typing import Optional

import ml_collections
import numpy as np

from eva_jax import config_check, console, context, creator, export, fileio, protocol, report
from eva_jax import stages
from eva_jax import workdir as wd
from eva_jax.buffer import PromptBuffer

def _generate_scored(ctx, policy, t: int, name: str, prompts: list[str]) -> tuple:
  """generate + score for a prompt list, each an artifact; returns (gen dict, rewards [P, N])."""
  c = ctx.config
  if not prompts:
    return None, np.zeros((0, c.sampling.num_samples), np.float32)

  def compute():
    gen = stages.generate(policy, prompts, key=stages.stage_key(c.seed, t, name),
                          sampling_cfg=c.sampling, progress=console.bar, desc=name)
    gen["texts_json"] = np.asarray(json.dumps(gen.pop("texts")))
    return gen
  with console.Stage(ctx.metrics, name, t) as st:
    gen = dict(wd.cached_npz(ctx.path(t, f"{name}.npz"), st.compute(compute)))
    st.note(prompts=len(prompts), samples=int(np.size(gen["finished"])),
            finished=float(np.mean(gen["finished"])))
  gen["texts"] = json.loads(str(gen.pop("texts_json")))
  scored = name.replace("generate", "score")
  with console.Stage(ctx.metrics, scored, t) as st:
    scores = wd.cached_npz(ctx.path(t, f"{name}_scores.npz"), st.compute(lambda: {
        "rewards": stages.score(ctx.scorer, prompts, gen, progress=console.bar, desc=scored)}))
    st.note(mean_reward=float(np.mean(scores["rewards"])))
  return gen, scores["rewards"]


def warm_start(ctx) -> None:  # θ_0, checkpoint 0: the SFT warm-start or the loaded weights.
  c = ctx.config
  with console.Stage(ctx.metrics, "sft", -1) as st:
    if ctx.checkpoints.latest() is not None:  # θ_0, or a later θ_t once keep-N dropped θ_0.
      return
    st.computed = True
    examples = ctx.source.sft_examples(c.sft.num_examples, c.sft.max_level)
    steps = c.sft.steps if examples else 0  # A source without SFT data keeps the loaded weights.
    last = {}

    def log_step(i, m):
      last.update(m)
      if i % 20 == 0 or i == steps - 1:
        ctx.metrics.log("sft", i, **m)
    state = stages.sft_warm_start(
        ctx.policy, examples, steps, stages.stage_rng(c.seed, -1, "sft"), log_step,
        sft_cfg=c.sft, train_cfg=c.train, progress=console.bar)
    ctx.checkpoints.save(0, state)
    st.note(steps=steps, examples=len(examples), **{k: last[k] for k in ("loss",) if k in last})


def _base_prompts(ctx, t: int) -> list[dict]:
  c = ctx.config
  chunk, _ = protocol.iteration_plan(c.protocol, t, c.creator.enabled)
  prompts = ctx.source.base_prompts(chunk)
  if c.protocol == "paper" and t == 0:
    # Static draws larger chunks (sources.prompts_per_iteration); its θ1 must be eva's, so
    # iteration 0 keeps the first data.num_prompts, the same prompts in both arms.
    prompts = prompts[:c.data.num_prompts]
  return [{"text": p.text, "id": p.id, "topic": p.topic} for p in prompts]


def _create(ctx, policy, t: int, prompts: list[dict], rewards, info) -> dict:
  c, prev = ctx.config, ctx.path(t - 1, "buffer.jsonl")
  buffer = wd.load_buffer(prev) if t > 0 and fileio.exists(prev) else PromptBuffer()
  buffer, created = stages.create(
      buffer, [p["text"] for p in prompts], rewards, info, iteration=t, creator_cfg=c.creator,
      evolver=ctx.evolver(policy), rng=stages.stage_rng(c.seed, t, "create"),
      token_count=lambda s: len(policy.tokenizer.encode(s)),
      dataset_ids=[p["id"] for p in prompts], topics=_topics(prompts))
  if wd.is_writer():
    buffer.save(ctx.path(t, "buffer.jsonl"))
  return created


def _iteration(ctx, t: int, baseline: Optional[dict]) -> dict:
  c, done_path = ctx.config, ctx.path(t, "evaluate.json")
  latest = ctx.checkpoints.latest()
  # Finished: evaluated, and θ_{t+1} (or a later checkpoint: keep-N drops old ones) is saved.
  if latest is not None and latest >= t + 1:
    done = wd.read_cached(done_path, wd.read_json)
    if done is not None:
      console.say(console.stage_line("all stages", t, None,
                                     {"heldout_reward": done["heldout_reward"]}))
      return done
  policy = ctx.policy_at(t)
  prompts = wd.cached_json(ctx.path(t, "prompts.json"), lambda: _base_prompts(ctx, t))
  texts = [p["text"] for p in prompts]
  _, creator_on = protocol.iteration_plan(c.protocol, t, c.creator.enabled)
  gen, rewards = _generate_scored(ctx, policy, t, "generate", texts)
  floor, scale = c.train.min_chosen_reward, c.train.win_prob_scale
  base_pairs = stages.best_worst_pairs(texts, gen, rewards, "base", min_chosen_reward=floor,
                                       win_prob_scale=scale)
  evolved_pairs, info = [], creator.informativeness(rewards, c.creator.metric)
  if creator_on and not c.creator.evolve:
    base_pairs = _informative_subset(ctx, t, prompts, info, base_pairs)
  elif creator_on:
    with console.Stage(ctx.metrics, "create", t) as st:
      created = wd.cached_json(ctx.path(t, "create.json"),
                             st.compute(lambda: _create(ctx, policy, t, prompts, rewards, info)))
      rejected = created.get("rejected", {})
      st.note(selected=len(created["selected"]), evolved=len(created["evolved"]),
              rejected=sum(rejected.values()), **({"by_reason": rejected} if rejected else {}))
    gen_e, rewards_e = _generate_scored(ctx, policy, t, "generate_evolved", created["evolved"])
    if created["evolved"]:
      evolved_pairs = stages.best_worst_pairs(created["evolved"], gen_e, rewards_e, "evolved",
                                              min_chosen_reward=floor, win_prob_scale=scale)
  with console.Stage(ctx.metrics, "pairs", t) as st:
    pairs = wd.cached_json(ctx.path(t, "pairs.json"), st.compute(lambda: stages.mix(
        base_pairs, evolved_pairs, stages.stage_rng(c.seed, t, "pairs"), creator_cfg=c.creator,
        num_pairs=c.train.num_pairs)))
    st.note(pairs=len(pairs), base=sum(p["source"] == "base" for p in pairs),
            evolved=sum(p["source"] == "evolved" for p in pairs),
            evolved_available=len(evolved_pairs), mean_informativeness=float(np.mean(info)))
  with console.Stage(ctx.metrics, "reference", t) as st:
    ref = wd.cached_npz(ctx.path(t, "reference.npz"), st.compute(
        lambda: stages.reference(policy, pairs, train_cfg=c.train, progress=console.bar)))
    st.note(pairs=len(pairs))
  with console.Stage(ctx.metrics, "train", t) as st:
    if not ctx.checkpoints.has(t + 1):
      st.computed = True
      st.note(**_train(ctx, t, policy, pairs, ref))
  # θ_t is done with (the update took its buffers over): evaluation holds only θ_{t+1}.
  policy = None

  def evaluate():
    out = _evaluate(ctx, ctx.policy_at(t + 1), t)
    out["win_rate"] = export.win_rate(out["rewards"], baseline["rewards"]) if baseline else None
    out.update(iteration=t + 1, sample_rewards=np.asarray(rewards).ravel().tolist(),
               informativeness=np.asarray(info).tolist())
    # Logged before evaluate.json is written, which marks the iteration done: a kill between
    # the two logs the row again on restart instead of losing it.
    ctx.metrics.log("eval", t + 1, heldout_reward=out["heldout_reward"],
                    win_rate=out["win_rate"] if out["win_rate"] is not None else float("nan"),
                    **{f"level_{k}": v for k, v in out["heldout_by_level"].items()})
    return out
  with console.Stage(ctx.metrics, "evaluate", t) as st:
    result = wd.cached_json(done_path, st.compute(evaluate))
    st.note(heldout_reward=result["heldout_reward"],
            **({"win_rate": result["win_rate"]} if result["win_rate"] is not None else {}))
  return result


def _train(ctx, t: int, policy, pairs: list[dict], ref: dict) -> dict:
  """θ_t → θ_{t+1}, saved as checkpoint t + 1 -> the stage's summary. The state is donated
  θ_t's buffers and dropped on return, so no weights outlive the stage but the checkpoint's."""
  c, last = ctx.config, {}

  def log_step(s, e, m):
    last.update(m)
    ctx.metrics.log("train", t * 100_000 + s, iteration=t, epoch=e, **m)
  state = stages.train_iteration(policy, pairs, ref, stages.stage_rng(c.seed, t, "train"),
                                 log_step, train_cfg=c.train, progress=console.bar, donate=True)
  ctx.checkpoints.save(t + 1, state)
  return dict(steps=int(state.step), **{k: last[k] for k in ("loss",) if k in last})


def _topics(prompts: list[dict]):
  """Each prompt's topic (None when the source has none, e.g. a prompts.json written before
  topics were recorded): what creator.select's topic_weighted needs."""
  topics = [p.get("topic") for p in prompts]
  return None if all(x is None for x in topics) else topics


def _informative_subset(ctx, t: int, prompts: list[dict], info, base_pairs: list[dict]) -> list:
  """Select without evolving (the authors' subset-iw / subset-greedy ablation): the selected
  prompts' own pairs are the training pairs; fewer than eva's, as in their runs."""
  c = ctx.config
  with console.Stage(ctx.metrics, "select", t) as st:
    chosen = wd.cached_json(ctx.path(t, "subset.json"), st.compute(lambda: {
        "selected": creator.select(
            info, fraction=c.creator.fraction, method=c.creator.selection,
            rng=stages.stage_rng(c.seed, t, "create"), topics=_topics(prompts),
            topic_coef=c.creator.topic_coef).tolist()}))
    keep = {prompts[i]["text"] for i in chosen["selected"]}
    subset = [p for p in base_pairs if p["prompt"] in keep]
    st.note(selected=len(keep), pairs=len(subset))
  return subset


def _evaluate(ctx, policy, t: int) -> dict:
  c = ctx.config
  return stages.evaluate(policy, ctx.scorer, ctx.source.heldout(),
                         key=stages.stage_key(c.seed, t, "evaluate"), sampling_cfg=c.sampling,
                         eval_cfg=c.eval, progress=console.bar)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the last evaluation summary."""
  c = config
  source, mesh = config_check.prepare_run(c, workdir)
  ctx = context.setup(c, workdir, source, mesh)
  try:
    warm_start(ctx)
    ctx.policy = ctx.policy.with_params(None)  # θ_t comes from the checkpoints from here on.
    with console.Stage(ctx.metrics, "evaluate", -1) as st:
      base = wd.cached_json(ctx.path(0, "evaluate_warmstart.json"),
                          st.compute(lambda: _evaluate(ctx, ctx.policy_at(0), -1)))
      st.note(heldout_reward=base["heldout_reward"])
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
  ctx.metrics.flush()  # The report reads the stage times from metrics.jsonl.
  last = ctx.path(len(summaries) - 2, "buffer.jsonl")
  lineage = wd.load_buffer(last).lineage_counts() if fileio.exists(last) else {}
  report.write_report(ctx.workdir, [
      {"iteration": s["iteration"], "rewards": s.get("sample_rewards", []),
       "informativeness": s.get("informativeness", []), "heldout_reward": s["heldout_reward"],
       "heldout_by_level": s["heldout_by_level"], "win_rate": s.get("win_rate")}
      for s in summaries], lineage, decode=ctx.policy.tokenizer.decode)
