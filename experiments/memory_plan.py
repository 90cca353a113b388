"""Memory plan for the paper's 9B run on TPU pod slices, from XLA's memory analysis.

Lowers and compiles, with abstract inputs only (`jax.ShapeDtypeStruct` carrying shardings:
nothing is allocated), the device programs of a real run of configs/paper.py:

- train: the jitted update of `eva_jax.train.make_train_step` (the same
  `train.preference_step`, in/out shardings from `train_state.state_shardings`, the state
  donated) for Gemma 2 9B at the paper's DPO batch, 64 pairs of 2048 tokens, split into
  `accum` micro-batches;
- sample: `eva_jax.sampling._prefill` and the `_decode` while-loop over the donated KV cache
  (what `sampling.sample` runs) for a chunk of prompts x N = 6 samples, 1024 prompt tokens and
  2048 new tokens (sampling.batch_size prompts per call);
- score: the reward model's jitted forward (`reward._jitted_forward`), Skywork-Reward-Gemma-2-27B
  in bfloat16 on 4096-token rows;
- online (configs/online.py:paper): the jitted RLOO update of `eva_jax.online.make_rloo_step`
  (`online.rloo_step`, the same shardings and donation) on P·K rollout rows of 1024 prompt +
  2048 response tokens, and the sampling programs at K = 4 samples per prompt.

For each it reads `compiled.memory_analysis()` of the per-device SPMD program: argument,
output, alias (outputs reusing a donated argument) and temporary bytes, and
`step = argument + output - alias + temp`. `resident` adds what the runner keeps on the device
besides the step's own arguments (see `resident_bytes`); `total` is judged against one chip's
HBM: TPU v5e 16 GiB, v5p 95 GiB. Device counts are JAX devices = chips: v5e-32 is 32 chips;
v5p names count TensorCores, two per chip (megacore), so v5p-8 is 4 chips.

Two backends:
- `--backend=tpu`: a deviceless ahead-of-time compile for the TPU topology itself
  (`jax.experimental.topologies`, needs the `libtpu` package; no TPU is touched). These are the
  TPU compiler's own numbers: its buffer assignment, bf16 kept native, its scheduling. It
  refuses a program whose temporaries exceed the chip's usable HBM (v5e: 15.75 GiB), which
  is recorded as a row that does not fit.
- `--backend=cpu` (default): fake host devices (XLA_FLAGS, set below before jax is imported).
  The partitioning and buffer shapes are the TPU's, the buffer assignment is not: the CPU
  backend converts bf16 dots and dynamic-slices to float32 (bf16 arrays gain f32 copies, e.g.
  the whole KV cache in the decode loop) and schedules for one core. Pessimistic for bf16.
The log-prob kernel is the chunked walk on both ("auto" picks by the *runtime* backend, which
is CPU here; on a TPU the Pallas forward and backward kernels run instead).

Cost and roofline (experiments/roofline.py), per chip, for each compiled program (the update;
the prefill and one decode step; the reward forward): FLOPs and HBM bytes of the per-device
program counted by experiments/hlo_cost.py from the optimized HLO, every loop body times its
trip count.
The compiler's own `cost_analysis()` (keys "flops", "bytes accessed", "optimal_seconds", ...)
counts a while-loop body once, so it sees one layer of the scanned decoder, one micro-batch
and one log-prob chunk; it is kept beside as compiler_*_once (hlo_cost's own count taken the
same way, *_once, agrees with it to a few %). The decode program is a while loop that can stop
early: it is counted as max_new_tokens - 1 steps and divided by them (per step, its one-off
casts and cache relayouts spread over the steps); each step's walk over the generated KV blocks
that hold tokens (on TPU, `attention.walks_generated_blocks`) is counted at its mean trip count
over the generation (`walked_blocks`). Then,
at the chip's published peaks (roofline.PEAKS):

  time = max(flops / peak FLOP/s, bytes / peak HBM bytes/s)    (a lower bound on step time)
  MFU = model FLOPs per chip / (time x peak FLOP/s)
  BW fraction (decode) = model bytes per chip / (time x peak HBM bytes/s)

model FLOPs: 6·N·tokens for an update (2·N forward + 4·N backward, with N the matmul params:
Gemma's tied table counts once, as the LM head; no extra forward: the reference log-probs and
the KL come precomputed; remat's recompute is not model work), 2·N per row for a decode step,
2·N per prompt token for the prefill (LM head on the last token only), the same for the reward
forward (no LM head). model bytes of a decode step: the params in the compute dtype plus the
KV cache at its mean fill (`roofline.decode_model_bytes`), divided evenly over the chips. The
time is a roofline: it assumes compute, HBM traffic and the collectives' ICI transfers all
overlap.

  python experiments/memory_plan.py [--backend=tpu|cpu] [--out=plan.json] [--hlo_dir=DIR]
      [workload names...]
  PYTHONPATH=<dir with libtpu> python experiments/memory_plan.py --backend=tpu
  python experiments/memory_plan.py --tables=experiments/results/tpu_plan.json
"""
from __future__ import annotations

import os
import sys

_NUM_DEVICES = 64  # Fake CPU devices: enough for every mesh below (a mesh takes the first n).
if __name__ == "__main__":  # Before jax is imported.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_NUM_DEVICES}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # No cloud metadata lookups.

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from eva_jax import models, online, reward, sampling, sharding, train, train_state  # noqa: E402
from eva_jax.logprobs import PAIR_KEYS, REFERENCE_KEYS  # noqa: E402
from eva_jax.models import attention  # noqa: E402
# `python experiments/memory_plan.py` puts experiments/ on sys.path, not the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import roofline  # noqa: E402

GIB = 2**30
HBM_BYTES = {"v5e": 16 * GIB, "v5p": 95 * GIB}
# Cloud TPU accelerator type -> (chip, topology for jax.experimental.topologies).
SLICES = {"v5e-32": ("v5e", "v5e:4x8"), "v5e-64": ("v5e", "v5e:8x8"),
          "v5p-8": ("v5p", "v5p:2x2x1")}
SEQ_LEN, PROMPT_LEN, NEW_TOKENS, NUM_SAMPLES, REWARD_LEN = 2048, 1024, 2048, 6, 4096


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or shapes) placed with `shardings` (same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def memory_of(compiled) -> dict:
  """Per-device bytes of a compiled SPMD program; `step` is its peak estimate."""
  m = compiled.memory_analysis()
  out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
         "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
  out["step"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def params_bytes_per_device(config: models.ModelConfig, mesh, inference: bool = False) -> int:
  """Bytes of one copy of `config`'s params on one device, placed by sharding.param_shardings
  (`inference`: as `models.inference_params` casts them, e.g. a frozen reference)."""
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  if inference:
    shapes = jax.eval_shape(lambda p: models.inference_params(config, p), shapes)
  shardings = sharding.param_shardings(config, mesh)
  return sum(jnp.dtype(x.dtype).itemsize * math.prod(s.shard_shape(x.shape))
             for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def abstract_params(config: models.ModelConfig, mesh):
  return abstract(jax.eval_shape(lambda: models.init_params(config, jax.random.key(0))),
                  sharding.param_shardings(config, mesh))


# ---------------------------------------------------------------------------------------------
# The device programs


def abstract_train_state(config: models.ModelConfig, optimizer, mesh) -> train_state.TrainState:
  """The TrainState that `train_state.init_train_state` would create, as sharded shapes."""
  shapes = jax.eval_shape(lambda: train_state.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=models.init_params(config, jax.random.key(0)),
      opt_state=optimizer.init(models.init_params(config, jax.random.key(0)))))
  return abstract(shapes, train_state.state_shardings(config, optimizer, mesh))


def abstract_pair_batch(mesh, num_pairs: int, seq_len: int) -> dict:
  """A pair batch with reference log-probs (eva_jax.logprobs layout), rows over data+fsdp."""
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  batch = {}
  for key in PAIR_KEYS + REFERENCE_KEYS:
    is_matrix = key.endswith(("tokens", "mask"))
    batch[key] = jax.ShapeDtypeStruct((num_pairs, seq_len) if is_matrix else (num_pairs,),
                                      jnp.int32 if is_matrix else jnp.float32, sharding=rows)
  return batch


def compile_train_step(config: models.ModelConfig, mesh, *, loss: str = "dpo", beta: float = 0.05,
                       hparams: Optional[dict] = None, optimizer_name: str = "adamw",
                       num_pairs: int = 64, seq_len: int = 2048, accum_steps: int = 1,
                       num_targets: Optional[int] = None, impl: str = "chunked"):
  """Compiles the jitted update of `train.make_train_step` for abstract inputs.

  make_train_step keeps its jitted function inside a closure, so this builds the same jit:
  `train.preference_step` with in_shardings (state, rows over data+fsdp), out_shardings
  (state, replicated metrics) and the state donated, lowered under the activation rules.
  num_targets (the LM-head gather width) defaults to the worst case, seq_len - 1.
  """
  opt_cfg = train_state.OptimizerConfig(name=optimizer_name, total_steps=1000)
  optimizer = train_state.make_optimizer(opt_cfg)
  schedule = train_state.make_schedule(opt_cfg)
  state_sh = train_state.state_shardings(config, optimizer, mesh)

  def update(state, batch, num_targets):
    return train.preference_step(config, optimizer, state, batch, loss_name=loss, beta=beta,
                                 hparams=hparams or {}, accum_steps=accum_steps, impl=impl,
                                 num_targets=num_targets, schedule=schedule)

  jitted = jax.jit(update, static_argnums=(2,),
                   in_shardings=(state_sh, NamedSharding(mesh, P(sharding.BATCH_AXES))),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  state = abstract_train_state(config, optimizer, mesh)
  batch = abstract_pair_batch(mesh, num_pairs, seq_len)
  with sharding.activation_rules(mesh):
    return jitted.lower(state, batch, num_targets or seq_len - 1).compile()


def abstract_rollout_batch(mesh, rows: int, prompt_len: int, new_tokens: int) -> dict:
  """An on-policy rollout batch (eva_jax.online layout, with the KL column the online loop adds),
  rows over data+fsdp."""
  sh = NamedSharding(mesh, P(sharding.BATCH_AXES))
  widths = {"prompt_tokens": prompt_len, "prompt_mask": prompt_len, "response_tokens": new_tokens}
  return {key: jax.ShapeDtypeStruct(
      (rows, widths[key]) if key in widths else (rows,),
      jnp.int32 if key in widths or key == "response_lengths" else jnp.float32, sharding=sh)
          for key in online.STEP_KEYS + ("kl",)}


def compile_rloo_step(config: models.ModelConfig, mesh, *, rows: int, prompt_len: int,
                      new_tokens: int, accum_steps: int = 1, num_targets: Optional[int] = None,
                      impl: str = "chunked"):
  """Compiles the jitted update of `online.make_rloo_step` (on-policy: no clipping) for abstract
  inputs, rebuilt here as compile_train_step rebuilds the preference update; num_targets (the
  LM-head gather width) defaults to the worst case, new_tokens."""
  opt_cfg = train_state.OptimizerConfig(name="adamw", total_steps=1000)
  optimizer = train_state.make_optimizer(opt_cfg)
  schedule = train_state.make_schedule(opt_cfg)
  state_sh = train_state.state_shardings(config, optimizer, mesh)

  def update(state, batch, num_targets):
    return online.rloo_step(config, optimizer, state, batch, accum_steps=accum_steps, impl=impl,
                            num_targets=num_targets, schedule=schedule)

  jitted = jax.jit(update, static_argnums=(2,),
                   in_shardings=(state_sh, NamedSharding(mesh, P(sharding.BATCH_AXES))),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  state = abstract_train_state(config, optimizer, mesh)
  batch = abstract_rollout_batch(mesh, rows, prompt_len, new_tokens)
  with sharding.activation_rules(mesh):
    return jitted.lower(state, batch, num_targets or new_tokens).compile()


def compile_sampling(config: models.ModelConfig, mesh, *, num_prompts: int, prompt_len: int,
                     num_samples: int, max_new_tokens: int, top_k: int = 0,
                     nucleus: bool = True):
  """Compiles `sampling._prefill` and `sampling._decode` as `sampling.sample` calls them (on
  `sharding.decode_mesh`, params from `sampling.prepare_params`), for abstract sharded inputs;
  returns (prefill, decode). The decode's cache input is what the prefill outputs."""
  mesh, rules = sharding.decode_mesh(mesh, config), sharding.DECODE_RULES
  params = abstract(jax.eval_shape(lambda: models.inference_params(config, models.init_params(
      config, jax.random.key(0)))), sharding.param_shardings(config, mesh, rules))
  batch = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  prompts, active = batch((num_prompts, prompt_len), jnp.int32), batch((num_prompts,), jnp.bool_)
  replicated = sharding.replicated(mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
  eos = jax.ShapeDtypeStruct((sampling.MAX_EOS,), jnp.int32, sharding=replicated)
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=replicated)
  with sharding.activation_rules(mesh, rules):
    prefill = sampling._prefill.lower(
        config, params, prompts, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
        cache_dtype=jnp.dtype(config.dtype).name, mesh=mesh, rules=rules).compile()
    cache, logits = abstract(prefill.out_info, prefill.output_shardings)
    decode = sampling._decode.lower(
        config, params, cache, logits, prompts, active, eos, rng, scalar, scalar,
        num_samples=num_samples, max_new_tokens=max_new_tokens, pad_id=config.pad_token_id or 0,
        top_k=top_k, greedy=False, nucleus=nucleus, mesh=mesh, rules=rules).compile()
  return prefill, decode


def compile_reward_forward(config: models.ModelConfig, mesh, *, batch: int, length: int):
  """Compiles the reward model's jitted forward (`reward.score_sequences`' program)."""
  rows = jax.ShapeDtypeStruct((batch, length), jnp.int32,
                              sharding=sharding.batch_sharding(mesh, 2))
  with sharding.activation_rules(mesh):
    return reward._jitted_forward(config, mesh, sharding.DEFAULT_RULES).lower(
        abstract_params(config, mesh), rows, rows).compile()


# ---------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass(frozen=True)
class Workload:
  """One row. mesh = (data, fsdp, tensor). train: `batch` pairs per update in `accum`
  micro-batches; rloo: `batch` rollout rows per update in `accum` micro-batches; sample: `batch`
  prompts x `samples` per call; score: `batch` rows. `loop` (offline / online) sets what else
  stays on the device (`resident_bytes`)."""
  name: str
  kind: str              # "train", "rloo", "sample" or "score"
  slice_name: str        # a key of SLICES
  mesh: tuple[int, int, int]
  batch: int = 64
  accum: int = 1
  param_dtype: str = "float32"
  remat: str = "full"
  samples: int = NUM_SAMPLES  # sample: samples per prompt (offline N = 6, online K = 4).
  loop: str = "offline"


def paper_policy(param_dtype: str = "float32", remat: str = "full") -> models.ModelConfig:
  return models.gemma2_9b(param_dtype=param_dtype, dtype="bfloat16", remat=remat)


REWARD_MODEL = models.gemma2_27b(num_labels=1, param_dtype="bfloat16", dtype="bfloat16")

PLAN = (
    # v5e-32: float32 master weights (the config), 1 pair per chip per micro-batch.
    Workload("train_v5e32", "train", "v5e-32", (1, 32, 1), accum=2),
    Workload("train_v5e64", "train", "v5e-64", (1, 64, 1), accum=1),
    # Sampling 64 prompts a call (the most that fits) and the config's 32.
    Workload("sample_v5e32", "sample", "v5e-32", (1, 32, 1)),
    Workload("sample_v5e32_chunk32", "sample", "v5e-32", (1, 32, 1), batch=32),
    Workload("score_v5e32", "score", "v5e-32", (1, 32, 1), batch=32),
    # v5p-8 = 4 chips; sampling at the config's 16 prompts a call.
    Workload("train_v5p8_mb1", "train", "v5p-8", (1, 4, 1), accum=16),
    Workload("train_v5p8_mb2", "train", "v5p-8", (1, 4, 1), accum=8),
    Workload("sample_v5p8_chunk16", "sample", "v5p-8", (1, 4, 1), batch=16),
    Workload("score_v5p8", "score", "v5p-8", (1, 4, 1), batch=16),
    # Online RLOO (configs/online.py:paper): P = 32 prompts x K = 4 per step, 128 rows of
    # 1024 + 2048 tokens, 1 row per chip per micro-batch; sampling in chunks of 16 prompts x 4.
    Workload("rloo_v5p8_mb1", "rloo", "v5p-8", (1, 4, 1), batch=128, accum=32, loop="online"),
    Workload("sample_v5p8_online", "sample", "v5p-8", (1, 4, 1), batch=16, samples=4,
             loop="online"),
    Workload("rloo_v5e64_mb1", "rloo", "v5e-64", (1, 64, 1), batch=128, accum=2, loop="online"),
    # One call of P = 32 prompts, padded to the 64 of the mesh: 1 prompt x 4 per chip.
    Workload("sample_v5e64_online", "sample", "v5e-64", (1, 64, 1), batch=64, samples=4,
             loop="online"),
)


def resident_bytes(w: Workload, mesh) -> int:
  """What the runner keeps on each device besides the step's own arguments.

  The offline loop (eva_jax/runner.py) holds the reward model (the scorer) for the whole run
  and the iteration's restored θ_t from sampling to the update, which takes θ_t over (donated
  into the train state, `stages.train_iteration(donate=True)`); the state is dropped once saved.
  So: train + reward model; sample (its argument is `sampling.prepare_params`'s copy of θ_t)
  + θ_t + reward model; score (the reward model is its argument) + θ_t.

  The online loop (eva_jax/online_loop.py) holds the train state for the whole run, the frozen
  reference θ_0 in the compute dtype (`models.inference_params`: what its forward reads) and the
  reward model: rloo (the state is its argument) + θ_0 + reward model; sample (its argument is
  the prepared copy) + the policy + θ_0 + the AdamW moments (two float32 copies of the params)
  + reward model.
  """
  config = paper_policy(w.param_dtype, w.remat)
  policy = params_bytes_per_device(config, mesh)
  rm = params_bytes_per_device(REWARD_MODEL, mesh)
  if w.loop == "online":
    reference = params_bytes_per_device(config, mesh, inference=True)
    moments = 2 * params_bytes_per_device(paper_policy("float32"), mesh)
    return {"rloo": reference + rm, "sample": policy + reference + moments + rm}[w.kind]
  return {"train": rm, "sample": policy + rm, "score": policy}[w.kind]


def devices_for(slice_name: str, backend: str) -> list:
  if backend == "tpu":
    return sharding.tpu_topology_devices(SLICES[slice_name][1])
  return jax.devices()


def _compile_error_temp(error: Exception) -> Optional[int]:
  """Bytes of temporaries in the TPU compiler's "Ran out of memory on HBM" refusal, or None."""
  match = re.search(r"HLO temporaries \(([0-9.]+)([KMG])\)", str(error))
  if "RESOURCE_EXHAUSTED" not in str(error) or not match:
    return None
  return int(float(match.group(1)) * 2**(10 * "KMG".index(match.group(2)) + 10))


def run_workload(w: Workload, backend: str = "cpu", hlo_dir: Optional[str] = None) -> dict:
  """Compiles `w` and returns its row; a program the TPU compiler refuses for lack of HBM gets
  a row with `temp` from the refusal, the other fields 0 and fits False."""
  try:
    return _run_workload(w, backend, hlo_dir)
  except jax.errors.JaxRuntimeError as e:
    temp = _compile_error_temp(e)
    if temp is None:
      raise
    return {"name": w.name, "kind": w.kind, "slice": w.slice_name, "backend": backend,
            "devices": math.prod(w.mesh), "mesh": dict(zip(sharding.MESH_AXES, w.mesh)),
            "param_dtype": w.param_dtype, "remat": w.remat, "batch": "compiler: out of HBM",
            "argument": 0, "output": 0, "alias": 0, "temp": temp, "step": temp, "resident": 0,
            "total": temp, "hbm": HBM_BYTES[SLICES[w.slice_name][0]], "fits": False,
            "programs": {}}


def walked_blocks() -> dict:
  """The decode's walk over generated blocks (on TPU) counted at its mean trip count over a
  generation of NEW_TOKENS (hlo_cost.program_cost's named_trips)."""
  gen_len = sampling.generated_slots(NEW_TOKENS, "tpu")
  return {attention.GEN_WALK_SCOPE: attention.mean_walked_blocks(NEW_TOKENS, gen_len)}


def workload_costs(w: Workload, programs: dict, hlo_dir: Optional[str] = None) -> dict:
  """`roofline.roofline` of each compiled program of `w` ({"update"} / {"prefill", "decode"} /
  {"score"} -> compiled), with its model FLOPs (and the decode step's model bytes)."""
  n, chip = math.prod(w.mesh), SLICES[w.slice_name][0]
  policy = paper_policy(w.param_dtype, w.remat)
  flops = roofline.forward_flops

  def cost(program, model_flops, **kw):
    path = hlo_dir and os.path.join(hlo_dir, f"{w.name}.{program}.hlo")
    return roofline.roofline(programs[program], chip, n, model_flops, hlo_path=path, **kw)

  if w.kind in ("train", "rloo"):
    # Chosen and rejected rows, or the rollout rows; the reference log-probs and the KL column
    # come precomputed, so the update runs no extra forward.
    tokens = 2 * w.batch * SEQ_LEN if w.kind == "train" else w.batch * (PROMPT_LEN + NEW_TOKENS)
    return {"update": cost("update", 3 * flops(policy, tokens, tokens))}
  if w.kind == "sample":
    rows = w.batch * w.samples
    step_bytes = roofline.decode_model_bytes(policy, w.batch, PROMPT_LEN, w.samples, NEW_TOKENS)
    return {"prefill": cost("prefill", flops(policy, w.batch * PROMPT_LEN, w.batch)),
            "decode": cost("decode", flops(policy, rows, rows), model_bytes=step_bytes,
                           steps=NEW_TOKENS - 1, named_trips=walked_blocks())}
  return {"score": cost("score", flops(REWARD_MODEL, w.batch * REWARD_LEN, 0))}


def _run_workload(w: Workload, backend: str, hlo_dir: Optional[str]) -> dict:
  n = math.prod(w.mesh)
  mesh = sharding.make_mesh(*w.mesh, devices=devices_for(w.slice_name, backend)[:n])
  start = time.perf_counter()
  row = {"name": w.name, "kind": w.kind, "slice": w.slice_name, "backend": backend,
         "devices": n, "mesh": dict(zip(sharding.MESH_AXES, w.mesh)),
         "param_dtype": REWARD_MODEL.param_dtype if w.kind == "score" else w.param_dtype,
         "remat": w.remat if w.kind in ("train", "rloo") else "-"}
  per_device = w.batch // sharding.batch_multiple(mesh)
  policy = paper_policy(w.param_dtype, w.remat)
  if w.kind == "train":
    programs = {"update": compile_train_step(policy, mesh, num_pairs=w.batch, seq_len=SEQ_LEN,
                                             accum_steps=w.accum)}
    row.update(batch=f"{per_device // w.accum} pairs x {w.accum}",
               **memory_of(programs["update"]))
  elif w.kind == "rloo":
    programs = {"update": compile_rloo_step(policy, mesh, rows=w.batch, prompt_len=PROMPT_LEN,
                                            new_tokens=NEW_TOKENS, accum_steps=w.accum)}
    row.update(batch=f"{per_device // w.accum} rows x {w.accum}",
               **memory_of(programs["update"]))
  elif w.kind == "sample":
    prefill, decode = compile_sampling(policy, mesh, num_prompts=w.batch, prompt_len=PROMPT_LEN,
                                       num_samples=w.samples, max_new_tokens=NEW_TOKENS)
    programs = {"prefill": prefill, "decode": decode}
    pre = memory_of(prefill)
    per_device = w.batch // sharding.batch_multiple(sharding.decode_mesh(mesh, policy))
    row.update(batch=f"{per_device} prompts x {w.samples}", prefill_step=pre["step"],
               **memory_of(decode))
    # The prefill's output cache is the decode's donated input: the peak is the larger step.
    row["step"] = max(pre["step"], row["step"])
  else:
    programs = {"score": compile_reward_forward(REWARD_MODEL, mesh, batch=w.batch,
                                                length=REWARD_LEN)}
    row.update(batch=f"{per_device} x {REWARD_LEN} tokens", **memory_of(programs["score"]))
  costs = workload_costs(w, programs, hlo_dir)
  row["resident"] = resident_bytes(w, mesh)
  row["total"] = row["step"] + row["resident"]
  row["hbm"] = HBM_BYTES[SLICES[w.slice_name][0]]
  row["fits"] = row["total"] <= row["hbm"]
  row["programs"] = costs
  row["compile_s"] = round(time.perf_counter() - start, 1)
  return row


def print_tables(path: str) -> None:
  """Both tables of a plan written with --out, without compiling anything."""
  with open(path) as f:
    plan = json.load(f)
  print(roofline.memory_table(plan["rows"]), "\n", roofline.cost_table(plan["rows"]), sep="\n")


def rederive_resident(path: str, backend: str = "tpu") -> None:
  """Re-derives `resident`, `total` and `fits` of every row of the plan JSON at `path` with
  today's `resident_bytes`, in place, without compiling: what the runner keeps beside a step
  is counted by hand, so a change to it (not to a program) needs no recompile."""
  with open(path) as f:
    plan = json.load(f)
  by_name = {w.name: w for w in PLAN}
  for row in plan["rows"]:
    w = by_name[row["name"]]
    n = math.prod(w.mesh)
    mesh = sharding.make_mesh(*w.mesh, devices=devices_for(w.slice_name, backend)[:n])
    row["resident"] = resident_bytes(w, mesh)
    row["total"] = row["step"] + row["resident"]
    row["fits"] = row["total"] <= row["hbm"]
  with open(path, "w") as f:
    json.dump(plan, f, indent=1)
  print(roofline.memory_table(plan["rows"]))


def main(argv: list[str]) -> None:
  if len(argv) == 1 and argv[0].startswith("--tables="):
    return print_tables(argv[0].split("=", 1)[1])
  if len(argv) == 1 and argv[0].startswith("--rederive_resident="):
    return rederive_resident(argv[0].split("=", 1)[1])
  backend, out, hlo_dir = "cpu", None, None
  names = []
  for a in argv:
    if a.startswith("--backend="):
      backend = a.split("=", 1)[1]
    elif a.startswith("--out="):
      out = a.split("=", 1)[1]
    elif a.startswith("--hlo_dir="):
      hlo_dir = a.split("=", 1)[1]
      os.makedirs(hlo_dir, exist_ok=True)
    else:
      names.append(a)
  if backend not in ("cpu", "tpu"):
    raise ValueError(f"--backend must be cpu or tpu, got {backend!r}")
  by_name = {w.name: w for w in PLAN}
  unknown = sorted(set(names) - set(by_name))
  if unknown:
    raise ValueError(f"unknown workloads {unknown}; known: {list(by_name)}")
  if backend == "cpu" and len(jax.devices()) < _NUM_DEVICES:
    raise RuntimeError(f"need {_NUM_DEVICES} devices, have {len(jax.devices())}: run this file "
                       "as a script (it sets XLA_FLAGS before importing jax)")
  rows = []
  for w in [by_name[n] for n in names] or PLAN:
    rows.append(run_workload(w, backend, hlo_dir))
    print(json.dumps(rows[-1]), flush=True)
    if out:  # After every row: a long grid stopped early keeps what it compiled.
      with open(out, "w") as f:
        json.dump({"backend": backend, "peaks": roofline.PEAKS, "rows": rows}, f, indent=1)
  print(f"\nPer-device GiB, {backend} backend (see the module docstring):\n")
  print(roofline.memory_table(rows))
  print("\nPer-chip cost and roofline of each program (experiments/roofline.py):\n")
  print(roofline.cost_table(rows))


if __name__ == "__main__":
  main(sys.argv[1:])
