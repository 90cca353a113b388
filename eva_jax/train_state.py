"""Train state, optimizer and their sharded initialisation.

The optimizer is an optax chain: global-norm clipping, then AdamW (or RMSprop, as the SPPO
authors train) under a linear warm-up, then a cosine (or, as the SPPO authors train, linear)
decay. Its state keeps the parameter
dtype. The state is created through `jax.eval_shape` (no allocation), its shardings derived
from the models' logical axes, and then one jitted init with `out_shardings` places each array
where the update expects it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from eva_jax import models, sharding

OPTIMIZERS = ("adamw", "rmsprop")
# The decay after the warm-up: cosine (eva's DPO) or linear (HF's `linear`, the SPPO authors').
SCHEDULES = ("cosine", "linear")


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar (optimizer updates applied); params; opt_state (optax)."""
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer hyperparameters. Defaults are the eva authors' DPO settings (AdamW, lr 5e-7,
  cosine with 10 % warm-up, no weight decay, gradient norm clipped to 1 as in HF Trainer)."""

  name: str = "adamw"               # "adamw" or "rmsprop"
  learning_rate: float = 5e-7       # peak learning rate
  total_steps: int = 1000           # optimizer updates over the run (the schedule's length)
  warmup_ratio: float = 0.1         # fraction of total_steps warmed up linearly from 0
  end_learning_rate: float = 0.0    # learning rate the decay ends at
  schedule: str = "cosine"          # the decay after the warm-up: "cosine" or "linear"
  weight_decay: float = 0.0         # decoupled (AdamW) / L2 added to the gradient (RMSprop)
  b1: float = 0.9                   # AdamW
  b2: float = 0.999                 # AdamW
  eps: float = 1e-8
  rmsprop_decay: float = 0.99       # RMSprop's running-average decay (PyTorch's alpha)
  max_grad_norm: Optional[float] = 1.0   # None: no clipping

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"OptimizerConfig.name must be one of {OPTIMIZERS}, got {self.name!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimizerConfig.schedule must be one of {SCHEDULES}, got "
                       f"{self.schedule!r}")
    if not self.learning_rate > 0 or self.total_steps < 1:
      raise ValueError(f"OptimizerConfig needs learning_rate > 0 and total_steps >= 1, got "
                       f"{self.learning_rate} and {self.total_steps}")
    if not 0.0 <= self.warmup_ratio < 1.0:
      raise ValueError(f"OptimizerConfig.warmup_ratio must lie in [0, 1), got "
                       f"{self.warmup_ratio}")
    if self.max_grad_norm is not None and not self.max_grad_norm > 0:
      raise ValueError(f"OptimizerConfig.max_grad_norm must be positive or None, got "
                       f"{self.max_grad_norm}")


def _as_optimizer_config(cfg) -> OptimizerConfig:
  """An OptimizerConfig from itself, a mapping or a ConfigDict (unknown fields are an error)."""
  if isinstance(cfg, OptimizerConfig):
    return cfg
  fields = dict(cfg.items()) if hasattr(cfg, "items") else dict(vars(cfg))
  known = {f.name for f in dataclasses.fields(OptimizerConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown optimizer fields {unknown}; known: {sorted(known)}")
  return OptimizerConfig(**fields)


def make_schedule(cfg) -> optax.Schedule:
  """Learning rate per optimizer step: linear warm-up from 0 over int(warmup_ratio ·
  total_steps) steps, then `cfg.schedule` down to end_learning_rate at total_steps.

  "linear" is HF's get_linear_schedule_with_warmup (the SPPO authors' `lr_scheduler_type:
  linear`): peak · (total − step) / (total − warm-up) after the warm-up, with end 0.
  """
  cfg = _as_optimizer_config(cfg)
  warmup = int(cfg.warmup_ratio * cfg.total_steps)
  if cfg.schedule == "linear":
    decay = optax.linear_schedule(init_value=cfg.learning_rate, end_value=cfg.end_learning_rate,
                                  transition_steps=max(cfg.total_steps - warmup, 1))
    if warmup == 0:
      return decay
    return optax.join_schedules(
        [optax.linear_schedule(init_value=0.0, end_value=cfg.learning_rate,
                               transition_steps=warmup), decay], boundaries=[warmup])
  if warmup == 0:
    # The same values as the warm-up form with 0 warm-up steps (optax joins at step 0), without
    # optax's warning about a zero-length linear schedule.
    peak = cfg.learning_rate
    return optax.cosine_decay_schedule(
        init_value=peak, decay_steps=max(cfg.total_steps, 1),
        alpha=0.0 if peak == 0.0 else cfg.end_learning_rate / peak)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(cfg.total_steps, warmup + 1), end_value=cfg.end_learning_rate)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW | RMSprop, under `make_schedule(cfg)`.

  RMSprop follows PyTorch's (which the SPPO authors' Trainer uses): eps outside the square root,
  no momentum, L2 weight decay added to the gradient.
  """
  cfg = _as_optimizer_config(cfg)
  schedule = make_schedule(cfg)
  parts = [] if cfg.max_grad_norm is None else [optax.clip_by_global_norm(cfg.max_grad_norm)]
  if cfg.name == "adamw":
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
  else:
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(optax.rmsprop(schedule, decay=cfg.rmsprop_decay, eps=cfg.eps,
                               eps_in_sqrt=False))
  return optax.chain(*parts)


def _new_state(optimizer, params) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def state_shardings(config: models.ModelConfig, optimizer: optax.GradientTransformation, mesh,
                    rules=sharding.DEFAULT_RULES) -> TrainState:
  """NamedShardings of a TrainState (computed from shapes only; nothing is allocated)."""
  param_sh = sharding.param_shardings(config, mesh, rules)
  shapes = jax.eval_shape(
      lambda: _new_state(optimizer, models.init_params(config, jax.random.key(0))))
  return TrainState(
      step=sharding.replicated(mesh), params=param_sh,
      opt_state=sharding.optimizer_state_shardings(shapes.opt_state, shapes.params, param_sh,
                                                   mesh))


def init_train_state(config: models.ModelConfig, optimizer: optax.GradientTransformation, mesh,
                     *, rng=None, params=None, rules=sharding.DEFAULT_RULES,
                     donate: bool = False) -> TrainState:
  """A sharded TrainState at step 0, from fresh random params (`rng`) or given `params`.

  Either way one jitted init with `out_shardings` creates it, so a full-size model's weights
  and optimizer state are born sharded. Given params are copied, unless `donate`: then the
  state takes their buffers over (no second copy of the weights on the device) and the
  caller's arrays are deleted when they already sit where the state places them.
  """
  if (rng is None) == (params is None):
    raise ValueError("init_train_state: pass exactly one of rng (fresh params) or params")
  shardings = state_shardings(config, optimizer, mesh, rules)
  if params is None:
    init = jax.jit(lambda key: _new_state(optimizer, models.init_params(config, key)),
                   out_shardings=shardings)
    return init(rng)
  params = jax.device_put(params, shardings.params)
  return jax.jit(lambda p: _new_state(optimizer, p), out_shardings=shardings,
                 donate_argnums=(0,) if donate else ())(params)
