"""The train step: response log-probs against full-logit NumPy, the sharded DPO/SFT update,
gradient accumulation, overfitting, the non-finite guard, and the optimizer against PyTorch.

Compiles are the cost here, so one single-device DPO step (the `single` fixture) is shared by
every test that can use it; all step batches have the same shape. The pair batches have the
shared-prompt layout, so the steps run the prompt once per pair (logprobs.pair_logprobs); the
reference log-probs come from the plain path, which makes the log 2 test a cross-check of both.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import logprobs, models, sharding, train, train_state

CONFIG = models.tiny("llama")
NUM_PAIRS, BATCH = 7, 8   # 7 real pairs and 1 weight-0 padding pair
MAX_LENGTH, MAX_PROMPT, BUCKET = 24, 8, 8
OPT_CFG = train_state.OptimizerConfig(learning_rate=1e-3, total_steps=100, warmup_ratio=0.0)
LOSS_CFG = train.LossConfig("dpo", beta=0.1, bucket=BUCKET)


def _random_ids(rng, low, high, count):
  return [[int(t) for t in rng.integers(3, CONFIG.vocab_size, rng.integers(low, high))]
          for _ in range(count)]


def _pair_lists(seed, count=NUM_PAIRS, max_response=16):
  rng = np.random.default_rng(seed)
  # Some prompts are cut to MAX_PROMPT; prompts (8 columns) and responses (<= 16) fit in 24, so
  # the batch gets the shared-prompt layout.
  return (_random_ids(rng, 2, 12, count), _random_ids(rng, 1, max_response + 1, count),
          _random_ids(rng, 1, max_response + 1, count))


def _pair_batch(seed=0, max_response=16):
  return logprobs.make_pair_batch(*_pair_lists(seed, max_response=max_response),
                                  max_length=MAX_LENGTH,
                                  max_prompt_length=MAX_PROMPT, pad_id=0,
                                  batch_multiple=BATCH, length_bucket=BUCKET)


def _np_sequence_logprobs(logits_BxTxV, tokens_BxT, loss_mask_BxT):
  """Summed log-probs of the loss-masked tokens from full logits, in float64 NumPy."""
  logits = np.asarray(logits_BxTxV, np.float64)[:, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.asarray(tokens_BxT)[:, 1:, None], -1)[..., 0]
  mask = np.asarray(loss_mask_BxT)[:, 1:]
  return (picked * mask).sum(1), mask.sum(1)


# Jitted: Flax's eager init of the scanned layers costs more than one compile.
_init_params = jax.jit(models.init_params, static_argnums=0)


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])


def _as_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _first_moment_grads(state) -> list:
  """The gradients of a first AdamW step, read from its first moment mu = (1 - b1) * g."""
  mu = state.opt_state[1][0].mu  # chain(clip_by_global_norm, adamw): adamw's scale_by_adam.
  return [np.asarray(x) / (1 - OPT_CFG.b1) for x in jax.tree.leaves(mu)]


def _max_diff(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def params0():
  return _init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch(params0):
  """A pair batch whose reference log-probs are the initial policy's."""
  raw = _pair_batch()
  return logprobs.with_reference([raw], *logprobs.reference_logprobs(CONFIG, params0, [raw]))[0]


@pytest.fixture(scope="module")
def single(params0, batch):
  """The single-device step function, and (params, metrics) after one step from params0."""
  mesh = _mesh(1, 1, 1)
  optimizer = train_state.make_optimizer(OPT_CFG)
  step = train.make_train_step(CONFIG, optimizer, mesh, LOSS_CFG,
                               schedule=train_state.make_schedule(OPT_CFG))
  state = train_state.init_train_state(CONFIG, optimizer, mesh, params=params0)
  state, metrics = step(state, batch)
  return dict(step=step, optimizer=optimizer, mesh=mesh, params=_as_numpy(state.params),
              grads=_first_moment_grads(state), metrics=_as_numpy(metrics))


# --- batches ---------------------------------------------------------------------------------


def test_make_pair_batch_layout_and_truncation():
  prompts = [[5, 6, 7, 8, 9, 10], [11]]
  chosen = [[20, 21, 22, 23, 24, 25, 26], [30, 2]]
  rejected = [[40], [41, 42, 43]]
  kwargs = dict(max_length=16, max_prompt_length=4, pad_id=0, batch_multiple=4,
                length_bucket=4)
  b = logprobs.make_pair_batch(prompts, chosen, rejected, ref_chosen=[-1., -2.],
                               ref_rejected=[-3., -4.], **kwargs)
  # Prompts keep their last 4 tokens, left-padded to 4 columns; responses (<= 12 tokens) start
  # at column 4 and are padded to 8 columns: T = 12.
  assert b["chosen_tokens"].shape == (4, 12)
  np.testing.assert_array_equal(b["chosen_tokens"][0], [7, 8, 9, 10, 20, 21, 22, 23, 24, 25, 26, 0])
  np.testing.assert_array_equal(b["chosen_loss_mask"][0], [0] * 4 + [1] * 7 + [0])
  np.testing.assert_array_equal(b["rejected_tokens"][1, :7], [0, 0, 0, 11, 41, 42, 43])
  np.testing.assert_array_equal(b["rejected_mask"][1], [0, 0, 0] + [1] * 4 + [0] * 5)
  np.testing.assert_array_equal(b["rejected_loss_mask"][1], [0] * 4 + [1] * 3 + [0] * 5)
  np.testing.assert_array_equal(b["weights"], [1, 1, 0, 0])   # two weight-0 padding pairs
  np.testing.assert_array_equal(b["ref_chosen"], [-1, -2, 0, 0])
  assert b["chosen_loss_mask"][2:].sum(1).tolist() == [1, 1]  # padding pairs stay finite
  assert logprobs.shared_prompt_length(b, 4) == 4
  assert logprobs.shared_prompt_length(b, 8) is None
  # max_length 10: the response is cut to 10 - 4 = 6 tokens, and 4 + 8 columns would pass
  # max_length, so the rows are packed: [prompt | response | pad], T = 10.
  b = logprobs.make_pair_batch(prompts, chosen, rejected, **dict(kwargs, max_length=10))
  np.testing.assert_array_equal(b["chosen_tokens"][0], [7, 8, 9, 10, 20, 21, 22, 23, 24, 25])
  np.testing.assert_array_equal(b["rejected_tokens"][1, :4], [11, 41, 42, 43])
  np.testing.assert_array_equal(b["rejected_loss_mask"][1], [0, 1, 1, 1] + [0] * 6)
  assert logprobs.shared_prompt_length(b, 1) == 1   # only the first column is common


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[]]), "empty prompt"),
    (dict(chosen=[[]]), "empty response"),
    (dict(max_prompt_length=16), "max_prompt_length"),
    (dict(rejected=[[1], [2]]), "equally many"),
])
def test_make_pair_batch_errors(kwargs, message):
  args = dict(prompts=[[1]], chosen=[[2]], rejected=[[3]], max_length=16, max_prompt_length=8)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    logprobs.make_pair_batch(args["prompts"], args["chosen"], args["rejected"],
                             max_length=args["max_length"],
                             max_prompt_length=args["max_prompt_length"], pad_id=0)


def test_make_pair_batch_win_probabilities():
  args = ([[1], [2]], [[3], [4]], [[5], [6]])
  kwargs = dict(max_length=16, max_prompt_length=8, pad_id=0, batch_multiple=4)
  b = logprobs.make_pair_batch(*args, chosen_win_prob=[0.9, 0.6], rejected_win_prob=[0.1, 0.25],
                               **kwargs)
  # Padding pairs (weight 0) get 1/2, a target of 0 for the SPPO log-ratio.
  np.testing.assert_array_equal(b["chosen_win_prob"], np.float32([0.9, 0.6, 0.5, 0.5]))
  np.testing.assert_array_equal(b["rejected_win_prob"], np.float32([0.1, 0.25, 0.5, 0.5]))
  assert b["chosen_win_prob"].dtype == np.float32
  assert not set(logprobs.WIN_PROB_KEYS) & set(logprobs.make_pair_batch(*args, **kwargs))
  with pytest.raises(ValueError, match="both chosen_win_prob and rejected_win_prob"):
    logprobs.make_pair_batch(*args, chosen_win_prob=[0.9, 0.6], **kwargs)
  for bad in ([0.5], [0.5, 1.5], [0.5, np.nan]):
    with pytest.raises(ValueError, match=r"rejected_win_prob needs one value in \[0, 1\]"):
      logprobs.make_pair_batch(*args, chosen_win_prob=[0.9, 0.6], rejected_win_prob=bad,
                               **kwargs)


# --- log-probs -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sequence_logprobs_match_full_logits(family):
  config = models.tiny(family)
  params = _init_params(config, jax.random.key(1))
  # Larger output weights give logits of a few units, where Gemma's soft-cap (30) shows.
  head = "lm_head" if "lm_head" in params else "embedding"
  params = dict(params, **{head: params[head] * 40.0})
  b = _pair_batch(seed=3, max_response=11)   # T = 8 + 16, at most 11 targets a row
  prompt_length = logprobs.shared_prompt_length(b, BUCKET)
  width = logprobs.num_targets_bucket(b["chosen_loss_mask"], 4)
  assert prompt_length == MAX_PROMPT and width < MAX_LENGTH - MAX_PROMPT
  tokens = np.concatenate([b["chosen_tokens"], b["rejected_tokens"]])
  mask = np.concatenate([b["chosen_mask"], b["rejected_mask"]])
  loss_mask = np.concatenate([b["chosen_loss_mask"], b["rejected_loss_mask"]])

  @jax.jit
  def ours_and_logits(params):
    # The fused kernel here; "auto" (the plain head for a CPU-sized vocabulary) below.
    gathered = logprobs.sequence_logprobs(config, params, tokens, mask, loss_mask,
                                          num_targets=width, impl="chunked")
    # The shared-prompt path: the prompt columns run once per pair through the KV cache.
    shared = logprobs.pair_logprobs(config, params, b, num_targets=width,
                                    prompt_length=prompt_length)
    hidden = models.forward_hidden(config, params, tokens, mask)
    return gathered, shared, hidden, models.logits_from_hidden(config, params, hidden)

  (gathered, lengths), shared, hidden, logits = ours_and_logits(params)
  expected, expected_lengths = _np_sequence_logprobs(logits, tokens, loss_mask)
  shared_logps = np.concatenate([shared[0], shared[1]])
  print(f"{family}: max |diff| gathered {np.abs(gathered - expected).max():.2e} "
        f"shared prompt {np.abs(shared_logps - expected).max():.2e}")
  np.testing.assert_allclose(gathered, expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(shared_logps, expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(lengths, expected_lengths)
  np.testing.assert_array_equal(np.concatenate([shared[2], shared[3]]), expected_lengths)
  if config.final_logit_softcap:
    uncapped = np.einsum("btd,dv->btv", hidden, models.output_projection(config, params))
    assert np.abs(_np_sequence_logprobs(uncapped, tokens, loss_mask)[0] - expected).max() > 1e-2


# --- the update ------------------------------------------------------------------------------


def test_dpo_first_step_with_policy_as_reference_is_log2(single):
  metrics = single["metrics"]
  assert abs(metrics["loss"] - math.log(2.0)) < 1e-6
  assert abs(metrics["margin"]) < 1e-5 and metrics["finite"]
  assert metrics["learning_rate"] == pytest.approx(OPT_CFG.learning_rate)
  assert metrics["grad_norm"] > 0


# (8, 1, 1) runs the plain path (a bucket too large to share the 8 prompt columns), the others
# the shared-prompt path of the single-device step.
@pytest.mark.parametrize("shape, bucket", [((8, 1, 1), 64), ((2, 4, 1), BUCKET),
                                           ((2, 2, 2), BUCKET)])
def test_sharded_update_equals_single_device(shape, bucket, params0, batch, single):
  mesh = _mesh(*shape)
  optimizer = single["optimizer"]
  step = train.make_train_step(CONFIG, optimizer, mesh, dataclasses.replace(LOSS_CFG,
                                                                             bucket=bucket))
  state = train_state.init_train_state(CONFIG, optimizer, mesh, params=params0)
  assert jax.tree.leaves(state.opt_state)[1].sharding == jax.tree.leaves(state.params)[0].sharding
  state, metrics = step(state, batch)
  # Sharding may only change the summation order: the gradients agree to float32 rounding.
  grads = _first_moment_grads(state)
  for g, g_single in zip(grads, single["grads"]):
    np.testing.assert_allclose(g, g_single, rtol=1e-4, atol=1e-6 * np.abs(g_single).max())
  # A first Adam step moves a weight by lr * g / (|g| + eps), eps = 1e-8. Where |g| is within a
  # few eps that ratio turns a rounding-level change of g into up to ~1 % of lr, so the weights
  # are compared where the step is well conditioned (|g| >= 1e-6); there they agree to ~1e-8.
  diff = max(float(np.abs(np.asarray(p) - q)[np.abs(g) >= 1e-6].max(initial=0.0))
             for p, q, g in zip(jax.tree.leaves(state.params), jax.tree.leaves(single["params"]),
                             grads))
  print(f"mesh {shape}: max |param diff| where |g| >= 1e-6 = {diff:.2e}")
  assert diff <= 1e-6
  assert abs(float(metrics["loss"]) - single["metrics"]["loss"]) <= 1e-6
  assert int(state.step) == 1


def test_accumulation_equals_one_big_batch(params0, batch, single):
  # 4 micro-batches of 2 pairs (one of them half padding) against one step on all 8.
  loss_cfg = dataclasses.replace(LOSS_CFG, accum_steps=4)
  step = train.make_train_step(CONFIG, single["optimizer"], single["mesh"], loss_cfg)
  state = train_state.init_train_state(CONFIG, single["optimizer"], single["mesh"],
                                       params=params0)
  state, metrics = step(state, batch)
  diff = _max_diff(state.params, single["params"])
  print(f"accumulation: max |param diff| = {diff:.2e}")
  assert diff <= 1e-5
  for key in ("loss", "grad_norm", "chosen_logps", "rejected_logps", "tokens"):
    assert float(metrics[key]) == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-6)


def test_overfits_a_handful_of_pairs(params0, batch, single):
  state = train_state.init_train_state(CONFIG, single["optimizer"], single["mesh"],
                                       params=params0)
  history = []
  for _ in range(30):
    state, metrics = single["step"](state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  print("loss", [round(h["loss"], 3) for h in history[::5]])
  assert history[-1]["accuracy"] == 1.0
  assert history[-1]["loss"] < 0.1 < history[0]["loss"]
  # The policy moved away from the reference: chosen up, rejected down (summed log-probs).
  assert history[-1]["chosen_logps"] > history[0]["chosen_logps"]
  assert history[-1]["rejected_logps"] < history[0]["rejected_logps"]


def test_non_finite_loss_keeps_the_last_good_state(params0, batch, single):
  state = train_state.init_train_state(CONFIG, single["optimizer"], single["mesh"],
                                       params=params0)
  state, metrics = single["step"](state, batch)
  train.check_finite(metrics, 0)
  good = _as_numpy(state)
  bad = dict(batch, ref_chosen=np.where(np.arange(BATCH) == 2, np.nan, batch["ref_chosen"]))
  state, metrics = single["step"](state, bad)
  assert not bool(metrics["finite"])
  with pytest.raises(FloatingPointError, match="step 1"):
    train.check_finite(metrics, 1)
  assert _max_diff(state, good) == 0.0 and int(state.step) == 1
  state, metrics = single["step"](state, batch)   # the run could go on from it
  assert bool(metrics["finite"]) and int(state.step) == 2


def test_sft_step_matches_nll_and_reduces_it(params0):
  prompts, chosen, _ = _pair_lists(seed=5, count=3)
  b = logprobs.make_sft_batch(prompts, chosen, max_length=MAX_LENGTH,
                              max_prompt_length=MAX_PROMPT, pad_id=0, batch_multiple=4,
                              length_bucket=BUCKET)
  logits = jax.jit(models.forward, static_argnums=0)(CONFIG, params0, b["tokens"], b["mask"])
  summed, counts = _np_sequence_logprobs(logits, b["tokens"], b["loss_mask"])
  expected_nll = -summed.sum() / counts.sum()
  mesh = _mesh(2, 2, 1)
  optimizer = train_state.make_optimizer(OPT_CFG)
  step = train.make_train_step(CONFIG, optimizer, mesh, {"objective": "sft"})
  state = train_state.init_train_state(CONFIG, optimizer, mesh, params=params0)
  losses = []
  for _ in range(5):
    state, metrics = step(state, b)
    losses.append(float(metrics["loss"]))
  print("sft nll", losses)
  assert losses[0] == pytest.approx(expected_nll, rel=1e-5)
  assert float(metrics["target_tokens"]) == counts.sum()
  assert losses[-1] < losses[0] - 0.5


def test_step_rejects_bad_batches(single, batch):
  with pytest.raises(ValueError, match="lacks"):
    single["step"](None, {k: v for k, v in batch.items() if k != "chosen_mask"})
  mesh = _mesh(8, 1, 1)
  step = train.make_train_step(CONFIG, single["optimizer"], mesh, LOSS_CFG)
  with pytest.raises(ValueError, match="multiple"):
    step(None, {k: v[:4] for k, v in batch.items()})
  with pytest.raises(ValueError, match="objective"):
    train.LossConfig("no_such_loss")


def test_soft_sppo_step_regresses_log_ratios_on_the_batch_win_probabilities(params0, batch):
  """The sppo step (2 accumulated micro-batches) against SPPO's square loss written out here on
  the plain-path log-probs, with the batch's win probabilities: same loss and clipped gradient.
  The policy is its own reference, so the log-ratios are 0 and every pair has a gradient."""
  rng = np.random.default_rng(3)
  real = np.arange(BATCH) < NUM_PAIRS
  win = {key: np.where(real, rng.uniform(size=BATCH), 0.5).astype(np.float32)
         for key in logprobs.WIN_PROB_KEYS}
  beta = 0.5
  loss_cfg = train.LossConfig("sppo", beta=beta, accum_steps=2, bucket=BUCKET)
  mesh, optimizer = _mesh(1, 1, 1), train_state.make_optimizer(OPT_CFG)
  step = train.make_train_step(CONFIG, optimizer, mesh, loss_cfg)
  state = train_state.init_train_state(CONFIG, optimizer, mesh, params=params0)
  with pytest.raises(ValueError, match="sppo.*chosen_win_prob and rejected_win_prob"):
    step(state, batch)   # fails while tracing: the state is not donated
  state, metrics = step(state, dict(batch, **win))

  w = batch["weights"]
  def by_hand(params):
    logps = {side: logprobs.sequence_logprobs(CONFIG, params, batch[f"{side}_tokens"],
                                              batch[f"{side}_mask"],
                                              batch[f"{side}_loss_mask"])[0]
             for side in ("chosen", "rejected")}
    per_pair = sum((logps[side] - batch[f"ref_{side}"] - (win[f"{side}_win_prob"] - 0.5) / beta)
                   ** 2 for side in ("chosen", "rejected"))
    return jnp.sum(w * per_pair) / jnp.sum(w)
  loss, grads = jax.jit(jax.value_and_grad(by_hand))(params0)
  norm = math.sqrt(sum(float(jnp.sum(g.astype(jnp.float32) ** 2)) for g in jax.tree.leaves(grads)))
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
  assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-4)
  assert float(metrics["chosen_win_prob"]) == pytest.approx(win["chosen_win_prob"][real].mean())
  clip = min(1.0, OPT_CFG.max_grad_norm / norm)
  for got, want in zip(_first_moment_grads(state), jax.tree.leaves(grads)):
    want = np.asarray(want) * clip
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())


# --- optimizer -------------------------------------------------------------------------------


def test_schedule_is_linear_warmup_then_cosine():
  cfg = train_state.OptimizerConfig(learning_rate=2.0, total_steps=20, warmup_ratio=0.25,
                                    end_learning_rate=0.5)
  schedule = train_state.make_schedule(cfg)
  for step in range(25):
    if step < 5:
      expected = 2.0 * step / 5
    else:
      progress = min(step - 5, 15) / 15
      expected = 0.5 + 0.5 * (2.0 - 0.5) * (1 + math.cos(math.pi * progress))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_linear_schedule_is_warmup_then_linear_decay_to_zero():
  """HF's get_linear_schedule_with_warmup (the SPPO authors' `linear`), values by hand: 4 of 20
  steps warm up to 2.0, then 2.0 · (20 − step) / 16 down to 0, and 0 after the end."""
  cfg = train_state.OptimizerConfig(learning_rate=2.0, total_steps=20, warmup_ratio=0.2,
                                    schedule="linear")
  schedule = train_state.make_schedule(cfg)
  want = [0.0, 0.5, 1.0, 1.5, 2.0, 1.875, 1.75, 1.625, 1.5, 1.375, 1.25, 1.125, 1.0, 0.875,
          0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0, 0.0]
  np.testing.assert_allclose([float(schedule(i)) for i in range(23)], want, atol=1e-6)
  no_warmup = train_state.make_schedule(dataclasses.replace(cfg, warmup_ratio=0.0))
  np.testing.assert_allclose([float(no_warmup(i)) for i in (0, 5, 10, 20, 25)],
                             [2.0, 1.5, 1.0, 0.0, 0.0], atol=1e-6)
  assert train_state.OptimizerConfig().schedule == "cosine"
  with pytest.raises(ValueError, match="schedule must be one of"):
    train_state.OptimizerConfig(schedule="step")


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_optimizer_matches_pytorch(name):
  """Clipping, weight decay, warm-up and the update rule against torch.optim, both in float64
  (in float32, optax's bias correction 1 - 0.999^t alone is off by ~1e-5 relative)."""
  torch = pytest.importorskip("torch")
  cfg = train_state.OptimizerConfig(name=name, learning_rate=0.1, total_steps=10,
                                    warmup_ratio=0.2, weight_decay=0.1, max_grad_norm=1.0)
  rng = np.random.default_rng(0)
  params = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
  grads = [{k: rng.normal(size=v.shape) * 2 for k, v in params.items()} for _ in range(4)]
  theirs = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  torch_cls = torch.optim.AdamW if name == "adamw" else torch.optim.RMSprop
  torch_opt = torch_cls(theirs.values(), lr=0.1, weight_decay=0.1)
  with jax.enable_x64(True):
    optimizer, schedule = train_state.make_optimizer(cfg), train_state.make_schedule(cfg)
    ours = jax.tree.map(jnp.asarray, params)
    state = optimizer.init(ours)
    for i, g in enumerate(grads):
      updates, state = optimizer.update(jax.tree.map(jnp.asarray, g), state, ours)
      ours = jax.tree.map(lambda p, u: p + u, ours, updates)
      # Global-norm clipping by its definition (torch's clip_grad_norm_ adds 1e-6 to the norm).
      norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
      for k, v in theirs.items():
        v.grad = torch.tensor(g[k] * min(1.0, 1.0 / norm))
      for group in torch_opt.param_groups:  # the rate optax evaluates at its int32 step count
        group["lr"] = float(schedule(jnp.asarray(i, jnp.int32)))
      torch_opt.step()
    assert ours["a"].dtype == jnp.float64
  assert min(math.sqrt(sum(float((x ** 2).sum()) for x in g.values())) for g in grads) > 1.0
  for k in params:
    np.testing.assert_allclose(np.asarray(ours[k]), theirs[k].detach().numpy(), atol=1e-12)


def test_cpu_roof_is_the_best_timed_matmul_and_feeds_mfu(monkeypatch):
  # A fake clock: the three timed products take 0.5, 0.25 and 0.75 s, so the roof is the
  # 2·N³ FLOPs of one product over the best, 0.25 s.
  ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 2.75])
  monkeypatch.setattr(train, "time", type("Clock", (), {"perf_counter": lambda: next(ticks)}))
  roof = train.cpu_peak_flops.__wrapped__(repeats=3)
  assert roof == 2.0 * train.CPU_ROOF_SIZE**3 / 0.25
  monkeypatch.setattr(train, "cpu_peak_flops", lambda: roof)
  assert train.peak_flops(jax.devices("cpu")) == roof
  # 3 x forward FLOPs of 10 tokens at 24 context, in 2 s, over the roof.
  figures = train.throughput(CONFIG, 10, 24, 2.0, train.peak_flops())
  assert figures["mfu"] == pytest.approx(3 * CONFIG.flops_per_token(24) * 10 / 2.0 / roof)
