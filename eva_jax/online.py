"""The online learner's math: RLOO advantages, rollout log-probs and the policy-gradient update.

RLOO (Ahmadian et al. 2024): K samples per prompt from the current policy, the reward minus a
sequence-level KL to the reference, R = r − β·Σ_t (log π_old − log π_ref), and the leave-one-out
baseline A_i = R_i − mean_{j≠i} R_j. The loss is the policy gradient on the summed log-prob of
each response, −mean(A · log π(y)); when a batch is reused for more updates, the PPO-style clipped
objective on the sequence ratio exp(log π − log π_old) keeps the policy near the sampler's.

Axis letters: P prompts, K samples per prompt, R = P·K rollout rows (prompt-major, row p·K + k,
the sampler's order), S prompt columns, T response tokens (the sampler's max_new_tokens).
A rollout batch (`make_rollout_batch`, then `with_advantages`) is a dict of host arrays:

    prompt_tokens, prompt_mask  int32 [R, S]  the row's prompt, left-aligned (last column real)
    response_tokens             int32 [R, T]  sampled tokens; anything after the eos is ignored
    response_lengths            int32 [R]     tokens up to and including the eos (T if cut off)
    weights                     float32 [R]   0 on padding rows
    advantages, no_signal       float32 [R]   A, and 1 where the row's group had equal rewards
    kl                          float32 [R]   optional: Σ_t log π_old − log π_ref (metric only)
    old_logprobs                float32 [R]   optional: summed log π_old(y); absent = on-policy

One online step (the loop around it is the runner's):

    out = sampling.sample(config, state.params, prompts, mask, num_samples=K, temperature=1.0,
                          top_p=1.0, top_k=0, ...)          # untruncated: on-policy samples
    batch = make_rollout_batch(prompts, mask, out.tokens, out.lengths, batch_multiple=...)
    kl_R = out.logprobs.sum(-1).reshape(-1) - rollout_logprobs(config, ref_params, batch)[:P*K]
    batch = with_advantages(batch, rewards_PxK, kl_PxK=kl_R.reshape(P, K), beta=beta)
    state, metrics = make_rloo_step(config, optimizer, mesh)(state, batch)
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from eva_jax import logprobs, models, sharding, train
from eva_jax.train_state import TrainState, state_shardings

ROLLOUT_KEYS = ("prompt_tokens", "prompt_mask", "response_tokens", "response_lengths",
                "weights")
STEP_KEYS = ROLLOUT_KEYS + ("advantages", "no_signal")
OPTIONAL_KEYS = ("kl", "old_logprobs")


def rloo_advantages(rewards_PxK, kl_PxK=None, beta: float = 0.0):
  """Leave-one-out advantages A_i = R_i − mean_{j≠i} R_j of R = rewards − beta · kl, per group.

  `rewards_PxK`: K >= 2 samples of each of P prompts; `beta` a Python float >= 0.
  `kl_PxK` is each sample's sequence-level KL estimate Σ_t (log π_old − log π_ref); the result
  carries no gradient (the advantages are constants of the policy-gradient loss). NumPy input
  gives a NumPy result, JAX input (traced or not) a JAX one.
  """
  xp = jnp if any(isinstance(x, jax.Array) for x in (rewards_PxK, kl_PxK)) else np
  rewards_PxK = xp.asarray(rewards_PxK)
  if rewards_PxK.ndim != 2:
    raise ValueError(f"rloo_advantages: rewards must be [prompts, samples], got shape "
                     f"{rewards_PxK.shape}")
  k = rewards_PxK.shape[1]
  if k < 2:
    raise ValueError(f"rloo_advantages: the leave-one-out baseline needs >= 2 samples per "
                     f"prompt, got {k}")
  if not 0.0 <= float(beta) < np.inf:
    raise ValueError(f"rloo_advantages: beta must be finite and >= 0, got {beta}")
  returns_PxK = rewards_PxK.astype(xp.result_type(rewards_PxK.dtype, xp.float32))
  if kl_PxK is not None:
    kl_PxK = xp.asarray(kl_PxK)
    if kl_PxK.shape != rewards_PxK.shape:
      raise ValueError(f"rloo_advantages: kl {kl_PxK.shape} and rewards {rewards_PxK.shape} "
                       "differ in shape")
    returns_PxK = returns_PxK - beta * kl_PxK.astype(returns_PxK.dtype)
  elif beta:
    raise ValueError("rloo_advantages: beta > 0 needs kl_PxK")
  # R_i − (ΣR − R_i)/(k − 1) = k/(k − 1) · (R_i − mean R): centred first, so a per-group shift
  # cancels exactly and large rewards lose no precision.
  advantages_PxK = (returns_PxK - returns_PxK.mean(axis=1, keepdims=True)) * (k / (k - 1))
  return jax.lax.stop_gradient(advantages_PxK) if xp is jnp else advantages_PxK


def make_rollout_batch(prompts_PxS, prompt_mask_PxS, responses_PxKxT, lengths_PxK, *,
                       batch_multiple: int = 1) -> dict:
  """Rollout rows (module docstring) from the sampler's prompts and outputs, without advantages.

  Prompts may be padded on either side; each is left-aligned so that its last column predicts
  the first response token. Rows are padded to a multiple of `batch_multiple` (the mesh's batch
  sharding times accumulation steps) with weight-0 copies of row 0.
  """
  prompts_PxS, prompt_mask_PxS = np.asarray(prompts_PxS), np.asarray(prompt_mask_PxS) > 0
  responses_PxKxT, lengths_PxK = np.asarray(responses_PxKxT), np.asarray(lengths_PxK)
  p, k, t = responses_PxKxT.shape
  if prompts_PxS.shape != prompt_mask_PxS.shape or prompts_PxS.shape[0] != p or (
      lengths_PxK.shape != (p, k)):
    raise ValueError(f"make_rollout_batch: prompts {prompts_PxS.shape}, mask "
                     f"{prompt_mask_PxS.shape}, responses {responses_PxKxT.shape} and lengths "
                     f"{lengths_PxK.shape} do not agree on [P, S], [P, K, T], [P, K]")
  if not prompt_mask_PxS.any(axis=1).all():
    raise ValueError(f"make_rollout_batch: prompt {int(np.argmin(prompt_mask_PxS.any(1)))} is "
                     "empty")
  if ((lengths_PxK < 1) | (lengths_PxK > t)).any():
    raise ValueError(f"make_rollout_batch: response lengths must lie in [1, {t}], got "
                     f"{lengths_PxK.min()}..{lengths_PxK.max()}")
  # A stable sort moves each row's padding to the front and keeps its tokens in order.
  order_PxS = np.argsort(prompt_mask_PxS, axis=1, kind="stable")
  aligned_PxS = np.take_along_axis(prompts_PxS, order_PxS, axis=1)
  aligned_mask_PxS = np.take_along_axis(prompt_mask_PxS, order_PxS, axis=1)
  rows = p * k
  pad = -rows % batch_multiple
  take_R = np.concatenate([np.arange(rows), np.zeros(pad, int)])
  return {
      "prompt_tokens": np.repeat(aligned_PxS, k, axis=0)[take_R].astype(np.int32),
      "prompt_mask": np.repeat(aligned_mask_PxS, k, axis=0)[take_R].astype(np.int32),
      "response_tokens": responses_PxKxT.reshape(rows, t)[take_R].astype(np.int32),
      "response_lengths": lengths_PxK.reshape(rows)[take_R].astype(np.int32),
      "weights": (np.arange(rows + pad) < rows).astype(np.float32),
  }


def with_advantages(batch: dict, rewards_PxK, *, kl_PxK=None, beta: float = 0.0,
                    old_logprobs_PxK=None) -> dict:
  """A copy of a rollout batch with `advantages`, `no_signal` (and `kl`, `old_logprobs` when
  given) attached in row order; padding rows get 0."""
  rewards_PxK = np.asarray(rewards_PxK, np.float32)
  advantages_PxK = rloo_advantages(rewards_PxK, kl_PxK, beta)
  rows, size = rewards_PxK.size, len(batch["weights"])
  if rows != int(np.sum(batch["weights"])):
    raise ValueError(f"with_advantages: {rewards_PxK.shape} rewards for a batch of "
                     f"{int(np.sum(batch['weights']))} real rows")

  def column(values_PxK):
    out = np.zeros(size, np.float32)
    out[:rows] = np.asarray(values_PxK, np.float32).reshape(rows)
    return out

  # A group whose rewards are all equal carries no signal (before the KL term).
  equal_P = rewards_PxK.max(axis=1) == rewards_PxK.min(axis=1)
  new = dict(batch, advantages=column(advantages_PxK),
             no_signal=column(np.repeat(equal_P[:, None], rewards_PxK.shape[1], axis=1)))
  for key, values in (("kl", kl_PxK), ("old_logprobs", old_logprobs_PxK)):
    if values is not None:
      if np.shape(values) != rewards_PxK.shape:
        raise ValueError(f"with_advantages: {key} {np.shape(values)} differs from rewards "
                         f"{rewards_PxK.shape}")
      new[key] = column(values)
  return new


def sequence_logprobs(config: models.ModelConfig, params: dict, batch: dict, *,
                      impl: str = "auto", num_targets: Optional[int] = None):
  """(summed log π(y) [R] float32 nats, lengths [R]) of each row's response up to and including
  its eos; positions after it are masked out. `impl`, `num_targets` as in
  `logprobs.sequence_logprobs` (num_targets >= the longest response: `num_targets_for`)."""
  t = batch["response_tokens"].shape[1]
  response_mask_RxT = (jnp.arange(t)[None] < batch["response_lengths"][:, None]).astype(
      jnp.int32)
  tokens_RxL = jnp.concatenate([batch["prompt_tokens"], batch["response_tokens"]], axis=1)
  mask_RxL = jnp.concatenate([batch["prompt_mask"], response_mask_RxT], axis=1)
  loss_mask_RxL = jnp.concatenate([jnp.zeros_like(batch["prompt_mask"]), response_mask_RxT],
                                  axis=1)
  return logprobs.sequence_logprobs(config, params, tokens_RxL, mask_RxL, loss_mask_RxL,
                                    impl=impl, num_targets=num_targets)


def num_targets_for(batch: dict, bucket: int = 64) -> int:
  """The static LM-head gather width of `sequence_logprobs` for a host rollout batch: the
  longest response rounded up to `bucket` (few compiles), capped at T."""
  longest = int(np.max(batch["response_lengths"]))
  return min(-(-longest // bucket) * bucket, np.shape(batch["response_tokens"])[1])


def policy_gradient_loss(logps_R, advantages_R, old_logps_R=None, *, clip_eps=None,
                         weights_R=None, total_weight=None):
  """(loss, per-row log ratios log π − log π_old) of the sequence-level policy gradient.

  Without `clip_eps`: −Σ w·A·log π / Σ w (REINFORCE with the given advantages). With it: the
  PPO objective −Σ w·min(ρA, clip(ρ, 1 − ε, 1 + ε)A) / Σ w on ρ = exp(log π − log π_old);
  `old_logps_R` None means on-policy (ρ = 1, the REINFORCE gradient). `total_weight` replaces
  Σ w (a micro-batch's share of the whole batch)."""
  weights_R = jnp.ones_like(logps_R) if weights_R is None else weights_R
  total_weight = jnp.sum(weights_R) if total_weight is None else total_weight
  advantages_R = jax.lax.stop_gradient(advantages_R)
  old_R = jax.lax.stop_gradient(logps_R if old_logps_R is None else old_logps_R)
  log_ratio_R = logps_R - old_R
  ratio_R = jnp.exp(log_ratio_R)
  if clip_eps is None:
    objective_R = advantages_R * logps_R
  else:
    if not 0.0 < clip_eps < 1.0:
      raise ValueError(f"clip_eps must lie in (0, 1) or be None, got {clip_eps}")
    objective_R = jnp.minimum(ratio_R * advantages_R,
                              jnp.clip(ratio_R, 1 - clip_eps, 1 + clip_eps) * advantages_R)
  return -jnp.sum(weights_R * objective_R) / total_weight, log_ratio_R


def rloo_loss(params, batch: dict, *, config: models.ModelConfig, old_logprobs=None,
              advantages, clip_eps: Optional[float] = None, impl: str = "auto",
              num_targets: Optional[int] = None, total_weight=None, total_targets=None):
  """(loss, metrics) of the RLOO update on a rollout batch; pure, differentiable in params.

  `advantages`, `old_logprobs` [R] (None: on-policy). Metrics are weighted means over the real
  rows: `adv_abs` (mean |A|), `no_signal` (share of groups with equal rewards), `kl`,
  `logps`, `response_length`, `entropy` (−Σ log π / Σ tokens, the Monte-Carlo per-token entropy
  of on-policy samples), `ratio` (mean ρ), `log_ratio_abs` (mean |log π − log π_old|: the
  sampler-vs-trainer gap at the first update), `clipped` (share of rows whose ρ left the clip
  range); `tokens` is a sum (real prompt and response tokens). `total_weight`, `total_targets`
  replace the batch's own Σ w and Σ w·length, so micro-batch results add up to the batch's.
  """
  logps_R, lengths_R = sequence_logprobs(config, params, batch, impl=impl,
                                         num_targets=num_targets)
  weights_R = batch.get("weights", jnp.ones_like(logps_R)).astype(jnp.float32)
  total_weight = jnp.sum(weights_R) if total_weight is None else total_weight
  total_targets = jnp.sum(weights_R * lengths_R) if total_targets is None else total_targets
  loss, log_ratio_R = policy_gradient_loss(logps_R, advantages, old_logprobs,
                                           clip_eps=clip_eps, weights_R=weights_R,
                                           total_weight=total_weight)
  mean = lambda x_R: jnp.sum(weights_R * jax.lax.stop_gradient(x_R)) / total_weight
  ratio_R = jnp.exp(log_ratio_R)
  eps = np.inf if clip_eps is None else clip_eps
  metrics = {
      "adv_abs": mean(jnp.abs(advantages)),
      "logps": mean(logps_R),
      "response_length": mean(lengths_R),
      "entropy": jnp.sum(weights_R * -jax.lax.stop_gradient(logps_R)) / total_targets,
      "ratio": mean(ratio_R),
      "log_ratio_abs": mean(jnp.abs(log_ratio_R)),
      "clipped": mean((jnp.abs(ratio_R - 1) > eps).astype(jnp.float32)),
      "tokens": jnp.sum(weights_R * (jnp.sum(batch["prompt_mask"], axis=1) + lengths_R)),
  }
  for key in ("no_signal", "kl"):
    if key in batch:
      metrics[key] = mean(batch[key])
  return loss, metrics


def rloo_step(config: models.ModelConfig, optimizer, state: TrainState, batch: dict, *,
              clip_eps: Optional[float] = None, accum_steps: int = 1, impl: str = "auto",
              num_targets: Optional[int] = None, schedule=None):
  """One RLOO update on a rollout batch; pure, call it under jit. Returns (new state, metrics):
  rloo_loss's metrics over the whole batch, `loss`, `grad_norm`, `learning_rate`, `finite`."""
  weights_R = batch["weights"].astype(jnp.float32)
  total_weight = jnp.sum(weights_R)
  total_targets = jnp.sum(weights_R * batch["response_lengths"].astype(jnp.float32))

  def loss_fn(params, micro):
    return rloo_loss(params, micro, config=config, old_logprobs=micro.get("old_logprobs"),
                     advantages=micro["advantages"], clip_eps=clip_eps, impl=impl,
                     num_targets=num_targets, total_weight=total_weight,
                     total_targets=total_targets)

  # Normalised by whole-batch totals, so the micro-batch sums equal one update on the batch.
  loss, metrics, grads = train.accumulate_gradients(loss_fn, state.params, batch, accum_steps)
  return train.apply_update(optimizer, state, loss, metrics, grads, schedule)


@functools.partial(jax.jit, static_argnames=("config", "impl", "num_targets"))
def _rollout_forward(params, batch, *, config, impl, num_targets):
  return sequence_logprobs(config, params, batch, impl=impl, num_targets=num_targets)[0]


def rollout_logprobs(config: models.ModelConfig, params: dict, batch: dict, *, mesh=None,
                     impl: str = "auto", bucket: int = 64) -> np.ndarray:
  """Summed response log-probs [R] (numpy float32) of a rollout batch under `params`, one jitted
  forward without gradient: log π_ref for the KL, or the trainer's log π_old (its gap to the
  sampler's log-probs is worth logging). With `mesh`, rows are sharded as in the update."""
  arrays = {k: np.asarray(batch[k]) for k in ROLLOUT_KEYS if k != "weights"}
  kwargs = dict(config=config, impl=impl, num_targets=num_targets_for(arrays, bucket))
  if mesh is None:
    return np.asarray(_rollout_forward(params, arrays, **kwargs), np.float32)
  with sharding.activation_rules(mesh):
    out = _rollout_forward(params, sharding.shard_batch(arrays, mesh), **kwargs)
  return sharding.to_host(out).astype(np.float32)


def make_rloo_step(config: models.ModelConfig, optimizer, mesh, *,
                   clip_eps: Optional[float] = None, accum_steps: int = 1, impl: str = "auto",
                   bucket: int = 64, schedule=None,
                   rules=sharding.DEFAULT_RULES) -> Callable[[TrainState, dict], tuple]:
  """`step(state, batch) -> (state, metrics)`: one jitted, sharded RLOO update, state donated.

  The counterpart of `train.make_train_step` for rollout batches (with_advantages): rows over
  data+fsdp, their number a multiple of accum_steps × `sharding.batch_multiple(mesh)`; the
  LM-head gather width is read from the batch on the host (`num_targets_for`).
  """
  if clip_eps is not None and not 0.0 < clip_eps < 1.0:
    raise ValueError(f"make_rloo_step: clip_eps must lie in (0, 1) or be None, got {clip_eps}")
  state_sh = state_shardings(config, optimizer, mesh, rules)
  rows_sh = NamedSharding(mesh, P(sharding.BATCH_AXES))

  def update(state, batch, num_targets):
    return rloo_step(config, optimizer, state, batch, clip_eps=clip_eps,
                     accum_steps=accum_steps, impl=impl, num_targets=num_targets,
                     schedule=schedule)

  jitted = jax.jit(update, static_argnums=(2,), in_shardings=(state_sh, rows_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  multiple = accum_steps * sharding.batch_multiple(mesh)

  def step(state: TrainState, batch: dict):
    missing = [k for k in STEP_KEYS if k not in batch]
    if missing:
      raise ValueError(f"rloo step: the batch lacks {missing} (see online.with_advantages)")
    batch = {k: np.asarray(batch[k]) for k in STEP_KEYS + OPTIONAL_KEYS if k in batch}
    rows = len(batch["weights"])
    if rows % multiple:
      raise ValueError(f"rloo step: batch of {rows} rows is not a multiple of accum_steps x "
                       f"mesh batch ({accum_steps} x {sharding.batch_multiple(mesh)})")
    if not batch["weights"].sum() > 0:
      raise ValueError("rloo step: the batch has no real rows (all weights are 0)")
    num_targets = num_targets_for(batch, bucket)
    with sharding.activation_rules(mesh, rules):
      return jitted(state, sharding.shard_batch(batch, mesh), num_targets)

  return step
