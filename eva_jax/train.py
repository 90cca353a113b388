"""The sharded update: preference optimization (any loss of `eva_jax.losses`) and SFT.

    optimizer = make_optimizer(opt_cfg)
    state = init_train_state(config, optimizer, mesh, params=params)
    ref_c, ref_r = reference_logprobs(config, state.params, batches, mesh=mesh)
    batches = with_reference(batches, ref_c, ref_r)
    step = make_train_step(config, optimizer, mesh, LossConfig("dpo", beta=0.05),
                           schedule=make_schedule(opt_cfg))
    for i, batch in enumerate(batches):
      state, metrics = timed_step(step, state, batch, config=config)
      check_finite(metrics, i)   # raises FloatingPointError; `state` is the last good one

The update is one `jax.jit` with in/out shardings and the state donated. Gradient accumulation
scans over `accum_steps` micro-batches inside it and applies one optimizer update, which equals
one update on the whole batch: losses and metrics are normalised by the whole batch's pair
weights (SFT: its target tokens). A step whose loss or gradient norm is not finite returns the
state it was given (the update is computed but not applied); `check_finite` then stops the run.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from eva_jax import losses, models, sharding
from eva_jax.logprobs import (PAIR_KEYS, REFERENCE_KEYS, SFT_KEYS, WIN_PROB_KEYS,
                              make_pair_batch, make_sft_batch, num_targets_bucket,
                              pair_logprobs, reference_logprobs, sequence_logprobs,
                              static_shapes, with_reference)
from eva_jax.train_state import (OptimizerConfig, TrainState, init_train_state, make_optimizer,
                                 make_schedule, state_shardings)

# This module is the entry point; the batch and state helpers are re-exported from it.
__all__ = [
    "LossConfig", "OptimizerConfig", "TrainState", "accumulate_gradients", "apply_update",
    "check_finite", "cpu_peak_flops", "init_train_state", "make_optimizer", "make_pair_batch",
    "make_schedule", "make_sft_batch", "make_train_step", "peak_flops", "preference_step",
    "reference_logprobs", "sequence_logprobs", "sft_step", "state_shardings", "throughput",
    "timed_step", "with_reference",
]

# Peak dense bfloat16 FLOP/s per chip, by a substring of `device.device_kind` (first match wins).
PEAK_FLOPS_BY_KIND = (
    ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("v5", 459e12), ("v4", 275e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)
# The CPU roof is a float32 [N, N] x [N, N] matmul of this size. It is measured, not a
# constant: machines of one kind here ran BENCHMARKS.md's 2048^3 roof at 65 to 145 GFLOP/s.
# 1024^3 runs at that rate or a little above, in a fifth of the time (~0.1 s a process).
CPU_ROOF_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What a step optimizes and how it computes log-probs."""

  objective: str = "dpo"        # a name of losses.available_losses(), or "sft"
  beta: float = 0.1             # the preference loss's beta (unused by SFT)
  hparams: dict = dataclasses.field(default_factory=dict)   # loss-specific hparams
  accum_steps: int = 1          # micro-batches per update (the batch must divide into them)
  logprob_impl: str = "auto"    # eva_jax.kernels.target_logprobs impl
  # The LM-head gather width and the shared prompt length are multiples of this (fewer
  # compiles); make_pair_batch's length_bucket should be a multiple of it.
  bucket: int = 64

  def __post_init__(self):
    if self.objective != "sft" and self.objective not in losses.available_losses():
      raise ValueError(f"LossConfig.objective must be 'sft' or one of "
                       f"{losses.available_losses()}, got {self.objective!r}")
    if isinstance(self.accum_steps, bool) or not isinstance(self.accum_steps, int) or (
        self.accum_steps < 1):
      raise ValueError(f"LossConfig.accum_steps must be an int >= 1, got {self.accum_steps!r}")


def _micro_batches(batch: dict, accum_steps: int) -> dict:
  """[k·b, ...] -> [k, b, ...] with micro-batch j = rows j, j + k, ... (strided, so that a batch
  sharded in contiguous blocks along its rows stays sharded along b without moving rows)."""
  def split(x):
    return jnp.moveaxis(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 1, 0)
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable, params, batch: dict, accum_steps: int):
  """(loss, metrics, float32 grads) summed over micro-batches of `loss_fn(params, micro)`.

  `loss_fn(params, micro) -> (loss, metrics)`; micro-batch j holds rows j, j + k, ... of every
  [B, ...] array of `batch` (k = accum_steps), so each micro-batch's loss and metrics must be
  normalised by whole-batch totals for the sums to equal one update on the batch.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  to_f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  if accum_steps == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return loss, metrics, to_f32(grads)
  micro = _micro_batches(batch, accum_steps)

  def body(carry, micro_batch):
    (loss, metrics), grads = grad_fn(params, micro_batch)
    return jax.tree.map(jnp.add, carry, (loss, metrics, to_f32(grads))), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda: grad_fn(params, first))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                       (shapes[0][0], shapes[0][1], shapes[1]))
  (loss, metrics, grads), _ = jax.lax.scan(body, zeros, micro)
  return loss, metrics, grads


def apply_update(optimizer, state: TrainState, loss, metrics: dict, grads, schedule):
  """One optimizer update, kept only when the loss and the gradient norm are finite.

  Returns (new state, metrics + `loss`, `grad_norm` (before clipping), `finite`, and
  `learning_rate` when `schedule` is given).
  """
  grad_norm = optax.tree.norm(grads)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite)
  if schedule is not None:
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state), metrics


def preference_step(config: models.ModelConfig, optimizer, state: TrainState, batch: dict, *,
                    loss_name: str, beta: float, hparams: Optional[dict] = None,
                    accum_steps: int = 1, impl: str = "auto", num_targets: Optional[int] = None,
                    prompt_length: Optional[int] = None, schedule=None):
  """One preference update on a pair batch (eva_jax.logprobs); pure, call it under jit.

  `num_targets` and `prompt_length` are the static shapes of `logprobs.pair_logprobs`. The
  batch's `ref_*` and `*_win_prob` arrays, where present, go to the loss.
  Returns (new state, metrics): the loss's metrics (rewards, margin, accuracy, extras), and
  `chosen_logps`/`rejected_logps` (mean summed policy log-probs), `loss`, `grad_norm`
  (before clipping), `learning_rate`, `tokens` (real tokens in the batch), `finite`.
  All metrics are weighted means over the real pairs of the whole batch.
  """
  hparams = dict(hparams or {})
  weights_B = batch.get("weights", jnp.ones(batch["chosen_tokens"].shape[:1], jnp.float32))
  batch = dict(batch, weights=weights_B.astype(jnp.float32))
  total_weight = jnp.sum(batch["weights"])

  def loss_fn(params, micro):
    pc_B, pr_B, lc_B, lr_B = pair_logprobs(config, params, micro, impl=impl,
                                           num_targets=num_targets, prompt_length=prompt_length)
    micro_weight = jnp.sum(micro["weights"])
    # An all-padding micro-batch: any weights keep its means finite; its share below is 0.
    weights_B = jnp.where(micro_weight > 0, micro["weights"], 1.0)
    loss, metrics = losses.preference_loss(
        loss_name, pc_B, pr_B, micro.get("ref_chosen"), micro.get("ref_rejected"), beta=beta,
        chosen_lengths=lc_B, rejected_lengths=lr_B, weights=weights_B,
        chosen_win_prob=micro.get("chosen_win_prob"),
        rejected_win_prob=micro.get("rejected_win_prob"), **hparams)
    mean = lambda x_B: jnp.sum(weights_B * x_B) / jnp.sum(weights_B)
    metrics.update(chosen_logps=mean(jax.lax.stop_gradient(pc_B)),
                   rejected_logps=mean(jax.lax.stop_gradient(pr_B)))
    share = micro_weight / total_weight
    metrics = {k: v * share for k, v in metrics.items()}
    metrics["tokens"] = (jnp.sum(micro["chosen_mask"]) + jnp.sum(micro["rejected_mask"])
                         ).astype(jnp.float32)
    return loss * share, metrics

  loss, metrics, grads = accumulate_gradients(loss_fn, state.params, batch, accum_steps)
  return apply_update(optimizer, state, loss, metrics, grads, schedule)


def sft_step(config: models.ModelConfig, optimizer, state: TrainState, batch: dict, *,
             accum_steps: int = 1, impl: str = "auto", num_targets: Optional[int] = None,
             schedule=None):
  """One SFT update: mean next-token NLL over the response tokens of the whole batch.

  `batch` is {tokens, mask, loss_mask} [B, T]; metrics: `loss` (nats per target token),
  `grad_norm`, `learning_rate`, `tokens`, `target_tokens`, `finite`.
  """
  total_targets = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:]), 1).astype(jnp.float32)

  def loss_fn(params, micro):
    logps_B, lengths_B = sequence_logprobs(config, params, micro["tokens"], micro["mask"],
                                           micro["loss_mask"], impl=impl,
                                           num_targets=num_targets)
    return -jnp.sum(logps_B) / total_targets, {
        "tokens": jnp.sum(micro["mask"]).astype(jnp.float32),
        "target_tokens": jnp.sum(lengths_B)}

  loss, metrics, grads = accumulate_gradients(loss_fn, state.params, batch, accum_steps)
  return apply_update(optimizer, state, loss, metrics, grads, schedule)


def _as_loss_config(loss_cfg) -> LossConfig:
  if isinstance(loss_cfg, LossConfig):
    return loss_cfg
  fields = dict(loss_cfg.items()) if hasattr(loss_cfg, "items") else dict(vars(loss_cfg))
  if "hparams" in fields:
    fields["hparams"] = dict(fields["hparams"])
  return LossConfig(**fields)


def make_train_step(config: models.ModelConfig, optimizer, mesh, loss_cfg, *, schedule=None,
                    rules=sharding.DEFAULT_RULES) -> Callable[[TrainState, dict], tuple]:
  """`step(state, batch) -> (state, metrics)`: one jitted, sharded update with donated state.

  `loss_cfg` is a LossConfig (or a mapping of its fields); `schedule` (make_schedule) adds
  the `learning_rate` metric. The batch (host numpy arrays, see eva_jax.logprobs) is placed
  along its rows over data+fsdp; its size must be a multiple of accum_steps times
  `sharding.batch_multiple(mesh)`. The LM-head gather width and the shared prompt length are
  read from it on the host (`logprobs.static_shapes`), so each bucket of shapes compiles once.
  The state passed in is donated: use the returned one.
  """
  loss_cfg = _as_loss_config(loss_cfg)
  sft = loss_cfg.objective == "sft"
  keys = SFT_KEYS if sft else PAIR_KEYS
  if not sft:  # Bad beta / hparams fail here rather than at the first step.
    losses.preference_loss(loss_cfg.objective, *([jnp.zeros(1)] * 4), beta=loss_cfg.beta,
                           chosen_lengths=jnp.ones(1), rejected_lengths=jnp.ones(1),
                           chosen_win_prob=jnp.full(1, 0.5), rejected_win_prob=jnp.full(1, 0.5),
                           **loss_cfg.hparams)
  state_sh = state_shardings(config, optimizer, mesh, rules)
  # One spec for every batch array: rows over data+fsdp, the other axes replicated.
  rows_sh = NamedSharding(mesh, P(sharding.BATCH_AXES))
  replicated = sharding.replicated(mesh)

  def update(state, batch, num_targets, prompt_length):
    common = dict(accum_steps=loss_cfg.accum_steps, impl=loss_cfg.logprob_impl,
                  num_targets=num_targets, schedule=schedule)
    if sft:
      return sft_step(config, optimizer, state, batch, **common)
    return preference_step(config, optimizer, state, batch, loss_name=loss_cfg.objective,
                           beta=loss_cfg.beta, hparams=loss_cfg.hparams,
                           prompt_length=prompt_length, **common)

  jitted = jax.jit(update, static_argnums=(2, 3), in_shardings=(state_sh, rows_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))
  multiple = loss_cfg.accum_steps * sharding.batch_multiple(mesh)

  def step(state: TrainState, batch: dict):
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f"{loss_cfg.objective} step: the batch lacks {missing}")
    # The losses that need no reference or win probabilities ignore them when given.
    wanted = keys + tuple(k for k in REFERENCE_KEYS + WIN_PROB_KEYS if k in batch and not sft)
    batch = {k: batch[k] for k in wanted}
    rows = len(batch[keys[0]])
    if rows % multiple:
      raise ValueError(f"{loss_cfg.objective} step: batch of {rows} rows is not a multiple of "
                       f"accum_steps x mesh batch ({loss_cfg.accum_steps} x "
                       f"{sharding.batch_multiple(mesh)})")
    if sft:
      static = (num_targets_bucket(batch["loss_mask"], loss_cfg.bucket), None)
    else:
      shapes = static_shapes(batch, loss_cfg.bucket)
      static = (shapes["num_targets"], shapes["prompt_length"])
    # Placed explicitly (each device gets its rows): jit refuses host arrays for shardings that
    # span several processes.
    batch = sharding.shard_batch(batch, mesh)
    with sharding.activation_rules(mesh, rules):
      return jitted(state, batch, *static)

  return step


@functools.cache
def cpu_peak_flops(repeats: int = 3) -> float:
  """The host's float32 matmul roof in FLOP/s: the best of `repeats` jitted
  CPU_ROOF_SIZE^3 products after a warm-up, measured once per process. Fake CPU
  devices share the host, so it is the whole host's, not a device's."""
  n = CPU_ROOF_SIZE
  device = jax.local_devices(backend="cpu")[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(jnp.matmul)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def peak_flops(devices=None) -> Optional[float]:
  """Peak FLOP/s of `devices` together (bfloat16 dense on accelerators; CPU: the host's
  measured float32 roof, `cpu_peak_flops()`); None for an unknown accelerator."""
  devices = list(devices if devices is not None else jax.devices())
  if devices[0].platform == "cpu":
    return cpu_peak_flops()
  kind = devices[0].device_kind
  for key, flops in PEAK_FLOPS_BY_KIND:
    if key.lower() in kind.lower():
      return flops * len(devices)
  return None


def throughput(config: models.ModelConfig, tokens: float, seq_len: int, seconds: float,
               peak: Optional[float]) -> dict:
  """tokens/s and MFU: 3x the model's forward FLOPs per token (forward + backward) at
  `seq_len` context, over `peak` FLOP/s; MFU is omitted when `peak` is None."""
  out = {"step_seconds": seconds, "tokens_per_s": tokens / seconds}
  if peak:
    out["mfu"] = 3.0 * config.flops_per_token(seq_len) * tokens / seconds / peak
  return out


def timed_step(step: Callable, state: TrainState, batch: dict, *, config: models.ModelConfig,
               peak: Any = "auto") -> tuple[TrainState, dict]:
  """Runs `step`, waits for it, and returns (state, host metrics as floats) with tokens/s and
  MFU added (`peak`: FLOP/s, "auto" for `peak_flops()`, or None)."""
  start = time.perf_counter()
  state, metrics = step(state, batch)
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  seconds = time.perf_counter() - start
  seq_len = np.shape(batch["tokens"] if "tokens" in batch else batch["chosen_tokens"])[1]
  peak = peak_flops() if peak == "auto" else peak
  metrics.update(throughput(config, metrics["tokens"], seq_len, seconds, peak))
  return state, metrics


def check_finite(metrics: dict, step: int) -> None:
  """Raises FloatingPointError naming `step` if its loss or gradient norm is not finite.

  The train step has already declined that update, so the state it returned is the last good
  one (and so is the last checkpoint written from it)."""
  loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  if not (np.isfinite(loss) and np.isfinite(grad_norm)):
    raise FloatingPointError(
        f"training step {step}: non-finite loss {loss} (grad norm {grad_norm}); the update was "
        "not applied, the state returned by the step is the last good one")
