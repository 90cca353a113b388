"""Preference losses on summed sequence log-probs, a registry keyed by name.

Every loss reads per-pair sequence log-probs: the SUM over response tokens of log π(y_t | x, y_<t)
for the chosen (c) and rejected (r) response, under the policy (π) and, where the loss needs one,
the reference (ref). Losses that need per-token averages also read the response lengths in tokens;
soft-target SPPO also reads each response's estimated win probability against the policy
(`win_probabilities`, computed on the host when the pairs are built).

    loss, metrics = preference_loss("dpo", pc_B, pr_B, rc_B, rr_B, beta=0.1)

`loss` is the (weighted) batch mean of the per-pair losses; `metrics` holds batch means of the
implicit rewards (`rewards_chosen`, `rewards_rejected`), their difference (`margin`), the fraction
of pairs whose chosen reward beats the rejected one (`accuracy`), and loss-specific terms. All
metrics are stop-gradient. `name`, `beta` and the hparams are Python numbers (static under jit);
only the arrays are traced, so call `preference_loss` inside the jitted train step.

A loss is a function `fn(pair: PairLogps, *, beta, **hparams) -> LossTerms` registered with
`@register_loss(name, needs_reference=..., needs_lengths=..., needs_win_probs=...)`; its
keyword-only parameters with defaults are its hparams (Python floats, or bools where the default is
a bool), and it checks their ranges itself.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Cap on a length-averaged log-prob before ORPO takes log(1 − p): a model certain of every token
# (mean log-prob 0 in float32) would give infinite odds and a NaN gradient.
_MAX_MEAN_LOGP = -1e-6


class PairLogps(NamedTuple):
  """Inputs of one batch of B preference pairs, float arrays of shape [B] (lengths as floats).

  `ref_*` are None for reference-free calls; `*_lengths_B` and `*_win_prob_B` are None when not
  given. `*_win_prob_B` is P(y ≻ π_t | x) of the chosen / rejected response (`win_probabilities`).
  """

  policy_chosen_B: jax.Array
  policy_rejected_B: jax.Array
  ref_chosen_B: Optional[jax.Array]
  ref_rejected_B: Optional[jax.Array]
  chosen_lengths_B: Optional[jax.Array]
  rejected_lengths_B: Optional[jax.Array]
  weights_B: jax.Array
  chosen_win_prob_B: Optional[jax.Array] = None
  rejected_win_prob_B: Optional[jax.Array] = None


class LossTerms(NamedTuple):
  """Per-pair outputs of a loss: losses, implicit rewards and extra metrics, each of shape [B]."""

  losses_B: jax.Array
  rewards_chosen_B: jax.Array
  rewards_rejected_B: jax.Array
  extras: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class _LossSpec:
  fn: Callable[..., LossTerms]
  hparam_defaults: dict[str, object]
  needs_reference: bool
  needs_lengths: bool
  needs_win_probs: bool


_REGISTRY: dict[str, _LossSpec] = {}


def register_loss(name: str, *, needs_reference: bool = True, needs_lengths: bool = False,
                  needs_win_probs: bool = False):
  """Decorator adding `fn(pair, *, beta, **hparams) -> LossTerms` to the registry as `name`.

  The keyword-only parameters of `fn` other than `beta` are its hparams; each needs a default.
  """
  def decorator(fn):
    if name in _REGISTRY:
      raise ValueError(f"preference loss {name!r} is already registered")
    params = inspect.signature(fn).parameters
    if "beta" not in params:
      raise TypeError(f"preference loss {name!r} must take a keyword-only `beta`")
    defaults = {}
    for key, param in params.items():
      if param.kind is not inspect.Parameter.KEYWORD_ONLY or key == "beta":
        continue
      if param.default is inspect.Parameter.empty:
        raise TypeError(f"hparam {key!r} of preference loss {name!r} needs a default")
      defaults[key] = param.default
    _REGISTRY[name] = _LossSpec(fn, defaults, needs_reference, needs_lengths, needs_win_probs)
    return fn
  return decorator


def available_losses() -> tuple[str, ...]:
  """Names of the registered preference losses, sorted."""
  return tuple(sorted(_REGISTRY))


def loss_hparams(name: str) -> dict[str, object]:
  """The hparams of loss `name` with their defaults (excluding `beta`)."""
  return dict(_lookup(name).hparam_defaults)


def preference_loss(name, policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta,
                    chosen_lengths=None, rejected_lengths=None, weights=None,
                    chosen_win_prob=None, rejected_win_prob=None, **hparams):
  """Preference loss `name` over a batch of B pairs.

  Args:
    name: a key of `available_losses()`.
    policy_chosen, policy_rejected: [B] summed response log-probs under the policy (nats).
    ref_chosen, ref_rejected: [B] the same under the reference; None for reference-free losses
      (`simpo`, `orpo`), which ignore them when given.
    beta: positive Python float, the loss's temperature / scale (see each loss).
    chosen_lengths, rejected_lengths: [B] response lengths in tokens (>= 1); required by the
      length-averaged losses (`ipo`, `simpo`, `orpo`, `rpo`).
    weights: optional [B] non-negative pair weights (e.g. 0 on padding pairs); the loss and
      metrics are then sum(w · x) / sum(w), so sum(w) must be > 0.
    chosen_win_prob, rejected_win_prob: [B] win probabilities in [0, 1] of the chosen and
      rejected response against the policy that sampled them (`win_probabilities`); required by
      `sppo`, ignored by the other losses.
    **hparams: loss-specific Python floats (bools where the default is one); see
      `loss_hparams(name)`.

  Returns:
    (loss, metrics): a scalar, and a dict of scalars with `rewards_chosen`, `rewards_rejected`,
    `margin`, `accuracy` and the loss's extras; float32 (float64 for float64 inputs under x64).
  """
  spec = _lookup(name)
  beta = _check_number("beta", beta)
  if not 0.0 < beta < math.inf:
    raise ValueError(f"beta must be a positive finite number, got {beta}")
  unknown = sorted(set(hparams) - set(spec.hparam_defaults))
  if unknown:
    raise ValueError(f"unknown hparams {unknown} for preference loss {name!r}; "
                     f"it takes {sorted(spec.hparam_defaults)}")
  if spec.needs_reference and (ref_chosen is None or ref_rejected is None):
    raise ValueError(f"preference loss {name!r} needs reference log-probs: pass ref_chosen and "
                     "ref_rejected")
  if spec.needs_lengths and (chosen_lengths is None or rejected_lengths is None):
    raise ValueError(f"preference loss {name!r} averages over tokens: pass chosen_lengths and "
                     "rejected_lengths")
  if spec.needs_win_probs and (chosen_win_prob is None or rejected_win_prob is None):
    raise ValueError(f"preference loss {name!r} regresses on win probabilities: pass "
                     "chosen_win_prob and rejected_win_prob (see losses.win_probabilities)")

  policy_chosen_B = _as_batch("policy_chosen", policy_chosen, None)
  batch_shape = policy_chosen_B.shape
  # Float32 at least: bfloat16 sums of log-probs lose the small differences the losses act on.
  dtype = jnp.promote_types(policy_chosen_B.dtype, jnp.float32)
  def batch(arg_name, value):
    return None if value is None else _as_batch(arg_name, value, batch_shape).astype(dtype)
  pair = PairLogps(
      policy_chosen_B=policy_chosen_B.astype(dtype),
      policy_rejected_B=batch("policy_rejected", policy_rejected),
      ref_chosen_B=batch("ref_chosen", ref_chosen),
      ref_rejected_B=batch("ref_rejected", ref_rejected),
      chosen_lengths_B=batch("chosen_lengths", chosen_lengths),
      rejected_lengths_B=batch("rejected_lengths", rejected_lengths),
      weights_B=(jnp.ones(batch_shape, dtype) if weights is None
                 else batch("weights", weights)),
      chosen_win_prob_B=batch("chosen_win_prob", chosen_win_prob),
      rejected_win_prob_B=batch("rejected_win_prob", rejected_win_prob))

  terms = spec.fn(pair, beta=beta, **{
      key: _check_hparam(name, key, hparams.get(key, default), default)
      for key, default in spec.hparam_defaults.items()})
  mean = lambda x_B: _weighted_mean(x_B, pair.weights_B)
  rewards_chosen_B = jax.lax.stop_gradient(terms.rewards_chosen_B)
  rewards_rejected_B = jax.lax.stop_gradient(terms.rewards_rejected_B)
  metrics = {
      "rewards_chosen": mean(rewards_chosen_B),
      "rewards_rejected": mean(rewards_rejected_B),
      "margin": mean(rewards_chosen_B - rewards_rejected_B),
      "accuracy": mean((rewards_chosen_B > rewards_rejected_B).astype(dtype)),
  }
  for key, value_B in terms.extras.items():
    metrics[key] = mean(jax.lax.stop_gradient(jnp.broadcast_to(value_B, batch_shape)))
  return mean(terms.losses_B), metrics


def _lookup(name) -> _LossSpec:
  if name not in _REGISTRY:
    raise ValueError(f"unknown preference loss {name!r}; known losses: {list(available_losses())}")
  return _REGISTRY[name]


def _check_number(key, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{key} must be a Python real number (static under jit), got {type(value)}")
  return float(value)


def _check_hparam(name, key, value, default):
  # `delta` of bco_pair may be a traced scalar (a running mean fed in each step); switches (bool
  # defaults) must be bools; the rest are static floats whose ranges each loss checks.
  if key == "delta" and (value is None or isinstance(value, jax.Array)):
    return value
  if isinstance(default, bool):
    if not isinstance(value, bool):
      raise TypeError(f"{name} hparam {key} must be a bool, got {value!r}")
    return value
  value = _check_number(f"{name} hparam {key}", value)
  if not math.isfinite(value):
    raise ValueError(f"{name} hparam {key} must be finite, got {value}")
  return value


def _check_range(key, value, low, high, *, high_inclusive=False):
  above_high = value > high if high_inclusive else value >= high
  if value < low or above_high:
    bracket = "]" if high_inclusive else ")"
    raise ValueError(f"{key} must lie in [{low}, {high}{bracket}, got {value}")


def _as_batch(arg_name, value, batch_shape):
  array = jnp.asarray(value)
  if array.ndim != 1 or (batch_shape is not None and array.shape != batch_shape):
    want = "[B]" if batch_shape is None else str(list(batch_shape))
    raise ValueError(f"{arg_name} must have shape {want}, got {list(array.shape)}")
  if not (jnp.issubdtype(array.dtype, jnp.integer) or jnp.issubdtype(array.dtype, jnp.floating)):
    raise TypeError(f"{arg_name} must be a real numeric array, got dtype {array.dtype}")
  return array


def _weighted_mean(x_B, weights_B):
  return jnp.sum(weights_B * x_B) / jnp.sum(weights_B)


def _log_ratios(pair: PairLogps):
  """Summed log π/ref of the chosen and rejected responses, [B] each."""
  return (pair.policy_chosen_B - pair.ref_chosen_B, pair.policy_rejected_B - pair.ref_rejected_B)


def _sigmoid_loss(logits_B, label_smoothing):
  """−(1−ε)·log σ(z) − ε·log σ(−z): the Bradley–Terry NLL with labels flipped with prob. ε."""
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B)
          - label_smoothing * jax.nn.log_sigmoid(-logits_B))


def _log1m_exp(x_B):
  """log(1 − exp(x)) for x < 0, accurate near 0 (expm1) and far from it (log1p); Mächler 2012."""
  # Both branches are finite for x <= _MAX_MEAN_LOGP, so jnp.where keeps gradients finite.
  return jnp.where(x_B > -math.log(2.0), jnp.log(-jnp.expm1(x_B)), jnp.log1p(-jnp.exp(x_B)))


@register_loss("dpo")
def dpo(pair: PairLogps, *, beta, label_smoothing=0.0) -> LossTerms:
  """Sigmoid DPO (Rafailov et al. 2023), conservative with label smoothing ε (TRL `sigmoid`).

  h = (πc − rc) − (πr − rr);  loss = −(1−ε)·log σ(βh) − ε·log σ(−βh);  0 <= ε < 0.5.
  Rewards: β·(π − ref) on summed log-probs.
  """
  _check_range("dpo label_smoothing", label_smoothing, 0.0, 0.5)
  chosen_B, rejected_B = _log_ratios(pair)
  return LossTerms(_sigmoid_loss(beta * (chosen_B - rejected_B), label_smoothing),
                   beta * chosen_B, beta * rejected_B, {})


@register_loss("ipo", needs_lengths=True)
def ipo(pair: PairLogps, *, beta) -> LossTerms:
  """IPO (Azar et al. 2023, eq. 17, β = τ) on length-averaged log-ratios, as TRL computes it.

  h = (πc − rc)/|c| − (πr − rr)/|r|;  loss = (h − 1/(2β))².
  Rewards: β·(π − ref)/|y|, the length-averaged log-ratios the loss acts on.
  """
  chosen_B, rejected_B = _log_ratios(pair)
  chosen_B = chosen_B / pair.chosen_lengths_B
  rejected_B = rejected_B / pair.rejected_lengths_B
  losses_B = (chosen_B - rejected_B - 0.5 / beta) ** 2
  return LossTerms(losses_B, beta * chosen_B, beta * rejected_B, {})


@register_loss("hinge")
def hinge(pair: PairLogps, *, beta) -> LossTerms:
  """SLiC hinge (Zhao et al. 2023) on DPO's logits (TRL `hinge`).

  h = (πc − rc) − (πr − rr);  loss = max(0, 1 − βh).  Rewards: β·(π − ref).
  """
  chosen_B, rejected_B = _log_ratios(pair)
  return LossTerms(jax.nn.relu(1.0 - beta * (chosen_B - rejected_B)),
                   beta * chosen_B, beta * rejected_B, {})


@register_loss("sppo_hard")
def sppo_hard(pair: PairLogps, *, beta) -> LossTerms:
  """SPPO (Wu et al. 2024) with hard win probabilities 1 / 0, in TRL's `sppo_hard` form.

  a = πc − rc, b = πr − rr;  loss = (a − 1/(2β))² + (b + 1/(2β))².
  This is the paper's eq. 4.7 square loss (log-ratio − η(P − ½))² with P = 1 / 0 and η = 1/β;
  the variant (βa − ½)² + (βb + ½)² is the same loss times β². Rewards: β·(π − ref).
  """
  chosen_B, rejected_B = _log_ratios(pair)
  losses_B = (chosen_B - 0.5 / beta) ** 2 + (rejected_B + 0.5 / beta) ** 2
  return LossTerms(losses_B, beta * chosen_B, beta * rejected_B, {})


def win_probabilities(rewards_PxN, *, scale: float = 1.0) -> np.ndarray:
  """Each sampled response's win probability against the policy that sampled it (host NumPy).

  P(y_i ≻ π | x) ≈ (1/N)·Σ_j σ(scale·(r_i − r_j)) over the prompt's N responses, j = i included
  (σ(0) = ½). σ of reward differences is our stand-in for PairRM, whose per-response scores SPPO
  and the eva authors turn into the same N×N matrix σ(s_i − s_j) at scale 1. j = i stays in
  because SPPO's estimator averages P(y ≻ y_k) over K samples y_k ~ π, and y_i is one of them;
  both codes divide the matrix's row sums (diagonal ½ included) by N. Leaving i out would give
  P', with P = ½/N + (N−1)/N·P': ours is P' shrunk towards ½ by (N−1)/N. A constant shift of a
  prompt's rewards changes nothing.

  Args:
    rewards_PxN: [P, N] finite rewards, N >= 2 responses per prompt.
    scale: positive inverse temperature applied to reward differences (1 for Bradley–Terry
      logits; reward models on another scale may want another).

  Returns:
    [P, N] float64 win probabilities in (0, 1); each prompt's row averages to ½.
  """
  rewards_PxN = np.asarray(rewards_PxN, dtype=np.float64)
  if rewards_PxN.ndim != 2 or rewards_PxN.shape[1] < 2:
    raise ValueError(f"win_probabilities needs [P, N] rewards with N >= 2, got shape "
                     f"{list(rewards_PxN.shape)}")
  if not np.isfinite(rewards_PxN).all():
    raise ValueError("win_probabilities: rewards must be finite")
  scale = _check_number("scale", scale)
  if not 0.0 < scale < math.inf:
    raise ValueError(f"scale must be a positive finite number, got {scale}")
  diff_PxNxN = scale * (rewards_PxN[:, :, None] - rewards_PxN[:, None, :])
  # σ(d) = exp(−log(1 + e^−d)), finite for any d.
  return np.exp(-np.logaddexp(0.0, -diff_PxNxN)).mean(axis=2)


@register_loss("sppo", needs_win_probs=True)
def sppo(pair: PairLogps, *, beta) -> LossTerms:
  """SPPO (Wu et al. 2024) with soft targets: each response's win probability against π_t.

  a = πc − rc, b = πr − rr, η = 1/β, p_c, p_r the chosen / rejected win probabilities
  (`win_probabilities`);  loss = (a − η(p_c − ½))² + (b − η(p_r − ½))².
  With p_c = 1, p_r = 0 this is `sppo_hard`. The eva authors' trainer (as SPPO's own) averages the
  two squares, half this loss: the same minimiser and, under RMSprop / Adam, the same updates up
  to the optimizer's ε and the gradient-norm clip. Rewards: β·(π − ref).
  Extras: `chosen_win_prob`, `rejected_win_prob` (batch means of the targets).
  """
  chosen_B, rejected_B = _log_ratios(pair)
  win_c_B, win_r_B = pair.chosen_win_prob_B, pair.rejected_win_prob_B
  losses_B = (chosen_B - (win_c_B - 0.5) / beta) ** 2 + (rejected_B - (win_r_B - 0.5) / beta) ** 2
  return LossTerms(losses_B, beta * chosen_B, beta * rejected_B,
                   {"chosen_win_prob": win_c_B, "rejected_win_prob": win_r_B})


@register_loss("simpo", needs_reference=False, needs_lengths=True)
def simpo(pair: PairLogps, *, beta, gamma_beta_ratio=0.5, label_smoothing=0.0) -> LossTerms:
  """SimPO (Meng et al. 2024): reference-free, length-averaged, with a target margin γ.

  γ = gamma_beta_ratio·β (the SimPO authors' parametrisation; 0.5 is their gemma-2-9b-it setting);
  z = β·(πc/|c| − πr/|r|) − γ;  loss = −(1−ε)·log σ(z) − ε·log σ(−z).
  Rewards: β·π/|y|.
  """
  _check_range("simpo gamma_beta_ratio", gamma_beta_ratio, 0.0, math.inf)
  _check_range("simpo label_smoothing", label_smoothing, 0.0, 0.5)
  chosen_B = beta * pair.policy_chosen_B / pair.chosen_lengths_B
  rejected_B = beta * pair.policy_rejected_B / pair.rejected_lengths_B
  logits_B = chosen_B - rejected_B - gamma_beta_ratio * beta
  return LossTerms(_sigmoid_loss(logits_B, label_smoothing), chosen_B, rejected_B, {})


@register_loss("orpo", needs_reference=False, needs_lengths=True)
def orpo(pair: PairLogps, *, beta) -> LossTerms:
  """ORPO (Hong et al. 2024): chosen NLL plus λ times the odds-ratio loss; `beta` is λ (as in TRL).

  With p̄ = π/|y| the length-averaged log-prob (capped at -1e-6 so the odds stay finite),
  log_odds = (p̄c − log(1 − e^p̄c)) − (p̄r − log(1 − e^p̄r));
  loss = −p̄c − β·log σ(log_odds).  TRL's default λ is 0.1.
  Rewards: β·p̄ (TRL's ORPO rewards). Extras: `nll` (−p̄c), `log_odds`, `odds_ratio_loss`.
  """
  mean_chosen_B = jnp.minimum(pair.policy_chosen_B / pair.chosen_lengths_B, _MAX_MEAN_LOGP)
  mean_rejected_B = jnp.minimum(pair.policy_rejected_B / pair.rejected_lengths_B, _MAX_MEAN_LOGP)
  log_odds_B = ((mean_chosen_B - _log1m_exp(mean_chosen_B))
                - (mean_rejected_B - _log1m_exp(mean_rejected_B)))
  odds_ratio_loss_B = -jax.nn.log_sigmoid(log_odds_B)
  nll_B = -mean_chosen_B
  return LossTerms(nll_B + beta * odds_ratio_loss_B, beta * mean_chosen_B, beta * mean_rejected_B,
                   {"nll": nll_B, "log_odds": log_odds_B, "odds_ratio_loss": odds_ratio_loss_B})


@register_loss("rpo", needs_lengths=True)
def rpo(pair: PairLogps, *, beta, alpha=1.0, penalize_length_nll=False) -> LossTerms:
  """RPO / iterative RPO (Pang et al. 2024): sigmoid DPO plus α times the chosen NLL per token.

  loss = −log σ(β·((πc − rc) − (πr − rr))) + α·nll;  α >= 0 (TRL `rpo_alpha`);
  nll = −πc/|c|, the paper's chosen NLL over its length (the default), or with
  `penalize_length_nll` the eva authors' option of that name, nll = −πc/|c|²: their trainer
  divides the token-mean chosen NLL of a device's micro-batch by that micro-batch's count of
  chosen tokens, and their RPO runs put one pair on each device.
  Rewards: β·(π − ref). Extras: `nll`, `dpo_loss`.
  """
  _check_range("rpo alpha", alpha, 0.0, math.inf)
  chosen_B, rejected_B = _log_ratios(pair)
  dpo_loss_B = -jax.nn.log_sigmoid(beta * (chosen_B - rejected_B))
  nll_B = -pair.policy_chosen_B / pair.chosen_lengths_B
  if penalize_length_nll:
    nll_B = nll_B / pair.chosen_lengths_B
  return LossTerms(dpo_loss_B + alpha * nll_B, beta * chosen_B, beta * rejected_B,
                   {"nll": nll_B, "dpo_loss": dpo_loss_B})


@register_loss("bco_pair")
def bco_pair(pair: PairLogps, *, beta, delta=None) -> LossTerms:
  """Pairwise BCO (Jung et al. 2024; TRL `bco_pair`): binary classifier with a reward shift δ.

  r_c = β·(πc − rc), r_r = β·(πr − rr);  loss = −log σ(r_c − δ) − log σ(−(r_r − δ)).
  TRL keeps δ as a running mean of the batch reward means; this pure function takes `delta`
  (a float, or a traced scalar to avoid recompiles) and otherwise uses the current batch's
  (weighted) mean of all 2B rewards, without gradient. Rewards: r_c, r_r. Extras: `delta`.
  """
  chosen_B, rejected_B = _log_ratios(pair)
  rewards_chosen_B, rewards_rejected_B = beta * chosen_B, beta * rejected_B
  if delta is None:
    delta = jax.lax.stop_gradient(
        0.5 * (_weighted_mean(rewards_chosen_B, pair.weights_B)
               + _weighted_mean(rewards_rejected_B, pair.weights_B)))
  delta = jnp.asarray(delta, rewards_chosen_B.dtype)
  losses_B = (-jax.nn.log_sigmoid(rewards_chosen_B - delta)
              - jax.nn.log_sigmoid(-(rewards_rejected_B - delta)))
  return LossTerms(losses_B, rewards_chosen_B, rewards_rejected_B, {"delta": delta})


@register_loss("nca_pair")
def nca_pair(pair: PairLogps, *, beta) -> LossTerms:
  """Pairwise NCA (Chen et al. 2024, Noise Contrastive Alignment; TRL `nca_pair`).

  r = β·(π − ref);  loss = −log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r).  Rewards: r_c, r_r.
  """
  chosen_B, rejected_B = _log_ratios(pair)
  rewards_chosen_B, rewards_rejected_B = beta * chosen_B, beta * rejected_B
  losses_B = (-jax.nn.log_sigmoid(rewards_chosen_B) - 0.5 * jax.nn.log_sigmoid(-rewards_chosen_B)
              - 0.5 * jax.nn.log_sigmoid(-rewards_rejected_B))
  return LossTerms(losses_B, rewards_chosen_B, rewards_rejected_B, {})
