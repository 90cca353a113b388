"""eva_jax.stages.best_worst_pairs on hand-written rewards: chosen = argmax, rejected = argmin,
ties give no pair, and the optional floor on the chosen reward."""
import math

import numpy as np

from eva_jax import stages

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
