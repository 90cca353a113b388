"""The online learner: RLOO advantages against a NumPy loop, the policy gradient on a categorical
bandit against its closed form (and its Monte Carlo mean against the exact gradient of the
expected reward), rollout log-probs against full-logit NumPy, and the sharded RLOO step against
one device.

Compiles are the cost: every model test uses one rollout batch shape (3 prompts x 2 samples,
padded to 8 rows), and the bandit tests run without a model.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import models, online, sampling, sharding, train_state

CONFIG = models.tiny("llama")
PROMPTS, K, PROMPT_COLS, RESPONSE_LEN, ROWS = 3, 2, 6, 8, 8
EOS, PAD = 2, 0
OPT_CFG = train_state.OptimizerConfig(learning_rate=1e-3, total_steps=100, warmup_ratio=0.0)


def _np_rloo(rewards_PxK):
  """A_i = r_i − mean_{j≠i} r_j, one element at a time in float64."""
  r = np.asarray(rewards_PxK, np.float64)
  out = np.zeros_like(r)
  for p in range(r.shape[0]):
    for i in range(r.shape[1]):
      others = [r[p, j] for j in range(r.shape[1]) if j != i]
      out[p, i] = r[p, i] - sum(others) / len(others)
  return out


@pytest.mark.parametrize("k", [2, 3, 5])
def test_advantages_against_numpy_loop_and_identity(k):
  rng = np.random.default_rng(k)
  rewards = rng.normal(size=(4, k)).astype(np.float32)
  expected = _np_rloo(rewards)
  for x in (rewards, jnp.asarray(rewards)):
    adv = online.rloo_advantages(x)
    assert isinstance(adv, jax.Array) == isinstance(x, jax.Array)
    np.testing.assert_allclose(np.asarray(adv), expected, atol=1e-6)
  mean = rewards.mean(axis=1, keepdims=True, dtype=np.float64)
  np.testing.assert_allclose(online.rloo_advantages(rewards), k / (k - 1) * (rewards - mean),
                             atol=1e-6)
  np.testing.assert_allclose(online.rloo_advantages(rewards).sum(axis=1), 0.0, atol=1e-6)
  # A constant per group (a reward offset, or a KL shared by the group) changes nothing.
  shift = rng.normal(size=(4, 1)).astype(np.float32) * 10
  np.testing.assert_allclose(online.rloo_advantages(rewards + shift), expected, atol=1e-5)
  kl_const = np.broadcast_to(shift, rewards.shape)
  np.testing.assert_allclose(online.rloo_advantages(rewards, kl_const, beta=0.3), expected,
                             atol=1e-5)
  # A varying KL enters as R = r − beta · kl.
  kl = rng.normal(size=rewards.shape).astype(np.float32)
  np.testing.assert_allclose(online.rloo_advantages(rewards, kl, beta=0.5),
                             _np_rloo(rewards - 0.5 * kl), atol=1e-5)


def test_advantages_carry_no_gradient():
  rewards, kl = jnp.array([[1.0, 0.0, 2.0]]), jnp.array([[0.5, 0.1, -0.2]])
  grads = jax.grad(lambda r, kl: jnp.sum(online.rloo_advantages(r, kl, beta=0.1) ** 2),
                   argnums=(0, 1))(rewards, kl)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("rewards, kwargs, match", [
    (np.ones((3, 1)), {}, ">= 2 samples"),
    (np.ones(4), {}, r"\[prompts, samples\]"),
    (np.ones((2, 2, 2)), {}, r"\[prompts, samples\]"),
    (np.ones((2, 2)), {"beta": 0.1}, "needs kl"),
    (np.ones((2, 2)), {"kl_PxK": np.ones((2, 3))}, "differ in shape"),
    (np.ones((2, 2)), {"kl_PxK": np.ones((2, 2)), "beta": -1.0}, "beta"),
])
def test_advantages_refuse_bad_input(rewards, kwargs, match):
  with pytest.raises(ValueError, match=match):
    online.rloo_advantages(rewards, **kwargs)


# --- the categorical bandit: π = softmax θ over A actions, reward r_a per action -------------

ACTION_REWARDS = np.array([1.0, 0.2, 0.5, 0.0, 0.8])
THETA = np.array([0.3, -0.5, 0.1, 0.7, -0.2])


def _np_softmax(theta):
  e = np.exp(theta - theta.max())
  return e / e.sum()


def _bandit_grad(actions_PxK, advantages_PxK, *, old_logps_PxK=None, clip_eps=None):
  """−∇θ of online.policy_gradient_loss with log π(a) = log_softmax(θ)[a]."""
  def loss(theta):
    logps = jax.nn.log_softmax(theta)[actions_PxK.reshape(-1)]
    old = None if old_logps_PxK is None else jnp.asarray(old_logps_PxK).reshape(-1)
    return online.policy_gradient_loss(logps, jnp.asarray(advantages_PxK).reshape(-1), old,
                                       clip_eps=clip_eps)[0]
  return -np.asarray(jax.grad(loss)(jnp.asarray(THETA, jnp.float32)), np.float64)


def _sample_bandit(rng, groups, k):
  actions = rng.choice(len(THETA), size=(groups, k), p=_np_softmax(THETA))
  return actions, ACTION_REWARDS[actions]


def test_bandit_gradient_equals_closed_form():
  actions, rewards = _sample_bandit(np.random.default_rng(0), 3, 4)
  adv = online.rloo_advantages(rewards.astype(np.float32))
  score = np.eye(len(THETA))[actions] - _np_softmax(THETA)   # ∇ log π(a) = e_a − π
  expected = (adv[..., None] * score).sum(axis=(0, 1)) / actions.size
  np.testing.assert_allclose(_bandit_grad(actions, adv), expected, atol=1e-6)


def test_bandit_monte_carlo_mean_approaches_expected_reward_gradient():
  # The RLOO estimator is unbiased for ∇ Σ_a π_a r_a = π ⊙ (r − π·r): the baseline of sample i
  # is independent of a_i and E[∇ log π(a_i)] = 0. Over G independent groups its error per
  # component is ~ N(0, σ²/G), σ² the variance of one group's contribution, estimated below;
  # 4 standard errors bound it (two-sided 6e-5 per component; the seed is fixed anyway).
  groups, k = 40_000, 4
  actions, rewards = _sample_bandit(np.random.default_rng(1), groups, k)
  adv = online.rloo_advantages(rewards.astype(np.float32))
  estimate = _bandit_grad(actions, adv)
  pi = _np_softmax(THETA)
  exact = pi * (ACTION_REWARDS - pi @ ACTION_REWARDS)
  per_group = (adv[..., None] * (np.eye(len(THETA))[actions] - pi)).mean(axis=1)
  stderr = per_group.std(axis=0, ddof=1) / np.sqrt(groups)
  print("exact", exact.round(4), "estimate", estimate.round(4), "stderr", stderr.round(5))
  assert stderr.max() < 0.05 * np.abs(exact).max()   # the check is sharp enough to mean much
  assert (np.abs(estimate - exact) <= 4 * stderr).all()


def test_k2_is_the_pairwise_difference():
  # k = 2: A_1 = r_1 − r_2 = −A_2, so the loss's gradient per group is
  # −½ (r_1 − r_2)(∇log π(y_1) − ∇log π(y_2)), averaged over the groups.
  actions, rewards = _sample_bandit(np.random.default_rng(2), 6, 2)
  rewards = rewards + np.random.default_rng(3).normal(size=rewards.shape)  # ties are rare
  score = np.eye(len(THETA))[actions] - _np_softmax(THETA)
  pairwise = -0.5 * (rewards[:, 0] - rewards[:, 1])[:, None] * (score[:, 0] - score[:, 1])
  grad_loss = -_bandit_grad(actions, online.rloo_advantages(rewards.astype(np.float32)))
  np.testing.assert_allclose(grad_loss, pairwise.mean(axis=0), atol=1e-6)


def test_clipped_objective_against_numpy():
  # Old log-probs away from the current ones: rows whose ratio left [1 − ε, 1 + ε] in the
  # direction their advantage pushes contribute no gradient; the rest ρ·A·∇log π.
  rng = np.random.default_rng(4)
  actions, rewards = _sample_bandit(rng, 8, 4)
  adv = online.rloo_advantages(rewards.astype(np.float32))
  pi = _np_softmax(THETA)
  logps = np.log(pi)[actions]
  old = logps + rng.uniform(-0.5, 0.5, size=logps.shape)
  eps = 0.2
  ratio = np.exp(logps - old)
  active = ~(((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps)))
  assert 0 < active.sum() < active.size
  score = np.eye(len(THETA))[actions] - pi
  expected = ((active * ratio * adv)[..., None] * score).sum(axis=(0, 1)) / actions.size
  np.testing.assert_allclose(_bandit_grad(actions, adv, old_logps_PxK=old.astype(np.float32),
                                          clip_eps=eps), expected, atol=1e-6)


# --- the model: rollout rows, sequence log-probs, the update ---------------------------------

# Jitted: Flax's eager init of the scanned layers costs more than one compile.
_init_params = jax.jit(models.init_params, static_argnums=0)
_forward = jax.jit(models.forward, static_argnums=0)


@pytest.fixture(scope="module")
def params0():
  return _init_params(CONFIG, jax.random.key(0))


def _rollout_arrays(seed=0):
  """Prompts padded on either side; responses that end in EOS (or run to T) with random
  tokens after the EOS; one group with equal rewards."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(3, CONFIG.vocab_size, (PROMPTS, PROMPT_COLS))
  mask = np.zeros((PROMPTS, PROMPT_COLS), np.int32)
  mask[0, 2:] = 1            # left-padded
  mask[1, :4] = 1            # right-padded
  mask[2, :] = 1
  responses = rng.integers(3, CONFIG.vocab_size, (PROMPTS, K, RESPONSE_LEN))
  lengths = np.array([[3, RESPONSE_LEN], [1, 5], [7, 2]])   # one cut off at T (no EOS)
  for p in range(PROMPTS):
    for k in range(K):
      if lengths[p, k] < RESPONSE_LEN:
        responses[p, k, lengths[p, k] - 1] = EOS
  rewards = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.9]])
  kl = rng.uniform(0, 1, (PROMPTS, K))
  return prompts, mask, responses, lengths, rewards, kl


def _np_rollout_logprobs(params, prompts, mask, responses, lengths):
  """Σ log softmax over each response up to its length, rows packed [prompt | response | pad]
  (a layout unlike online's), from full float32 logits in float64 NumPy."""
  seqs = [(list(prompts[p][mask[p] > 0]), list(responses[p, k, :lengths[p, k]]))
          for p in range(PROMPTS) for k in range(K)]
  width = max(len(a) + len(b) for a, b in seqs)
  tokens = np.full((len(seqs), width), PAD, np.int32)
  attn = np.zeros_like(tokens)
  for i, (a, b) in enumerate(seqs):
    tokens[i, :len(a) + len(b)], attn[i, :len(a) + len(b)] = a + b, 1
  logits = np.asarray(_forward(CONFIG, params, tokens, attn), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return np.array([sum(logp[i, len(a) - 1 + j, b[j]] for j in range(len(b)))
                   for i, (a, b) in enumerate(seqs)])


@pytest.fixture(scope="module")
def rollout(params0):
  prompts, mask, responses, lengths, rewards, kl = _rollout_arrays()
  batch = online.make_rollout_batch(prompts, mask, responses, lengths, batch_multiple=ROWS)
  old = online.rollout_logprobs(CONFIG, params0, batch)
  batch = online.with_advantages(batch, rewards, kl_PxK=kl, beta=0.1)
  return {"batch": batch, "old": old, "rewards": rewards, "kl": kl,
          "expected_logps": _np_rollout_logprobs(params0, prompts, mask, responses, lengths)}


def test_rollout_batch_layout(rollout):
  batch = rollout["batch"]
  assert batch["prompt_tokens"].shape == (ROWS, PROMPT_COLS)
  np.testing.assert_array_equal(batch["weights"], [1] * 6 + [0] * 2)
  np.testing.assert_array_equal(batch["prompt_mask"][:, -1], 1)   # left-aligned prompts
  np.testing.assert_array_equal(batch["no_signal"], [0, 0, 1, 1, 0, 0, 0, 0])
  expected = online.rloo_advantages(rollout["rewards"], rollout["kl"], beta=0.1)
  np.testing.assert_allclose(batch["advantages"][:6], expected.reshape(-1), atol=1e-6)
  np.testing.assert_array_equal(batch["advantages"][6:], 0)


def test_sequence_logprobs_stop_at_eos(params0, rollout):
  # Up to and including the EOS (or T when cut off), against full logits in another layout.
  np.testing.assert_allclose(rollout["old"][:6], rollout["expected_logps"], atol=1e-4)
  # Tokens after the EOS change nothing (same shapes: no new compile).
  batch = dict(rollout["batch"])
  noise = np.random.default_rng(9).integers(3, CONFIG.vocab_size, batch["response_tokens"].shape)
  after_eos = np.arange(RESPONSE_LEN)[None] >= batch["response_lengths"][:, None]
  batch["response_tokens"] = np.where(after_eos, noise, batch["response_tokens"])
  assert after_eos.any()
  np.testing.assert_array_equal(online.rollout_logprobs(CONFIG, params0, batch), rollout["old"])


def test_sampler_logprobs_match_the_rollout_forward(params0):
  # The online loop's first π_old is the sampler's own log-probs (temperature 1, no truncation):
  # on its output, laid out by make_rollout_batch, the trainer's forward must agree with them.
  # Eight EOS ids make early stops likely (~3 % a token), so EOS masking is on this path too.
  prompts, mask, *_ = _rollout_arrays(seed=5)
  out = sampling.sample(CONFIG, params0, prompts, mask, rng=jax.random.key(3), num_samples=K,
                        max_new_tokens=RESPONSE_LEN, eos_ids=tuple(range(3, 11)))
  batch = online.make_rollout_batch(prompts, mask, out.tokens, out.lengths, batch_multiple=ROWS)
  trainer = online.rollout_logprobs(CONFIG, params0, batch)[:PROMPTS * K]
  sampler = np.asarray(out.logprobs).sum(-1).reshape(-1)
  print("finished", np.asarray(out.finished).reshape(-1), "max |gap|",
        np.abs(trainer - sampler).max())
  np.testing.assert_allclose(trainer, sampler, atol=1e-4)


def test_reference_in_the_compute_dtype_gives_the_same_logprobs(params0, rollout):
  # The online loop holds θ_0 as models.inference_params (bfloat16 where the model computes in
  # it): its forward reads every weight at that width anyway, so the log-probs are unchanged.
  config = dataclasses.replace(CONFIG, dtype="bfloat16")
  cast = models.inference_params(config, params0)
  assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype("bfloat16"), jnp.dtype("float32")}
  np.testing.assert_array_equal(online.rollout_logprobs(config, cast, rollout["batch"]),
                                online.rollout_logprobs(config, params0, rollout["batch"]))


@jax.jit
def _loss_grads(params, batch, old):
  """Gradients of plain REINFORCE, of the clipped objective on-policy (old = None: ρ = 1
  exactly), and of the clipped objective with old = the trainer's separate forward; one
  compile."""
  grad = lambda **kw: jax.grad(lambda p: online.rloo_loss(
      p, batch, config=CONFIG, advantages=batch["advantages"], **kw)[0])(params)
  return grad(), grad(clip_eps=0.2), grad(old_logprobs=old, clip_eps=0.2)


def test_one_clipped_update_equals_reinforce(params0, rollout):
  # At the sampled params the ratio is 1, inside the clip range, so the clipped objective's
  # gradient is ρ·A·∇log π = REINFORCE's.
  plain, on_policy, from_old = _loss_grads(params0, rollout["batch"], rollout["old"])
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain))
  assert scale > 0
  for g, h in zip(jax.tree.leaves(plain), jax.tree.leaves(on_policy)):
    np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-7 * scale)
  # Old log-probs from another compiled forward differ by float32 rounding of sums of ~40 nats
  # (|log ρ| up to ~1e-5), which scales each row's term by 1 + log ρ; summed over rows that
  # cancel, the gradients agree to ~1e-5 of their scale.
  for g, h in zip(jax.tree.leaves(plain), jax.tree.leaves(from_old)):
    np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-5 * scale)


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])


def _first_moment_grads(state) -> list:
  """The gradients of a first AdamW step, read from its first moment mu = (1 − b1) · g."""
  mu = state.opt_state[1][0].mu  # chain(clip_by_global_norm, adamw): adamw's scale_by_adam.
  return [np.asarray(x) / (1 - OPT_CFG.b1) for x in jax.tree.leaves(mu)]


@pytest.fixture(scope="module")
def single(params0, rollout):
  optimizer = train_state.make_optimizer(OPT_CFG)
  mesh = _mesh(1, 1, 1)
  step = online.make_rloo_step(CONFIG, optimizer, mesh, bucket=8)
  state = train_state.init_train_state(CONFIG, optimizer, mesh, params=params0)
  state, metrics = step(state, rollout["batch"])
  return {"optimizer": optimizer, "params": jax.tree.map(np.asarray, state.params),
          "grads": _first_moment_grads(state), "state": state,
          "metrics": {k: float(v) for k, v in metrics.items()}}


def test_step_metrics_and_direction(params0, rollout, single):
  m, batch = single["metrics"], rollout["batch"]
  real = batch["weights"] > 0
  assert m["finite"] == 1.0
  assert m["no_signal"] == pytest.approx(1 / 3)
  assert m["adv_abs"] == pytest.approx(np.abs(batch["advantages"][real]).mean(), rel=1e-5)
  assert m["kl"] == pytest.approx(rollout["kl"].mean(), rel=1e-5)
  assert m["ratio"] == pytest.approx(1.0) and m["clipped"] == 0.0
  logps, lengths = rollout["expected_logps"], batch["response_lengths"][real]
  assert m["entropy"] == pytest.approx(-logps.sum() / lengths.sum(), rel=1e-4)
  assert m["loss"] == pytest.approx(-(batch["advantages"][real] * logps).mean(), abs=1e-4)
  # The step raised the log-probs of the better-than-their-group samples against the others.
  moved = online.rollout_logprobs(CONFIG, single["state"].params, batch)[real] - logps
  adv = batch["advantages"][real]
  assert moved[adv > 0].mean() > moved[adv < 0].mean()


# (2, 2, 2) also accumulates: 2 strided micro-batches of 4 rows, real rows and padding split
# unevenly, normalised by the whole batch's totals.
@pytest.mark.parametrize("shape, accum_steps", [((8, 1, 1), 1), ((2, 2, 2), 2)])
def test_sharded_step_equals_single_device(shape, accum_steps, params0, rollout, single):
  mesh = _mesh(*shape)
  step = online.make_rloo_step(CONFIG, single["optimizer"], mesh, accum_steps=accum_steps,
                               bucket=8)
  state = train_state.init_train_state(CONFIG, single["optimizer"], mesh, params=params0)
  state, metrics = step(state, rollout["batch"])
  # Sharding may only change the summation order: the gradients agree to float32 rounding.
  grads = _first_moment_grads(state)
  for g, g_single in zip(grads, single["grads"]):
    np.testing.assert_allclose(g, g_single, rtol=1e-4, atol=1e-6 * np.abs(g_single).max())
  # A first Adam step moves a weight by lr · g / (|g| + eps), eps = 1e-8: where |g| is within a
  # few eps a rounding-level change of g moves it by up to ~1 % of lr, so the weights are
  # compared where the step is well conditioned (|g| >= 1e-6).
  diff = max(float(np.abs(np.asarray(p) - q)[np.abs(g) >= 1e-6].max(initial=0.0))
             for p, q, g in zip(jax.tree.leaves(state.params),
                                jax.tree.leaves(single["params"]), grads))
  print(f"mesh {shape}, accum {accum_steps}: max |param diff| where |g| >= 1e-6 = {diff:.2e}")
  assert diff <= 1e-6
  for key in ("loss", "adv_abs", "no_signal", "kl", "entropy", "response_length", "tokens",
              "grad_norm"):
    assert float(metrics[key]) == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-6)


def test_step_refuses_bad_batches(rollout, single):
  step = online.make_rloo_step(CONFIG, single["optimizer"], _mesh(8, 1, 1), bucket=8)
  batch = dict(rollout["batch"])
  with pytest.raises(ValueError, match="lacks"):
    step(single["state"], {k: v for k, v in batch.items() if k != "advantages"})
  with pytest.raises(ValueError, match="multiple"):
    step(single["state"], {k: v[:6] for k, v in batch.items()})
  with pytest.raises(ValueError, match="clip_eps"):
    online.make_rloo_step(CONFIG, single["optimizer"], _mesh(1, 1, 1), clip_eps=1.5)
