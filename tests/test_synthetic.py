"""Synthetic tasks: hand-checked answers and rewards, evolution, held-out disjointness."""
import types

import numpy as np
import pytest

from eva_jax import synthetic as syn


@pytest.mark.parametrize("prompt, answer, level, name", [
    ("copy: 3 9 1", "3 9 1", 1, "copy"),
    ("reverse: 3 9 1", "1 9 3", 1, "reverse"),
    ("reverse: 1 2 3 4 5 6 7 8", "8 7 6 5 4 3 2 1", 6, "reverse"),
    ("sort: 3 9 1 9 0", "0 1 3 9 9", 3, "sort"),
    ("inc: 3 9 1", "4 0 2", 1, "inc"),
    ("count 3: 3 9 3 1", "2", 2, "count"),
    ("count 7: 3 9 3", "0", 1, "count"),
    ("add: 4 + 3", "7", 1, "add"),
    ("add: 47 + 385", "432", 4, "add"),
    ("add: 9999 + 1", "10000", 4, "add"),
    ("sort then reverse: 3 9 1", "9 3 1", 2, "sort then reverse"),
    ("reverse then inc: 1 2 9", "0 3 2", 2, "reverse then inc"),
    ("inc then sort: 9 0 5", "0 1 6", 2, "inc then sort"),
    ("sort then inc: 9 0 5", "1 6 0", 2, "sort then inc"),
    ("inc then reverse: 9 0 5 5 1 2 3", "4 3 2 6 6 1 0", 6, "inc then reverse"),
])
def test_hand_checked_answers_and_levels(prompt, answer, level, name):
  assert syn.solve(prompt) == answer
  task, _ = syn.parse_prompt(prompt)
  assert (task.name, task.level) == (name, level)
  assert syn.reward(prompt, answer) == 1.0


def test_generated_prompts_parse_back_to_their_task():
  rng = np.random.default_rng(0)
  for level in range(1, syn.MAX_LEVEL + 1):
    for name in syn.tasks_at_level(level):
      task = syn.task_spec(name, level)
      prompt, meta = syn.make_prompt(task, rng)
      assert syn.parse_prompt(prompt)[0] == task
      assert meta == {"task": name, "level": level, "answer": syn.solve(prompt)}
  # Levels follow the size rules of the module docstring.
  assert syn.task_spec("sort", 4).params == {"length": 6}
  assert syn.task_spec("sort then reverse", 4).params == {"length": 5}
  assert syn.task_spec("add", 4).params == {"digits_a": 3, "digits_b": 2}


@pytest.mark.parametrize("bad", [
    "hello", "reverse: 3 x 1", "add: 4 +", "add: 4 + 5 + 6", "count: 1 2 3", "count 12: 1 2 3",
    "reverse: 3 9", "sort then: 1 2 3", "explode: 1 2 3", "reverse: 31 2 3", "reverse:"])
def test_malformed_prompts_raise(bad):
  with pytest.raises(ValueError):
    syn.parse_prompt(bad)


def test_unknown_task_spec_raises():
  with pytest.raises(ValueError, match="unknown"):
    syn.task_spec("multiply", 1)
  with pytest.raises(ValueError, match="level 1"):
    syn.task_spec("sort then reverse", 1)


@pytest.mark.parametrize("prompt, response, expected", [
    # Lists: position matches / max(#response tokens, #answer tokens). Answer "1 9 3".
    ("reverse: 3 9 1", "1 9 3", 1.0),
    ("reverse: 3 9 1", "  1 9 3 \n", 1.0),
    ("reverse: 3 9 1", "1 9 4", 2 / 3),
    ("reverse: 3 9 1", "1 9", 2 / 3),
    ("reverse: 3 9 1", "1 9 3 3", 3 / 4),
    ("reverse: 3 9 1", "3 9 1", 1 / 3),
    ("reverse: 3 9 1", "x", 0.0),
    ("reverse: 3 9 1", "", 0.0),
    ("reverse: 3 9 1", "   ", 0.0),
    # add: right-aligned character matches / longer length. Answer "432".
    ("add: 47 + 385", "432", 1.0),
    ("add: 47 + 385", "431", 2 / 3),
    ("add: 47 + 385", "32", 2 / 3),
    ("add: 47 + 385", "1432", 3 / 4),
    ("add: 47 + 385", "532", 2 / 3),
    ("add: 47 + 385", "4 3 2", 1 / 5),
    ("add: 47 + 385", "", 0.0),
    # count: 1 - |n - answer| / list length. Answer 2, length 4.
    ("count 3: 3 9 3 1", "2", 1.0),
    ("count 3: 3 9 3 1", "1", 0.75),
    ("count 3: 3 9 3 1", "3", 0.75),
    ("count 3: 3 9 3 1", "0", 0.5),
    ("count 3: 3 9 3 1", "9", 0.0),
    ("count 3: 3 9 3 1", "two", 0.0),
    ("count 3: 3 9 3 1", "", 0.0),
])
def test_graded_reward_hand_computed(prompt, response, expected):
  assert syn.reward(prompt, response) == pytest.approx(expected, abs=1e-12)


def test_score_texts_batch_matches_reward_and_checks_lengths():
  prompts = ["reverse: 3 9 1", "add: 47 + 385", "count 3: 3 9 3 1", "sort: 2 1 0"]
  responses = ["1 9 4", "432", "", "0 1 2"]
  scores = syn.score_texts(prompts, responses)
  assert scores.dtype == np.float32 and scores.shape == (4,)
  np.testing.assert_allclose(scores, [2 / 3, 1.0, 0.0, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    syn.score_texts(prompts[:2], responses[:1])


def test_rewards_stay_in_unit_interval_on_random_responses():
  rng = np.random.default_rng(1)
  prompts = syn.base_prompts(60, seed=3, max_level=6)
  alphabet = list("0123456789 x")
  for prompt in prompts:
    for _ in range(5):
      response = "".join(rng.choice(alphabet, size=int(rng.integers(0, 20))))
      assert 0.0 <= syn.reward(prompt, response) <= 1.0
    assert syn.reward(prompt, syn.solve(prompt)) == 1.0


def _digits(prompt):
  return syn.parse_prompt(prompt)[1].get("digits")


def _is_subsequence(short, long):
  it = iter(long)
  return all(d in it for d in short)


def test_in_depth_raises_level_by_one_and_derives_from_parent():
  rng = np.random.default_rng(2)
  parents = syn.base_prompts(120, seed=4, max_level=syn.MAX_LEVEL - 1)
  for parent in parents:
    child = syn.evolve_in_depth(parent, rng)
    assert syn.level_of(child) == syn.level_of(parent) + 1, (parent, child)
    assert not syn.is_heldout(child)
    p_task, p_in = syn.parse_prompt(parent)
    c_task, c_in = syn.parse_prompt(child)
    if p_task.name == "add":  # one operand gains a leading digit
      assert {str(c_in["a"]).endswith(str(p_in["a"])), str(c_in["b"]).endswith(str(p_in["b"]))
              } == {True}
    else:  # a longer list holding the parent's digits, or the same list under a chain
      assert _is_subsequence(p_in["digits"], c_in["digits"])
      if c_in["digits"] == p_in["digits"]:
        assert set(syn.parse_prompt(parent)[0].name.split(" then ")) <= set(
            c_task.name.split(" then ")) | {"copy"}


def test_in_depth_saturates_at_max_level():
  rng = np.random.default_rng(3)
  for parent in ["reverse: 1 2 3 4 5 6 7 8", "add: 1234 + 567"]:
    child = syn.evolve_in_depth(parent, rng)
    assert syn.level_of(child) == syn.MAX_LEVEL and child != parent
    assert syn.parse_prompt(child)[0].name == syn.parse_prompt(parent)[0].name
  assert syn.level_of(syn.evolve_in_depth("sort: 1 2 3 4", rng, max_level=2)) == 2


def test_in_breadth_keeps_level_and_changes_task():
  rng = np.random.default_rng(5)
  for parent in syn.base_prompts(120, seed=6, max_level=syn.MAX_LEVEL):
    child = syn.evolve_in_breadth(parent, rng)
    assert syn.level_of(child) == syn.level_of(parent)
    assert syn.parse_prompt(child)[0].name != syn.parse_prompt(parent)[0].name
    assert not syn.is_heldout(child)


def test_evolution_is_deterministic_given_rng():
  prompts = syn.base_prompts(20, seed=7)
  evolver = syn.SyntheticEvolver(num_chained=3)
  runs = [[evolver.evolve_chain(p, rng) for p in prompts]
          for rng in (np.random.default_rng(9), np.random.default_rng(9),
                      np.random.default_rng(10))]
  assert runs[0] == runs[1]
  assert runs[0] != runs[2]


def test_depth_prob_picks_the_mutation_kind():
  rng = np.random.default_rng(11)
  prompts = syn.base_prompts(30, seed=8, max_level=2)
  deep = syn.SyntheticEvolver(depth_prob=1.0, num_chained=2)
  wide = syn.SyntheticEvolver(depth_prob=0.0, num_chained=2)
  for prompt in prompts:
    chain = deep.evolve_chain(prompt, rng)
    assert [m.split(":")[0] for _, m in chain] == ["depth", "depth"]
    assert [syn.level_of(c) for c, _ in chain] == [syn.level_of(prompt) + 1,
                                                   syn.level_of(prompt) + 2]
    chain = wide.evolve_chain(prompt, rng)
    assert [m for _, m in chain] == ["breadth:sibling"] * 2
  with pytest.raises(ValueError, match="depth_prob"):
    syn.SyntheticEvolver(depth_prob=1.5)


def test_evolver_interface_returns_chained_candidates():
  records = [types.SimpleNamespace(id=f"0-{i}", text=t)
             for i, t in enumerate(syn.base_prompts(5, seed=12))]
  evolver = syn.SyntheticEvolver(num_chained=4)
  cands = evolver.evolve(records, rng=3, iteration=1)
  assert len(cands) == 20
  assert [c.step for c in cands] == [1, 2, 3, 4] * 5
  assert [c.parent_id for c in cands] == [r.id for r in records for _ in range(4)]
  # The chain rewrites its previous step; the int seed fixes every draw.
  expected = [c for r in records
              for c in evolver.evolve_chain(r.text, np.random.default_rng(3))][:4]
  assert [(c.text, c.method) for c in cands[:4]] == expected
  assert [(c.text, c.method) for c in evolver.evolve(records, rng=3, iteration=1)] == [
      (c.text, c.method) for c in cands]


def test_heldout_set_covers_levels_and_is_disjoint_from_training():
  heldout = syn.heldout_set(seed=0, per_level=12)
  assert len(heldout) == 12 * syn.MAX_LEVEL
  assert len({p for p, _, _ in heldout}) == len(heldout)
  for prompt, level, name in heldout:
    task, _ = syn.parse_prompt(prompt)
    assert (task.level, task.name) == (level, name)
    assert syn.is_heldout(prompt)
  assert [lvl for _, lvl, _ in heldout] == sorted(lvl for _, lvl, _ in heldout)
  assert {n for _, lvl, n in heldout if lvl == 1} == set(syn.BASE_TASKS)
  # Training prompts of any seed, the SFT set and evolved prompts avoid the held-out part.
  heldout_texts = {p for p, _, _ in heldout}
  train = syn.base_prompts(1500, seed=0, max_level=syn.MAX_LEVEL)
  sft = [p for p, _ in syn.sft_examples(500, seed=0)]
  evolved = [c for p in train[:200]
             for c, _ in syn.SyntheticEvolver(num_chained=3).evolve_chain(
                 p, np.random.default_rng(0))]
  for text in train + sft + evolved:
    assert not syn.is_heldout(text)
  assert heldout_texts.isdisjoint(train + sft + evolved)
  assert syn.heldout_set(seed=0, per_level=12) == heldout
  assert syn.heldout_set(seed=1, per_level=12) != heldout


def test_heldout_partition_reserves_about_a_fifth():
  level1_copy = [f"copy: {a} {b} {c}" for a in range(10) for b in range(10) for c in range(10)]
  fraction = np.mean([syn.is_heldout(p) for p in level1_copy])
  assert 0.15 < fraction < 0.25


def test_base_prompts_and_sft_examples():
  prompts = syn.base_prompts(200, seed=5, max_level=2)
  assert len(set(prompts)) == 200
  assert {syn.level_of(p) for p in prompts} == {1, 2}
  assert prompts == syn.base_prompts(200, seed=5, max_level=2)
  pairs = syn.sft_examples(100, seed=5, max_level=1)
  assert all(syn.level_of(p) == 1 and a == syn.solve(p) for p, a in pairs)
  # The SFT set comes from its own seed stream.
  assert [p for p, _ in syn.sft_examples(200, seed=5, max_level=2)] != prompts
  with pytest.raises(ValueError, match="distinct"):
    syn.heldout_set(seed=0, per_level=300, max_level=1)  # only ~20 held-out level-1 adds
