"""eva_jax.stages: best_worst_pairs on hand-written rewards (chosen = argmax, rejected = argmin,
ties give no pair, the optional floor on the chosen reward); generate against the per-chunk
sampling loop; create and mix as plain functions."""
import math
import types

import jax
import numpy as np
import pytest

from eva_jax import creator, models, sampling, stages, synthetic
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


# --- create: buffer in, buffer out, plain data ---


def test_create_adds_scores_selects_and_evolves_on_a_copy_of_the_buffer():
  buffer = PromptBuffer()
  buffer.add(synthetic.base_prompts(1, seed=2)[0], iteration=0)
  rewards_PxN = np.array([[0.0, 1.0], [0.5, 0.5], [0.2, 0.4], [1.0, 1.0]], np.float32)
  info_P = creator.informativeness(rewards_PxN, "gap")
  cfg = types.SimpleNamespace(fraction=0.5, selection="greedy", min_tokens=1, max_tokens=100,
                              max_similarity=0.95)
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


def test_mix_static_takes_a_shuffled_capped_slice_of_the_base_pairs():
  base = [{"source": "base", "i": i} for i in range(6)]
  off = types.SimpleNamespace(enabled=False, base_ratio=0.5)
  mixed = stages.mix(base, [], np.random.default_rng(0), creator_cfg=off, num_pairs=4)
  order = np.random.default_rng(0).permutation(6)
  assert mixed == [base[i] for i in order[:4]]
