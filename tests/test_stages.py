"""eva_jax.stages: best_worst_pairs on hand-written rewards (chosen = argmax, rejected = argmin,
ties give no pair, the optional floor on the chosen reward); generate against the per-chunk
sampling loop; create and mix as plain functions."""
import math
import types

import jax
import numpy as np
import pytest

from eva_jax import continuous, creator, models, sampling, stages, synthetic
from eva_jax.buffer import PromptBuffer
from eva_jax.models import tokenizer as tk

PROMPTS = ["a", "b", "c", "d"]
# 4 prompts x 3 samples; response n of prompt p is the token list [10 * p + n, 99].
REWARDS = np.array([[0.2, 1.0, 0.5],   # best 1, worst 0
                    [0.7, 0.7, 0.7],   # all tie: no pair
                    [0.4, 0.1, 0.6],   # best 2 (0.6 < 1), worst 1
                    [0.0, 1.0, 0.0]],  # best 1, worst 0 (the first of the tied minima)
                   np.float32)
GEN = {"tokens": np.array([[[10 * p + n, 99, 0] for n in range(3)] for p in range(4)]),
       "lengths": np.full((4, 3), 2)}


def test_best_worst_pairs_by_hand():
  pairs = stages.best_worst_pairs(PROMPTS, GEN, REWARDS, "base")
  assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
      ("a", [1, 99], [0, 99]), ("c", [22, 99], [21, 99]), ("d", [31, 99], [30, 99])]
  np.testing.assert_allclose([(p["chosen_reward"], p["rejected_reward"]) for p in pairs],
                             [(1.0, 0.2), (0.6, 0.1), (1.0, 0.0)], rtol=1e-6)
  assert {p["source"] for p in pairs} == {"base"}


def test_min_chosen_reward_drops_pairs_whose_best_is_below_it():
  kept = stages.best_worst_pairs(PROMPTS, GEN, REWARDS, "evolved", min_chosen_reward=1.0)
  assert [p["prompt"] for p in kept] == ["a", "d"]
  # The default (-inf) keeps every untied prompt.
  assert len(stages.best_worst_pairs(PROMPTS, GEN, REWARDS, "x",
                                     min_chosen_reward=-math.inf)) == 3


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_best_worst_pairs_win_probabilities_by_hand(scale):
  """Each pair's responses' win probabilities against all 3 samples of its prompt (the response
  itself included): mean over j of σ(scale · (r_i − r_j)), from REWARDS."""
  s = lambda d: _sigmoid(scale * d)  # noqa: E731
  want = [  # (chosen, rejected) of prompts a, c, d
      ((s(0.8) + s(0.0) + s(0.5)) / 3, (s(0.0) + s(-0.8) + s(-0.3)) / 3),
      ((s(0.2) + s(0.5) + s(0.0)) / 3, (s(-0.3) + s(0.0) + s(-0.5)) / 3),
      ((s(1.0) + s(0.0) + s(1.0)) / 3, (s(0.0) + s(-1.0) + s(0.0)) / 3)]
  pairs = stages.best_worst_pairs(PROMPTS, GEN, REWARDS, "base", win_prob_scale=scale)
  np.testing.assert_allclose([(p["chosen_win_prob"], p["rejected_win_prob"]) for p in pairs],
                             want, rtol=1e-6)
  # The other fields are those of the pairs without win probabilities.
  assert [{k: v for k, v in p.items() if "win_prob" not in k} for p in pairs] == [
      {"prompt": pr, "chosen": c, "rejected": r, "chosen_reward": pytest.approx(cr),
       "rejected_reward": pytest.approx(rr), "source": "base"}
      for pr, c, r, cr, rr in (("a", [1, 99], [0, 99], 1.0, 0.2),
                               ("c", [22, 99], [21, 99], 0.6, 0.1),
                               ("d", [31, 99], [30, 99], 1.0, 0.0))]


# --- generate: the one sampling loop, with the keys the runner has always used ---

SYNTH_PROMPTS = synthetic.base_prompts(5, seed=1, max_level=2)
SAMPLING = types.SimpleNamespace(num_samples=2, temperature=0.7, top_p=0.9, top_k=0,
                                 max_new_tokens=5, max_prompt_length=12, batch_size=2)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  tok = tk.train_sentencepiece(SYNTH_PROMPTS + [synthetic.solve(p) for p in SYNTH_PROMPTS],
                               str(tmp_path_factory.mktemp("tok")), vocab_size=40)
  config = models.tiny("llama", vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                       eos_token_ids=tuple(tok.eos_ids))
  params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
  return stages.Policy(config, params, tok, None)


def test_generate_samples_each_chunk_with_the_key_folded_with_its_start(policy):
  """Against the loop the runner used before: chunks of batch_size prompts, right-padded, each
  sampled by `sampling.sample` with fold_in(key, start), decoded up to the length."""
  key = stages.stage_key(0, 0, "generate")
  gen = stages.generate(policy, SYNTH_PROMPTS, key=key, sampling_cfg=SAMPLING)
  tok, ids = policy.tokenizer, stages.prompt_ids(policy.tokenizer, SYNTH_PROMPTS, 12)
  for start in range(0, len(ids), 2):
    prompt_BxP, mask_BxP = tk.pad_sequences(ids[start:start + 2], tok.pad_id)
    out = sampling.sample(policy.model_config, policy.params, prompt_BxP, mask_BxP,
                          rng=jax.random.fold_in(key, start), num_samples=2, max_new_tokens=5,
                          temperature=0.7, top_p=0.9, top_k=0, eos_ids=tok.eos_ids)
    rows = slice(start, start + 2)
    np.testing.assert_array_equal(gen["tokens"][rows], np.asarray(out.tokens))
    np.testing.assert_array_equal(gen["lengths"][rows], np.asarray(out.lengths))
    np.testing.assert_array_equal(gen["finished"][rows], np.asarray(out.finished))
  assert gen["texts"] == [[tok.decode(gen["tokens"][p, n, :gen["lengths"][p, n]])
                           for n in range(2)] for p in range(len(SYNTH_PROMPTS))]


def test_generate_with_continuous_batching_keys_each_prompt_and_sample(policy):
  """sampling.continuous: one pool of batch_size x num_samples slots over all prompts, drawn as
  `continuous.sample_continuous` draws them; the same output format as the fixed chunks."""
  key = stages.stage_key(0, 0, "generate")
  cfg = types.SimpleNamespace(**vars(SAMPLING), continuous=True)
  gen = stages.generate(policy, SYNTH_PROMPTS, key=key, sampling_cfg=cfg)
  tok, ids = policy.tokenizer, stages.prompt_ids(policy.tokenizer, SYNTH_PROMPTS, 12)
  out = continuous.sample_continuous(policy.model_config, policy.params, ids, rng=key, slots=4,
                                     num_samples=2, max_new_tokens=5, pad_id=tok.pad_id,
                                     temperature=0.7, top_p=0.9, eos_ids=tok.eos_ids)
  for name in ("tokens", "lengths", "finished"):
    np.testing.assert_array_equal(gen[name], getattr(out, name))
  assert gen["tokens"].shape == (len(SYNTH_PROMPTS), 2, 5)
  assert gen["texts"] == [[tok.decode(gen["tokens"][p, n, :gen["lengths"][p, n]])
                           for n in range(2)] for p in range(len(SYNTH_PROMPTS))]


# --- create: buffer in, buffer out, plain data ---


def test_create_adds_scores_selects_and_evolves_on_a_copy_of_the_buffer():
  buffer = PromptBuffer()
  buffer.add(synthetic.base_prompts(1, seed=2)[0], iteration=0)
  rewards_PxN = np.array([[0.0, 1.0], [0.5, 0.5], [0.2, 0.4], [1.0, 1.0]], np.float32)
  info_P = creator.informativeness(rewards_PxN, "gap")
  cfg = types.SimpleNamespace(fraction=0.5, selection="greedy", topic_coef=0.25, min_tokens=1,
                              max_tokens=100, max_similarity=0.95)
  evolver = synthetic.SyntheticEvolver(num_chained=1)
  new, created = stages.create(
      buffer, SYNTH_PROMPTS[:4], rewards_PxN, info_P, iteration=1, creator_cfg=cfg,
      evolver=evolver, rng=np.random.default_rng(3), token_count=len,
      dataset_ids=["a", None, "c", "d"])
  assert [r.id for r in buffer] == ["0-0"]  # The input buffer is untouched.
  base = new.base_records()[1:]
  assert [r.text for r in base] == SYNTH_PROMPTS[:4]
  assert [r.extra for r in base] == [{"dataset_id": "a"}, {}, {"dataset_id": "c"},
                                     {"dataset_id": "d"}]
  assert [r.informativeness for r in base] == pytest.approx([1.0, 0.0, 0.2, 0.0])
  # Greedy picks the two largest gaps: prompts 0 and 2; each evolves once (chain of 1).
  assert created["selected"] == [base[0].id, base[2].id]
  assert created["informativeness"] == pytest.approx(info_P.tolist())
  evolved = new.evolved_records()
  assert created["evolved"] == [r.text for r in evolved]
  assert created["methods"] == [r.method for r in evolved]
  assert {r.parent_id for r in evolved} <= {base[0].id, base[2].id}
  # The same rng seed gives the same evolutions: a restart recomputes the same artifact.
  _, again = stages.create(buffer, SYNTH_PROMPTS[:4], rewards_PxN, info_P, iteration=1,
                           creator_cfg=cfg, evolver=evolver, rng=np.random.default_rng(3),
                           token_count=len, dataset_ids=["a", None, "c", "d"])
  assert again == created


def test_create_keeps_topics_and_passes_them_to_topic_weighted_selection():
  rewards_PxN = np.array([[0.0, 1.0], [0.5, 0.5], [0.2, 0.4], [1.0, 1.0]], np.float32)
  info_P = creator.informativeness(rewards_PxN, "gap")
  cfg = types.SimpleNamespace(fraction=0.5, selection="topic_weighted", topic_coef=0.25,
                              min_tokens=1, max_tokens=100, max_similarity=0.95)
  topics = ["sort", "sort", None, "add"]
  args = dict(iteration=0, creator_cfg=cfg, evolver=synthetic.SyntheticEvolver(num_chained=1),
              token_count=len, dataset_ids=["a", None, None, "d"])
  new, created = stages.create(PromptBuffer(), SYNTH_PROMPTS[:4], rewards_PxN, info_P,
                               rng=np.random.default_rng(3), topics=topics, **args)
  assert [r.extra for r in new.base_records()] == [
      {"dataset_id": "a", "topic": "sort"}, {"topic": "sort"}, {},
      {"dataset_id": "d", "topic": "add"}]
  # The selection is creator.select's with these topics, drawn first from the rng.
  expected = creator.select(info_P, fraction=0.5, method="topic_weighted",
                            rng=np.random.default_rng(3), topics=topics, topic_coef=0.25)
  assert created["selected"] == [new.base_records()[i].id for i in expected]
  for missing in (None, [None] * 4):
    with pytest.raises(ValueError, match="'topic_weighted' needs each prompt's topic.*"
                       "data.topic_field"):
      stages.create(PromptBuffer(), SYNTH_PROMPTS[:4], rewards_PxN, info_P,
                    rng=np.random.default_rng(3), topics=missing, **args)


def test_mix_static_takes_a_shuffled_capped_slice_of_the_base_pairs():
  base = [{"source": "base", "i": i} for i in range(6)]
  off = types.SimpleNamespace(enabled=False, base_ratio=0.5)
  mixed = stages.mix(base, [], np.random.default_rng(0), creator_cfg=off, num_pairs=4)
  order = np.random.default_rng(0).permutation(6)
  assert mixed == [base[i] for i in order[:4]]


def test_mix_tops_up_the_budget_with_unused_base_pairs_only_when_asked():
  base = [{"source": "base", "i": i} for i in range(6)]
  evolved = [{"source": "evolved", "i": i} for i in range(2)]
  cfg = types.SimpleNamespace(enabled=True, base_ratio=0.5, top_up=False)
  # At ratio 0.5 (base share rounded half up) two evolved pairs support 3 + 2 = 5 pairs:
  # without top-up that is all the mix gives.
  plain = stages.mix(base, evolved, np.random.default_rng(0), creator_cfg=cfg, num_pairs=6)
  assert len(plain) == 5 and sum(p["source"] == "evolved" for p in plain) == 2
  cfg.top_up = True
  full = stages.mix(base, evolved, np.random.default_rng(0), creator_cfg=cfg, num_pairs=6)
  # Same mix first (the same rng draws), then the missing one from the 3 unused base pairs.
  assert len(full) == 6 and sum(p["source"] == "evolved" for p in full) == 2
  assert len({p["i"] for p in full if p["source"] == "base"}) == 4  # No base pair twice.
  assert {id(p) for p in plain if p["source"] == "base"} < {id(p) for p in full}
  assert len(stages.mix(base, evolved, np.random.default_rng(0), creator_cfg=cfg,
                        num_pairs=20)) == 8  # Never more pairs than exist.


# --- axis rules: from the config's mesh.rules to where the policy and its updates live ---


def test_config_axis_rules_place_the_policy_and_its_update(policy):
  """An override in `c.mesh.rules` moves the parameters it names (the layers lose their fsdp
  split along D, the MLP goes over fsdp x tensor) for the placed policy and for the state the update
  returns; the update's numbers match the default placement's (placement is not math)."""
  from configs import default
  from eva_jax import config_check, sharding
  c = default.get_config("smoke")
  c.mesh.rules.embed = ""
  c.mesh.rules.mlp = "fsdp,tensor"
  rules = sharding.rules_from_config(c.mesh.rules)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)

  def placed(rules):
    params = jax.device_put(policy.params,
                            sharding.param_shardings(policy.model_config, mesh, rules))
    return stages.Policy(policy.model_config, params, policy.tokenizer, mesh, rules)

  tok = policy.tokenizer
  ids = [tok.encode(p)[:6] for p in SYNTH_PROMPTS]
  pairs = [{"prompt": p, "chosen": ids[i][:3] + list(tok.eos_ids),
            "rejected": ids[(i + 1) % len(ids)][:4] + list(tok.eos_ids)}
           for i, p in enumerate(SYNTH_PROMPTS[:4])]
  train_cfg = types.SimpleNamespace(**{**c.train.to_dict(), "hparams": {}, "batch_size": 4,
                                        "num_pairs": 4, "epochs": 1})
  states = {}
  for name, r in (("override", rules), ("default", sharding.DEFAULT_RULES)):
    pol = placed(r)
    ref = stages.reference(pol, pairs, train_cfg=train_cfg)
    states[name] = stages.train_iteration(pol, pairs, ref, np.random.default_rng(0),
                                          lambda *a: None, train_cfg=train_cfg)
  # The vocabulary is over fsdp x tensor either way (a vocabulary-parallel head).
  for name, spec_embed, spec_up in (("default", (("fsdp", "tensor"), None),
                                     (None, "fsdp", "tensor")),
                                    ("override", (("fsdp", "tensor"), None),
                                     (None, None, ("fsdp", "tensor")))):
    params = states[name].params
    assert tuple(params["embedding"].sharding.spec) == spec_embed, name
    assert tuple(params["layers"]["mlp"]["up"].sharding.spec) == spec_up, name
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(states["override"].params),
                 jax.tree.leaves(states["default"].params)))
  assert diff <= 1e-6
  # A bad rule is one config error naming the field.
  c.mesh.rules.embed = "model"
  with pytest.raises(ValueError, match="mesh.rules.*unknown mesh axis 'model'"):
    config_check.validate(c)


# --- soft SPPO end to end: rewards -> pairs with win probabilities -> batches -> a step ---


def _sppo_pairs(tok):
  """best_worst_pairs on REWARDS over 4 synthetic prompts, 3 tokenised responses each."""
  texts = [[synthetic.solve(p)[:n + 2] for n in range(3)] for p in SYNTH_PROMPTS[:4]]
  ids = [[tok.encode(t)[:4] + list(tok.eos_ids) for t in row] for row in texts]
  width = max(len(x) for row in ids for x in row)
  padded = [[x + [tok.pad_id] * (width - len(x)) for x in row] for row in ids]
  gen = {"tokens": np.array(padded), "lengths": np.array([[len(x) for x in row] for row in ids])}
  return stages.best_worst_pairs(SYNTH_PROMPTS[:4], gen, REWARDS, "base")


def test_pair_batches_carry_win_probabilities_when_the_pairs_do(policy):
  from eva_jax import sharding
  pol = stages.Policy(policy.model_config, policy.params, policy.tokenizer,
                      sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  pairs = _sppo_pairs(policy.tokenizer)
  cfg = types.SimpleNamespace(batch_size=4, grad_accum=1, max_length=24, max_prompt_length=12)
  (batch,) = stages._pair_batches(pol, pairs, cfg)
  np.testing.assert_allclose(batch["chosen_win_prob"],
                             [p["chosen_win_prob"] for p in pairs] + [0.5], rtol=1e-6)
  np.testing.assert_allclose(batch["rejected_win_prob"],
                             [p["rejected_win_prob"] for p in pairs] + [0.5], rtol=1e-6)
  # Pairs cached before win probabilities existed still make batches, without them.
  old = [{k: v for k, v in p.items() if "win_prob" not in k} for p in pairs]
  (old_batch,) = stages._pair_batches(pol, old, cfg)
  assert set(old_batch) == set(batch) - {"chosen_win_prob", "rejected_win_prob"}
  for key in old_batch:
    np.testing.assert_array_equal(old_batch[key], batch[key])
  with pytest.raises(ValueError, match="2 of 3 pairs carry win probabilities"):
    stages._pair_batches(pol, pairs[:2] + old[2:], cfg)


def test_sppo_trains_from_pairs_with_win_probabilities(policy):
  """train_iteration with `sppo` on the pairs of best_worst_pairs: the policy is its own
  reference, so the first loss is the mean over pairs of ((p_c − ½)/β)² + ((p_r − ½)/β)²."""
  from configs import default
  from eva_jax import sharding
  pol = stages.Policy(policy.model_config, policy.params, policy.tokenizer,
                      sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  pairs = _sppo_pairs(policy.tokenizer)
  c = default.get_config("smoke")
  train_cfg = types.SimpleNamespace(**{
      **c.train.to_dict(), "loss": "sppo", "beta": 0.5, "hparams": {}, "optimizer": "rmsprop",
      "schedule": "linear", "batch_size": 4, "num_pairs": 4, "epochs": 1})
  ref = stages.reference(pol, pairs, train_cfg=train_cfg)
  logged = []
  state = stages.train_iteration(pol, pairs, ref, np.random.default_rng(0),
                                 lambda step, epoch, m: logged.append(m), train_cfg=train_cfg)
  assert len(logged) == 1 and logged[0]["finite"]
  # donate=True (the runner's): the state takes θ_t's buffers over, the same update follows.
  mine = pol.with_params(jax.tree.map(lambda x: x.copy(), policy.params))
  donated = stages.train_iteration(mine, pairs, ref, np.random.default_rng(0),
                                   lambda *a: None, train_cfg=train_cfg, donate=True)
  assert all(x.is_deleted() for x in jax.tree.leaves(mine.params))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(donated.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  want = np.mean([((p["chosen_win_prob"] - 0.5) / 0.5) ** 2
                  + ((p["rejected_win_prob"] - 0.5) / 0.5) ** 2 for p in pairs])
  assert logged[0]["loss"] == pytest.approx(want, rel=1e-4)
  assert logged[0]["chosen_win_prob"] == pytest.approx(
      np.mean([p["chosen_win_prob"] for p in pairs]), rel=1e-6)
