"""Preference losses against their published formulas, written independently in NumPy float64.

Values and metrics are compared directly; gradients of the JAX losses (jax.grad) are compared with
central finite differences of the NumPy formulas.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import losses

B = 6


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid_loss(z, eps):
  return -(1.0 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)


# Each reference: (inputs dict of float64 [B] arrays, beta, weights, hparams) ->
# (per-pair losses, chosen rewards, rejected rewards, extras dict of [B] or scalar values).
def ref_dpo(x, beta, w, label_smoothing=0.0):
  h = (x["pc"] - x["rc"]) - (x["pr"] - x["rr"])
  return (np_sigmoid_loss(beta * h, label_smoothing),
          beta * (x["pc"] - x["rc"]), beta * (x["pr"] - x["rr"]), {})


def ref_ipo(x, beta, w):
  chosen = (x["pc"] - x["rc"]) / x["lc"]
  rejected = (x["pr"] - x["rr"]) / x["lr"]
  return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2, beta * chosen, beta * rejected, {}


def ref_hinge(x, beta, w):
  h = (x["pc"] - x["rc"]) - (x["pr"] - x["rr"])
  return np.maximum(0.0, 1.0 - beta * h), beta * (x["pc"] - x["rc"]), beta * (x["pr"] - x["rr"]), {}


def ref_sppo_hard(x, beta, w):
  a = x["pc"] - x["rc"]
  b = x["pr"] - x["rr"]
  return (a - 1.0 / (2 * beta)) ** 2 + (b + 1.0 / (2 * beta)) ** 2, beta * a, beta * b, {}


def ref_sppo(x, beta, w):
  # Wu et al. 2024: (log π/π_t(y) − η(P(y ≻ π_t) − ½))² for the chosen and the rejected, η = 1/β.
  eta = 1.0 / beta
  a = x["pc"] - x["rc"]
  b = x["pr"] - x["rr"]
  return ((a - eta * (x["wc"] - 0.5)) ** 2 + (b - eta * (x["wr"] - 0.5)) ** 2, beta * a, beta * b,
          {"chosen_win_prob": x["wc"], "rejected_win_prob": x["wr"]})


def ref_simpo(x, beta, w, gamma_beta_ratio=0.5, label_smoothing=0.0):
  gamma = gamma_beta_ratio * beta
  z = beta * x["pc"] / x["lc"] - beta * x["pr"] / x["lr"] - gamma
  return (np_sigmoid_loss(z, label_smoothing),
          beta * x["pc"] / x["lc"], beta * x["pr"] / x["lr"], {})


def ref_orpo(x, beta, w):
  # Paper's odds(y) = P(y) / (1 − P(y)) with P the per-token geometric-mean probability.
  p_c = np.exp(x["pc"] / x["lc"])
  p_r = np.exp(x["pr"] / x["lr"])
  log_odds = np.log(p_c / (1.0 - p_c)) - np.log(p_r / (1.0 - p_r))
  nll = -np.log(p_c)
  ratio_loss = -np_log_sigmoid(log_odds)
  return (nll + beta * ratio_loss, beta * np.log(p_c), beta * np.log(p_r),
          {"nll": nll, "log_odds": log_odds, "odds_ratio_loss": ratio_loss})


def ref_rpo(x, beta, w, alpha=1.0, penalize_length_nll=False):
  h = (x["pc"] - x["rc"]) - (x["pr"] - x["rr"])
  dpo = -np_log_sigmoid(beta * h)
  # Paper: chosen NLL over its length; the eva authors' penalize_length_nll divides once more.
  nll = -x["pc"] / x["lc"] / (x["lc"] if penalize_length_nll else 1.0)
  return (dpo + alpha * nll, beta * (x["pc"] - x["rc"]), beta * (x["pr"] - x["rr"]),
          {"nll": nll, "dpo_loss": dpo})


def ref_bco_pair(x, beta, w, delta=None):
  r_c = beta * (x["pc"] - x["rc"])
  r_r = beta * (x["pr"] - x["rr"])
  if delta is None:
    delta = (np.sum(w * r_c) + np.sum(w * r_r)) / (2.0 * np.sum(w))
  return (-np_log_sigmoid(r_c - delta) - np_log_sigmoid(-(r_r - delta)), r_c, r_r,
          {"delta": delta})


def ref_nca_pair(x, beta, w):
  r_c = beta * (x["pc"] - x["rc"])
  r_r = beta * (x["pr"] - x["rr"])
  return (-np_log_sigmoid(r_c) - 0.5 * np_log_sigmoid(-r_c) - 0.5 * np_log_sigmoid(-r_r),
          r_c, r_r, {})


REFERENCES = {
    "dpo": ref_dpo, "ipo": ref_ipo, "hinge": ref_hinge, "sppo_hard": ref_sppo_hard,
    "sppo": ref_sppo, "simpo": ref_simpo, "orpo": ref_orpo, "rpo": ref_rpo,
    "bco_pair": ref_bco_pair, "nca_pair": ref_nca_pair,
}

CASES = [
    ("dpo", 0.1, {}),
    ("dpo", 0.1, {"label_smoothing": 0.2}),
    ("ipo", 0.6, {}),
    ("hinge", 0.1, {}),
    ("sppo_hard", 0.5, {}),
    ("sppo", 0.5, {}),
    ("simpo", 2.0, {}),
    ("simpo", 2.0, {"gamma_beta_ratio": 0.8, "label_smoothing": 0.1}),
    ("orpo", 0.1, {}),
    ("rpo", 0.1, {"alpha": 0.7}),
    ("rpo", 0.1, {"alpha": 0.7, "penalize_length_nll": True}),
    ("bco_pair", 0.1, {}),
    ("bco_pair", 0.1, {"delta": 0.3}),
    ("nca_pair", 0.1, {}),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in hp.items()) or 'default'}"
            for name, _, hp in CASES]


def make_inputs(seed=0, batch=B):
  """Float32-representable float64 inputs: mean log-probs in [-2.5, -0.1], lengths 1..12, win
  probabilities in [0, 1]."""
  rng = np.random.default_rng(seed)
  lc = rng.integers(1, 13, batch).astype(np.float64)
  lr = rng.integers(1, 13, batch).astype(np.float64)
  pc = -lc * rng.uniform(0.1, 2.5, batch)
  pr = -lr * rng.uniform(0.1, 2.5, batch)
  rc = pc + rng.normal(0.0, 5.0, batch)
  rr = pr + rng.normal(0.0, 5.0, batch)
  wc, wr = rng.uniform(0.0, 1.0, batch), rng.uniform(0.0, 1.0, batch)
  x = {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "lc": lc, "lr": lr, "wc": wc, "wr": wr}
  # Round through float32 so both sides see the same numbers.
  return {k: v.astype(np.float32).astype(np.float64) for k, v in x.items()}


def jax_loss(name, x, beta, weights=None, **hp):
  return losses.preference_loss(
      name, jnp.asarray(x["pc"], jnp.float32), jnp.asarray(x["pr"], jnp.float32),
      jnp.asarray(x["rc"], jnp.float32), jnp.asarray(x["rr"], jnp.float32), beta=beta,
      chosen_lengths=jnp.asarray(x["lc"], jnp.int32),
      rejected_lengths=jnp.asarray(x["lr"], jnp.int32),
      weights=None if weights is None else jnp.asarray(weights, jnp.float32),
      chosen_win_prob=jnp.asarray(x["wc"], jnp.float32),
      rejected_win_prob=jnp.asarray(x["wr"], jnp.float32), **hp)


def np_weighted_mean(v, w):
  return np.sum(w * np.broadcast_to(v, w.shape)) / np.sum(w)


def test_registry_has_every_loss():
  assert losses.available_losses() == tuple(sorted(REFERENCES))
  assert losses.loss_hparams("simpo") == {"gamma_beta_ratio": 0.5, "label_smoothing": 0.0}


@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
@pytest.mark.parametrize("name,beta,hp", CASES, ids=CASE_IDS)
def test_value_and_metrics_match_formula(name, beta, hp, weighted):
  x = make_inputs(seed=3)
  w = np.random.default_rng(2).uniform(0.0, 2.0, B) if weighted else np.ones(B)
  loss, metrics = jax_loss(name, x, beta, weights=w if weighted else None, **hp)
  ref_losses, ref_rc, ref_rr, ref_extras = REFERENCES[name](x, beta, w, **hp)
  want = {"rewards_chosen": np_weighted_mean(ref_rc, w),
          "rewards_rejected": np_weighted_mean(ref_rr, w),
          "margin": np_weighted_mean(ref_rc - ref_rr, w),
          "accuracy": np_weighted_mean((ref_rc > ref_rr).astype(np.float64), w)}
  want.update({k: np_weighted_mean(v, w) for k, v in ref_extras.items()})
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, np_weighted_mean(ref_losses, w), rtol=2e-6, atol=1e-6)
  assert sorted(metrics) == sorted(want)
  for key, value in want.items():
    np.testing.assert_allclose(metrics[key], value, rtol=2e-6, atol=1e-6, err_msg=key)
  # The inputs give both outcomes, so accuracy is a real check of the comparison.
  assert 0.0 < want["accuracy"] < 1.0


@pytest.mark.parametrize("name,beta,hp", CASES, ids=CASE_IDS)
def test_gradient_matches_finite_differences(name, beta, hp):
  x = make_inputs(seed=2)
  w = np.ones(B)
  hp_fixed = dict(hp)
  if name == "bco_pair" and "delta" not in hp:
    # The JAX loss stops the gradient through the batch-mean shift, so hold it fixed here.
    hp_fixed["delta"] = REFERENCES[name](x, beta, w, **hp)[3]["delta"]

  def np_loss(pc, pr):
    return np.mean(REFERENCES[name](dict(x, pc=pc, pr=pr), beta, w, **hp_fixed)[0])

  def f(pc, pr):
    return jax_loss(name, dict(x, pc=pc, pr=pr), beta, **hp)[0]

  grad_pc, grad_pr = jax.grad(f, argnums=(0, 1))(
      jnp.asarray(x["pc"], jnp.float32), jnp.asarray(x["pr"], jnp.float32))
  step = 1e-5
  for key, got in (("pc", grad_pc), ("pr", grad_pr)):
    want = np.zeros(B)
    for i in range(B):
      up, down = x[key].copy(), x[key].copy()
      up[i] += step
      down[i] -= step
      args_up = {"pc": x["pc"], "pr": x["pr"], key: up}
      args_down = {"pc": x["pc"], "pr": x["pr"], key: down}
      want[i] = (np_loss(**args_up) - np_loss(**args_down)) / (2 * step)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7, err_msg=f"d loss / d {key}")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_dpo_at_step_zero_is_log2_with_known_gradient(label_smoothing):
  x = make_inputs(seed=4)
  beta = 0.1
  policy_c, policy_r = jnp.asarray(x["pc"], jnp.float32), jnp.asarray(x["pr"], jnp.float32)

  def f(pc, pr):
    # Reference = policy at step 0 (a constant copy, as a frozen reference is).
    return losses.preference_loss("dpo", pc, pr, policy_c, policy_r, beta=beta,
                                  label_smoothing=label_smoothing)

  (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(policy_c, policy_r)
  np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
  # d/dz of −(1−ε) log σ(z) − ε log σ(−z) at z = 0 is −(1 − 2ε)/2; z = β·h, and the mean is over B.
  slope = beta * (1.0 - 2.0 * label_smoothing) / (2.0 * B)
  np.testing.assert_allclose(grads[0], np.full(B, -slope), rtol=1e-6)
  np.testing.assert_allclose(grads[1], np.full(B, slope), rtol=1e-6)
  assert metrics["margin"] == 0.0 and metrics["accuracy"] == 0.0


def test_label_smoothing_mixes_the_flipped_label():
  x = make_inputs(seed=5)
  plain = jax_loss("dpo", x, 0.1)[0]
  flipped = jax_loss("dpo", dict(x, pc=x["pr"], pr=x["pc"], rc=x["rr"], rr=x["rc"]), 0.1)[0]
  smoothed = jax_loss("dpo", x, 0.1, label_smoothing=0.3)[0]
  np.testing.assert_allclose(smoothed, 0.7 * plain + 0.3 * flipped, rtol=1e-6)


@pytest.mark.parametrize("name,beta,hp", CASES, ids=CASE_IDS)
def test_zero_weight_pairs_are_dropped(name, beta, hp):
  x = make_inputs(seed=6)
  keep = np.array([True, False, True, True, False, True])
  loss_w, metrics_w = jax_loss(name, x, beta, weights=keep.astype(np.float64), **hp)
  loss_k, metrics_k = jax_loss(name, {k: v[keep] for k, v in x.items()}, beta, **hp)
  np.testing.assert_allclose(loss_w, loss_k, rtol=1e-6, atol=1e-7)
  for key in metrics_k:
    np.testing.assert_allclose(metrics_w[key], metrics_k[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_jit_matches_eager_and_bco_delta_can_be_traced():
  x = make_inputs(seed=7)
  args = [jnp.asarray(x[k], jnp.float32) for k in ("pc", "pr", "rc", "rr", "lc", "lr")]

  @jax.jit
  def step(pc, pr, rc, rr, lc, lr, delta):
    rpo = losses.preference_loss("rpo", pc, pr, rc, rr, beta=0.1, chosen_lengths=lc,
                                 rejected_lengths=lr, alpha=0.5)
    bco = losses.preference_loss("bco_pair", pc, pr, rc, rr, beta=0.1, delta=delta)
    return rpo, bco

  (rpo_loss, rpo_metrics), (bco_loss, bco_metrics) = step(*args, jnp.float32(0.3))
  np.testing.assert_allclose(rpo_loss, jax_loss("rpo", x, 0.1, alpha=0.5)[0], rtol=1e-6)
  np.testing.assert_allclose(rpo_metrics["nll"], jax_loss("rpo", x, 0.1, alpha=0.5)[1]["nll"],
                             rtol=1e-6)
  np.testing.assert_allclose(bco_loss, np.mean(ref_bco_pair(x, 0.1, np.ones(B), delta=0.3)[0]),
                             rtol=2e-6)
  np.testing.assert_allclose(bco_metrics["delta"], 0.3, rtol=1e-7)


def test_orpo_is_accurate_and_finite_near_certain_tokens():
  # Mean log-probs near 0 (p close to 1): log(1 − p) needs expm1 to be accurate in float32.
  x = make_inputs(seed=8)
  x["pc"] = (-x["lc"] * np.geomspace(1e-4, 1e-3, B)).astype(np.float32).astype(np.float64)
  x["pr"] = (-x["lr"] * np.geomspace(2e-3, 3e-4, B)).astype(np.float32).astype(np.float64)
  loss, metrics = jax_loss("orpo", x, 0.1)
  _, _, _, extras = ref_orpo(x, 0.1, np.ones(B))
  np.testing.assert_allclose(metrics["log_odds"], np.mean(extras["log_odds"]), atol=2e-5)
  # A model certain of every token (mean log-prob exactly 0) still gives finite loss and grads.
  x["pc"] = np.zeros(B)
  grads = jax.grad(lambda pc: jax_loss("orpo", dict(x, pc=pc), 0.1)[0])(jnp.zeros(B, jnp.float32))
  assert np.isfinite(jax_loss("orpo", x, 0.1)[0]) and np.all(np.isfinite(grads))


def test_bfloat16_inputs_give_float32_results():
  x = make_inputs(seed=9)
  args = [jnp.asarray(x[k], jnp.bfloat16) for k in ("pc", "pr", "rc", "rr")]
  loss, metrics = losses.preference_loss("dpo", *args, beta=0.1)
  assert loss.dtype == jnp.float32 and metrics["margin"].dtype == jnp.float32


def _call(name="dpo", **overrides):
  x = make_inputs(seed=10)
  kwargs = {"policy_chosen": x["pc"], "policy_rejected": x["pr"], "ref_chosen": x["rc"],
            "ref_rejected": x["rr"], "beta": 0.1, "chosen_lengths": x["lc"],
            "rejected_lengths": x["lr"]}
  kwargs.update(overrides)
  return losses.preference_loss(name, **kwargs)


def test_unknown_loss_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown preference loss 'dpoo'.*'bco_pair'.*'simpo'"):
    _call("dpoo")


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo", "rpo"])
def test_missing_lengths(name):
  with pytest.raises(ValueError, match=f"{name}.*chosen_lengths and rejected_lengths"):
    _call(name, rejected_lengths=None)


@pytest.mark.parametrize(
    "name", ["dpo", "ipo", "hinge", "sppo_hard", "sppo", "rpo", "bco_pair", "nca_pair"])
def test_missing_reference(name):
  with pytest.raises(ValueError, match=f"{name}.*needs reference log-probs"):
    _call(name, ref_chosen=None)


def test_reference_free_losses_need_no_reference():
  for name in ("simpo", "orpo"):
    with_ref = _call(name)[0]
    np.testing.assert_allclose(_call(name, ref_chosen=None, ref_rejected=None)[0], with_ref)


@pytest.mark.parametrize("beta", [0.0, -0.1, math.inf, math.nan])
def test_bad_beta_value(beta):
  with pytest.raises(ValueError, match="beta must be a positive finite number"):
    _call(beta=beta)


def test_beta_must_be_a_python_number():
  with pytest.raises(TypeError, match="beta must be a Python real number"):
    _call(beta="0.1")


@pytest.mark.parametrize("name,hp,pattern", [
    ("dpo", {"label_smoothing": 0.5}, r"dpo label_smoothing must lie in \[0.0, 0.5\)"),
    ("dpo", {"label_smoothing": -0.1}, r"dpo label_smoothing must lie in"),
    ("simpo", {"gamma_beta_ratio": -1.0}, r"simpo gamma_beta_ratio must lie in"),
    ("rpo", {"alpha": -0.5}, r"rpo alpha must lie in"),
    ("rpo", {"alpha": math.nan}, r"rpo hparam alpha must be finite"),
    ("dpo", {"gamma_beta_ratio": 0.5},
     r"unknown hparams \['gamma_beta_ratio'\].*'label_smoothing'"),
])
def test_bad_hparams(name, hp, pattern):
  with pytest.raises(ValueError, match=pattern):
    _call(name, **hp)


def test_bad_shapes():
  with pytest.raises(ValueError, match=r"policy_rejected must have shape \[6\], got \[5\]"):
    _call(policy_rejected=np.zeros(5))
  with pytest.raises(ValueError, match=r"policy_chosen must have shape \[B\], got \[2, 3\]"):
    _call(policy_chosen=np.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"weights must have shape \[6\]"):
    _call(weights=np.ones(3))


def test_sppo_needs_win_probabilities():
  with pytest.raises(ValueError, match="sppo.*pass chosen_win_prob and rejected_win_prob"):
    _call("sppo", rejected_win_prob=None, chosen_win_prob=np.full(B, 0.5))


def test_rpo_penalize_length_nll_must_be_a_bool():
  with pytest.raises(TypeError, match="rpo hparam penalize_length_nll must be a bool, got 1.0"):
    _call("rpo", penalize_length_nll=1.0)
  assert losses.loss_hparams("rpo") == {"alpha": 1.0, "penalize_length_nll": False}


def test_soft_sppo_with_certain_outcomes_is_sppo_hard():
  x = make_inputs(seed=11)
  x.update(wc=np.ones(B), wr=np.zeros(B))
  soft, soft_metrics = jax_loss("sppo", x, 0.5)
  hard, hard_metrics = jax_loss("sppo_hard", x, 0.5)
  np.testing.assert_allclose(soft, hard, rtol=1e-6)
  for key in hard_metrics:
    np.testing.assert_allclose(soft_metrics[key], hard_metrics[key], rtol=1e-6, err_msg=key)


def test_rpo_penalized_nll_is_the_authors_one_pair_micro_batch():
  # The authors' trainer: token-mean NLL of the chosen tokens of a device's micro-batch, divided
  # by the number of those tokens; their RPO runs hold one pair per device.
  rng = np.random.default_rng(12)
  token_logps = [np.log(rng.uniform(0.05, 0.95, n)) for n in (3, 7, 11)]
  authors = [np.mean(-t) / len(t) for t in token_logps]
  pc = np.array([t.sum() for t in token_logps])
  lc = np.array([len(t) for t in token_logps], np.float64)
  for i in range(3):
    _, metrics = losses.preference_loss(
        "rpo", pc[i:i + 1], pc[i:i + 1] - 1.0, pc[i:i + 1], pc[i:i + 1], beta=0.1,
        chosen_lengths=lc[i:i + 1], rejected_lengths=lc[i:i + 1], penalize_length_nll=True)
    np.testing.assert_allclose(metrics["nll"], authors[i], rtol=1e-6)


def test_win_probabilities_by_hand():
  ln3 = math.log(3.0)
  # σ(±ln 3) = 3/4, 1/4; σ(±2 ln 3) = 9/10, 1/10; each row averages over j = 1..3, j = i included.
  rewards = np.array([[0.0, ln3, 2 * ln3], [5.0, 5.0, 5.0 + ln3]])
  want = np.array([[(0.5 + 0.25 + 0.1) / 3, (0.75 + 0.5 + 0.25) / 3, (0.9 + 0.75 + 0.5) / 3],
                   [(0.5 + 0.5 + 0.25) / 3, (0.5 + 0.5 + 0.25) / 3, (0.75 + 0.75 + 0.5) / 3]])
  got = losses.win_probabilities(rewards)
  assert got.shape == (2, 3) and got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(losses.win_probabilities(rewards / 2.0, scale=2.0), want, rtol=1e-12)


def test_win_probabilities_ignore_a_reward_shift_and_average_one_half():
  rewards = np.random.default_rng(13).normal(0.0, 3.0, (4, 6))
  probs = losses.win_probabilities(rewards)
  shift_P1 = np.array([[-7.0], [0.5], [100.0], [3.0]])
  np.testing.assert_allclose(losses.win_probabilities(rewards + shift_P1), probs, atol=1e-12)
  np.testing.assert_allclose(losses.win_probabilities(rewards - 42.0), probs, atol=1e-12)
  np.testing.assert_allclose(probs.mean(axis=1), 0.5, atol=1e-12)
  # The best response of each prompt has the highest win probability.
  np.testing.assert_array_equal(probs.argmax(axis=1), rewards.argmax(axis=1))
  # Far-apart rewards stay finite and in [0, 1].
  extreme = losses.win_probabilities(np.array([[-1e6, 0.0, 1e6]]))
  np.testing.assert_allclose(extreme, [[0.5 / 3, 1.5 / 3, 2.5 / 3]], atol=1e-12)


@pytest.mark.parametrize("rewards,kwargs,error,pattern", [
    (np.zeros(3), {}, ValueError, r"\[P, N\] rewards with N >= 2, got shape \[3\]"),
    (np.zeros((2, 1)), {}, ValueError, r"N >= 2, got shape \[2, 1\]"),
    (np.array([[0.0, np.nan]]), {}, ValueError, "rewards must be finite"),
    (np.zeros((1, 2)), {"scale": 0.0}, ValueError, "scale must be a positive finite number"),
    (np.zeros((1, 2)), {"scale": "1"}, TypeError, "scale must be a Python real number"),
])
def test_win_probabilities_bad_input(rewards, kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    losses.win_probabilities(rewards, **kwargs)
