"""The experiment runner: warm-start, then eva iterations, each stage resumable and atomic.

    run(config, workdir)

Per iteration t (DESIGN.md): prompts → generate → score → create → generate/score the evolved
prompts → pairs → reference → train → evaluate → report. Each stage's artifact is written under
`iter_{t:03d}/` with a temp name and a rename; on restart a stage whose artifact exists is
loaded instead of recomputed, and training resumes from the Orbax checkpoint of θ_t. Every draw
derives from (seed, iteration, stage), so a run killed anywhere and restarted ends with the
same params as an uninterrupted one.

Multi-host: every process runs every stage on the same (small, host-side) text data and so makes
the same global decisions; device work is sharded over the global mesh; only process 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from eva_jax import (config_check, creator, models, report, reward, sharding, stages, synthetic,
                     train_state)
from eva_jax import workdir as wd
from eva_jax.buffer import PromptBuffer
from eva_jax.models import hf
from eva_jax.models import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


def init_distributed() -> None:
  """Joins a multi-process run before any other JAX use.

  On a TPU pod slice (EVA_DISTRIBUTED=1, or several TPU_WORKER_HOSTNAMES)
  `jax.distributed.initialize()` finds its peers itself. For CPU processes on one machine (the tests' stand-in for a pod), set
  EVA_COORDINATOR=host:port, EVA_NUM_PROCESSES and EVA_PROCESS_ID.
  """
  if os.environ.get("EVA_COORDINATOR"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["EVA_COORDINATOR"],
                               num_processes=int(os.environ["EVA_NUM_PROCESSES"]),
                               process_id=int(os.environ["EVA_PROCESS_ID"]))
  elif os.environ.get("EVA_DISTRIBUTED") or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
    jax.distributed.initialize()


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  tokenizer: Any
  model_config: models.ModelConfig
  params: Any
  scorer: reward.Scorer
  metrics: wd.Metrics
  checkpoints: wd.Checkpoints
  cache: dict = dataclasses.field(default_factory=dict)  # Compiled steps shared by iterations.

  def path(self, iteration: int, name: str) -> str:
    return os.path.join(self.workdir, f"iter_{iteration:03d}", name)


# ---------------------------------------------------------------------------------------------
# Setup


def _synthetic_corpus(c) -> list[str]:
  texts = [t for p, a in synthetic.sft_examples(2000, c.seed, max_level=synthetic.MAX_LEVEL)
           for t in (p, a)]
  return texts + [p for p, _, _ in synthetic.heldout_set(c.seed, 4)]


def _setup_tokenizer(c, workdir: str):
  if c.tokenizer.kind == "hf":
    return tokenizer_lib.load_tokenizer(c.tokenizer.path)

  def train():
    return tokenizer_lib.train_sentencepiece(
        _synthetic_corpus(c), os.path.join(workdir, "cache"), vocab_size=c.tokenizer.vocab_size,
        name="tokenizer")
  if jax.process_count() == 1:
    return train()
  # Process 0 trains and caches it; the others then load the cached folder.
  from jax.experimental import multihost_utils
  tok = train() if wd.is_writer() else None
  multihost_utils.sync_global_devices("eva_tokenizer")
  return tok or train()


def _setup_model(c, tok, mesh) -> tuple[models.ModelConfig, Any]:
  if c.model.source == "hf":
    config, params = hf.load(c.model.path, dtype=c.model.param_dtype, compute_dtype=c.model.dtype,
                             mesh=mesh)
    return config.replace(remat=c.model.remat), params
  m = c.model
  config = models.tiny(
      m.family, vocab_size=tok.vocab_size, hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, pad_token_id=tok.pad_id,
      bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids), param_dtype=m.param_dtype,
      dtype=m.dtype, remat=m.remat, max_position_embeddings=1024)
  params = jax.jit(lambda k: models.init_params(config, k),
                   out_shardings=sharding.param_shardings(config, mesh))(
                       stages.stage_key(c.seed, -1, "init"))
  return config, params


def _setup_scorer(c, mesh) -> reward.Scorer:
  if c.reward.kind == "synthetic":
    return reward.ProgrammaticScorer(synthetic.reward,
                                     truncated_penalty=c.reward.truncated_penalty)
  return reward.load_reward_model(c.reward.path, dtype=c.model.dtype, mesh=mesh,
                                  max_length=c.reward.max_length,
                                  batch_size=c.reward.batch_size,
                                  truncated_penalty=c.reward.truncated_penalty)


def base_prompts(c, iteration: int, count: int) -> list[str]:
  """This iteration's fresh base prompts (a new chunk each iteration, like new human prompts)."""
  if c.data.source == "synthetic":
    return synthetic.base_prompts(count, c.seed * 1000 + iteration, max_level=c.data.max_level)
  from eva_jax import data
  everything = [p.text for p in data.load_prompts(c.data.path, process_index=0,
                                                  process_count=1)]
  order = np.random.default_rng([c.seed, 0]).permutation(len(everything))
  return [everything[order[(iteration * count + i) % len(everything)]] for i in range(count)]


def heldout(c) -> list[tuple[str, int, str]]:
  if c.data.source == "synthetic":
    return synthetic.heldout_set(c.seed + 10_000, c.data.heldout_per_level)
  return [(p, 0, "heldout") for p in base_prompts(c, -1, c.data.heldout_per_level)]


def _restore_params(run: Run, step: int, *, sft: bool):
  c = run.config
  optimizer = train_state.make_optimizer(stages.optimizer_config(c, 1, sft=sft))
  shardings = train_state.state_shardings(run.model_config, optimizer, run.mesh)
  shapes = jax.eval_shape(lambda: train_state.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32),
      params=models.init_params(run.model_config, jax.random.key(0)),
      opt_state=optimizer.init(models.init_params(run.model_config, jax.random.key(0)))))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return run.checkpoints.restore(step, abstract).params


# ---------------------------------------------------------------------------------------------
# Stage bookkeeping


def _cached_json(path: str, compute):
  if os.path.exists(path):
    return wd.read_json(path)
  value = compute()
  wd.write_json(path, value)
  return value


def _cached_npz(path: str, compute) -> dict:
  if os.path.exists(path):
    return wd.read_npz(path)
  value = compute()
  wd.write_npz(path, **value)
  return value


def _generate_cached(run: Run, params, t: int, name: str, prompts: list[str]) -> tuple:
  """generate + score for a prompt list, each an artifact; returns (gen dict, rewards)."""
  c = run.config
  if not prompts:
    return None, np.zeros((0, c.sampling.num_samples), np.float32)
  key = stages.stage_key(c.seed, t, name)

  def compute():
    gen = stages.generate(run, params, prompts, key=key, num_samples=c.sampling.num_samples,
                          temperature=c.sampling.temperature,
                          max_new_tokens=c.sampling.max_new_tokens)
    texts = gen.pop("texts")
    gen["texts_json"] = np.asarray(json.dumps(texts))
    return gen

  gen = dict(_cached_npz(run.path(t, f"{name}.npz"), compute))
  gen["texts"] = json.loads(str(gen.pop("texts_json")))
  scores = _cached_npz(run.path(t, f"{name}_scores.npz"),
                       lambda: {"rewards": stages.score(run, prompts, gen)})
  run.metrics.log("stage", t, stage=name, prompts=len(prompts),
                  mean_reward=float(np.mean(scores["rewards"])),
                  finished=float(np.mean(gen["finished"])))
  return gen, scores["rewards"]


# ---------------------------------------------------------------------------------------------
# The loop


def _warm_start(run: Run) -> None:
  c = run.config
  if run.checkpoints.has(0):
    return
  examples = (synthetic.sft_examples(c.sft.num_examples, c.seed, max_level=c.sft.max_level)
              if c.data.source == "synthetic" else [])
  if not examples and c.sft.steps:
    log.info("no SFT examples for data.source=%s: the warm-start keeps the loaded weights",
             c.data.source)
  steps = c.sft.steps if examples else 0
  state = stages.sft_warm_start(
      run, examples, steps, stages.stage_rng(c.seed, -1, "sft"),
      lambda i, m: run.metrics.log("sft", i, **m) if i % 20 == 0 or i == steps - 1 else None)
  run.checkpoints.save(0, state)


def _iteration(run: Run, t: int, held: list, baseline: Optional[dict]) -> dict:
  c = run.config
  done_path = run.path(t, "evaluate.json")
  latest = run.checkpoints.latest()
  # Finished: evaluated, and θ_{t+1} (or a later checkpoint: keep-N drops old ones) is saved.
  if os.path.exists(done_path) and latest is not None and latest >= t + 1:
    return wd.read_json(done_path)
  params = _restore_params(run, t, sft=t == 0)

  # The static baseline draws as many extra fresh prompts as eva evolves, so both choose
  # their train.num_pairs pairs from pools of about the same size.
  count = c.data.num_prompts + (0 if c.creator.enabled else
                                int(round(c.data.num_prompts * c.creator.fraction
                                          * c.creator.num_evolutions)))
  prompts = _cached_json(run.path(t, "prompts.json"), lambda: base_prompts(c, t, count))
  gen, rewards = _generate_cached(run, params, t, "generate", prompts)
  base_pairs = stages.best_worst_pairs(
      prompts, gen, rewards, "base", min_chosen_reward=c.train.min_chosen_reward)

  evolved, evolved_pairs, info = [], [], creator.informativeness(rewards, c.creator.metric)
  if c.creator.enabled:
    def create():
      prev = run.path(t - 1, "buffer.jsonl")
      buffer = PromptBuffer.load(prev) if t > 0 and os.path.exists(prev) else PromptBuffer()
      ids = [buffer.add(p, iteration=t).id for p in prompts]
      buffer.record_scores(ids, rewards, info)
      rng = stages.stage_rng(c.seed, t, "create")
      chosen = creator.select(info, fraction=c.creator.fraction, method=c.creator.selection,
                              rng=rng)
      records = creator.evolve_round(
          buffer, [ids[i] for i in chosen], _evolver(run, params), rng=rng, iteration=t,
          tokenizer_len_fn=lambda s: len(run.tokenizer.encode(s)),
          min_tokens=c.creator.min_tokens, max_tokens=c.creator.max_tokens,
          max_similarity=c.creator.max_similarity)
      if wd.is_writer():
        buffer.save(run.path(t, "buffer.jsonl"))
      return {"selected": [ids[i] for i in chosen], "informativeness": info.tolist(),
              "evolved": [r.text for r in records], "methods": [r.method for r in records]}
    created = _cached_json(run.path(t, "create.json"), create)
    evolved = created["evolved"]
    gen_e, rewards_e = _generate_cached(run, params, t, "generate_evolved", evolved)
    if evolved:
      evolved_pairs = stages.best_worst_pairs(
          evolved, gen_e, rewards_e, "evolved", min_chosen_reward=c.train.min_chosen_reward)

  pairs = _cached_json(run.path(t, "pairs.json"), lambda: stages.mix(
      run, base_pairs, evolved_pairs, stages.stage_rng(c.seed, t, "pairs")))
  ref = _cached_npz(run.path(t, "reference.npz"), lambda: stages.reference(run, params, pairs))
  run.metrics.log("stage", t, stage="pairs", pairs=len(pairs),
                  base=sum(p["source"] == "base" for p in pairs), evolved=len(evolved_pairs),
                  mean_informativeness=float(np.mean(info)))

  if not run.checkpoints.has(t + 1):
    state = stages.train_iteration(
        run, params, pairs, ref, stages.stage_rng(c.seed, t, "train"),
        lambda s, e, m: run.metrics.log("train", t * 100_000 + s, iteration=t, epoch=e, **m))
    run.checkpoints.save(t + 1, state)

  def evaluate():
    new_params = _restore_params(run, t + 1, sft=False)
    out = stages.evaluate(run, new_params, held, stages.stage_key(c.seed, t, "evaluate"))
    from eva_jax import export
    out["win_rate"] = export.win_rate(out["rewards"], baseline["rewards"]) if baseline else None
    out.update(iteration=t + 1, sample_rewards=np.asarray(rewards).ravel().tolist(),
               informativeness=np.asarray(info).tolist())
    return out
  result = _cached_json(done_path, evaluate)
  run.metrics.log("eval", t + 1, heldout_reward=result["heldout_reward"],
                  win_rate=result["win_rate"] if result["win_rate"] is not None else float("nan"),
                  **{f"level_{k}": v for k, v in result["heldout_by_level"].items()})
  return result


def _evolver(run: Run, params):
  c = run.config
  if c.creator.evolver == "synthetic":
    return synthetic.SyntheticEvolver(depth_prob=c.creator.depth_prob,
                                      num_chained=c.creator.num_evolutions)
  from eva_jax.lm_evolver import LMEvolver
  return LMEvolver(run.model_config, params, run.tokenizer, num_chained=c.creator.num_evolutions,
                   depth_prob=c.creator.depth_prob, mesh=run.mesh)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the last evaluation summary."""
  c = config
  config_check.validate(c)
  wd.check_writable(workdir)
  config_path = os.path.join(workdir, "config.json")
  config_check.check_workdir_config(c, config_path)
  if c.overwrite and wd.is_writer():
    _clear(workdir)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  wd.write_json(config_path, json.loads(c.to_json()))
  tok = _setup_tokenizer(c, workdir)
  model_config, params = _setup_model(c, tok, mesh)
  run_ = Run(c, workdir, mesh, tok, model_config, params, _setup_scorer(c, mesh),
             wd.Metrics(workdir), wd.Checkpoints(workdir, keep=max(2, c.checkpoint.keep),
                                                 use_async=c.checkpoint.use_async))
  held = heldout(c)
  try:
    _warm_start(run_)
    run_.params = None  # From here on θ_t comes from the checkpoints; free the initial copy.
    base = _cached_json(os.path.join(workdir, "iter_000", "evaluate_warmstart.json"),
                        lambda: stages.evaluate(run_, _restore_params(run_, 0, sft=True), held,
                                                stages.stage_key(c.seed, -1, "evaluate")))
    run_.metrics.log("eval", 0, heldout_reward=base["heldout_reward"],
                     **{f"level_{k}": v for k, v in base["heldout_by_level"].items()})
    summaries = [dict(base, iteration=0)]
    for t in range(c.iterations):
      summaries.append(_iteration(run_, t, held, base))
      _report(run_, summaries)
    return summaries[-1]
  finally:
    run_.checkpoints.close()
    run_.metrics.close()


def _report(run: Run, summaries: list[dict]) -> None:
  last = run.path(len(summaries) - 2, "buffer.jsonl")
  lineage = PromptBuffer.load(last).lineage_counts() if os.path.exists(last) else {}
  report.write_report(run.workdir, [
      {"iteration": s["iteration"], "rewards": s.get("sample_rewards", []),
       "informativeness": s.get("informativeness", []), "heldout_reward": s["heldout_reward"],
       "heldout_by_level": s["heldout_by_level"], "win_rate": s.get("win_rate")}
      for s in summaries], lineage)


def _clear(workdir: str) -> None:
  """--config.overwrite: removes a previous run's artifacts (only what the runner writes)."""
  import shutil
  for name in os.listdir(workdir):
    if name.startswith("iter_") or name in ("checkpoints", "tb", "plots"):
      shutil.rmtree(os.path.join(workdir, name))
    elif name in ("metrics.jsonl", "report.md", "config.json"):
      os.remove(os.path.join(workdir, name))
