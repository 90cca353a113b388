"""Tests for the creator: metrics on hand-computed rewards, selection statistics, filters,
templates and parsing, the prompt buffer and one evolution round with a fake evolver."""
import itertools
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from eva_jax import creator
from eva_jax import filters
from eva_jax import templates
from eva_jax.buffer import PromptBuffer, PromptRecord, reward_summary
from tests import shared_data

# ------------------------------------------------------------------------------ informativeness

# Four prompts, four responses each; expected values worked out by hand below.
REWARDS_4x4 = np.array([[1.0, 3.0, 2.0, 6.0],
                        [0.0, 0.0, 0.0, 0.0],
                        [5.0, 5.0, 1.0, 1.0],
                        [-1.0, 2.0, 2.0, 0.5]])
EXPECTED_4x4 = {
    "gap": [5.0, 0.0, 4.0, 3.0],
    "mean": [3.0, 0.0, 3.0, 0.875],
    # population variance: (4+0+1+9)/4, 0, (4+4+4+4)/4, (3.515625+1.265625*2+0.140625)/4
    "var": [3.5, 0.0, 4.0, 1.546875],
    "maxmean": [3.0, 0.0, 2.0, 1.125],
    # row 0: r_i - mean(others) = 1-11/3, 3-3, 2-10/3, 6-2 -> |.| = 8/3, 0, 4/3, 4 -> mean 2
    # row 2: 5-7/3, 5-7/3, 1-11/3, 1-11/3 -> 8/3 each; row 3: -1-1.5, 2-0.5, 2-0.5, 0.5-1 -> 1.5
    "loo": [2.0, 0.0, 8.0 / 3.0, 1.5],
    # best minus second best; rows 2 and 3 have a tie at the top
    "dts": [3.0, 0.0, 0.0, 0.0],
    # gap normalised [1, 0, 0.8, 0.6] -> 1 - that
    "gap_inv": [0.0, 1.0, 0.2, 0.4],
    # mean normalised [1, 0, 1, 0.875/3] -> 1 - that
    "mean_inv": [0.0, 1.0, 0.0, 17.0 / 24.0],
}


@pytest.mark.parametrize("metric", creator.METRICS)
def test_metric_hand_computed(metric):
  np.testing.assert_allclose(creator.informativeness(REWARDS_4x4, metric), EXPECTED_4x4[metric],
                             rtol=0, atol=1e-12)


def test_metrics_with_two_responses():
  rewards = np.array([[1.0, 4.0], [2.0, 2.0], [3.0, -1.0]])
  expected = {"gap": [3, 0, 4], "dts": [3, 0, 4], "loo": [3, 0, 4], "var": [2.25, 0, 4],
              "maxmean": [1.5, 0, 2], "mean": [2.5, 2, 1], "gap_inv": [0.25, 1, 0],
              "mean_inv": [0, 1 / 3, 1]}
  for metric, values in expected.items():
    np.testing.assert_allclose(creator.informativeness(rewards, metric), values, atol=1e-12)


def test_authors_loo_is_zero_and_ours_is_not():
  # A NumPy transcription of the authors' `leave_one_out` (src/reward_hf.py): the mean over i
  # of the signed advantage r_i - (sum r - r_i) / (N - 1).
  def authors_loo(r_N):
    num = len(r_N)
    return np.mean([r_N[i] - (r_N.sum() - r_N[i]) / (num - 1) for i in range(num)])

  rewards = np.random.default_rng(0).normal(0.1, 2.0, (50, 6))
  theirs = np.array([authors_loo(r) for r in rewards])
  np.testing.assert_allclose(theirs, 0.0, atol=1e-14)
  ours = creator.informativeness(rewards, "loo")
  assert np.all(ours > 0.1)
  # Ours is N / (N - 1) times the mean absolute deviation.
  mad = np.abs(rewards - rewards.mean(axis=1, keepdims=True)).mean(axis=1)
  np.testing.assert_allclose(ours, 6.0 / 5.0 * mad, rtol=1e-12)


def test_metric_accepts_jax_and_equal_prompts():
  scores = creator.informativeness(jax.numpy.ones((3, 5), jax.numpy.float32), "gap_inv")
  assert isinstance(scores, np.ndarray)
  np.testing.assert_array_equal(scores, [1.0, 1.0, 1.0])  # all gaps equal: normalised to 0


def test_metric_bad_input():
  with pytest.raises(ValueError, match="N >= 2"):
    creator.informativeness(np.ones((3, 1)))
  with pytest.raises(ValueError, match=r"\[P, N\]"):
    creator.informativeness(np.ones(3))
  bad = np.ones((4, 3))
  bad[2, 1] = np.nan
  bad[3, 0] = np.inf
  with pytest.raises(ValueError, match=r"index\(es\) \[2, 3\]"):
    creator.informativeness(bad)
  with pytest.raises(ValueError, match="unknown informativeness metric"):
    creator.informativeness(np.ones((2, 2)), "median")


# ------------------------------------------------------------------------------------ selection


def exact_inclusion_probabilities(weights, num):
  """Enumerates every ordered sequence of `num` successive draws without replacement: each draw
  picks i with probability w_i / sum(remaining w), or uniformly when the remaining w are all 0."""
  probs = np.zeros(len(weights))
  for seq in itertools.permutations(range(len(weights)), num):
    p, left = 1.0, set(range(len(weights)))
    for i in seq:
      total = sum(weights[j] for j in left)
      p *= weights[i] / total if total > 0 else 1.0 / len(left)
      left.remove(i)
    for i in seq:
      probs[i] += p
  return probs


@pytest.mark.parametrize("scores, fraction", [
    ([0.0, 1.0, 2.0, 3.0, 6.0], 0.4),   # weights 0, 1/6, 1/3, 1/2, 1; K = 2
    ([1.0, 1.0, 2.0, 4.0], 0.75),       # weights 0, 0, 1/3, 1; K = 3: one of the two zeros
    ([0.0, 1.0, 2.0, 3.0, 6.0], 0.8),   # K = 4 = number of positive weights: zero never drawn
])
def test_weighted_matches_exact_inclusion_probabilities(scores, fraction):
  scores = np.array(scores)
  weights = (scores - scores.min()) / (scores.max() - scores.min())
  num = creator.num_selected(len(scores), fraction)
  expected = exact_inclusion_probabilities(list(weights), num)
  num_seeds = 20000
  counts = np.zeros(len(scores))
  for seed in range(num_seeds):
    picked = creator.select(scores, fraction=fraction, method="weighted", rng=seed)
    assert len(picked) == num
    counts[picked] += 1
  freq = counts / num_seeds
  # 4 binomial standard errors (exact 0 / 1 probabilities must be hit exactly).
  tolerance = 4 * np.sqrt(expected * (1 - expected) / num_seeds)
  assert np.all(np.abs(freq - expected) <= tolerance), (freq, expected, tolerance)
  assert np.isclose(expected.sum(), num)


@pytest.mark.parametrize("method", creator.SELECTION_METHODS)
def test_selection_deterministic_sorted_distinct(method):
  scores = np.random.default_rng(0).normal(size=60)
  topics = [f"topic {i % 4}" for i in range(60)]  # Only topic_weighted reads them.
  picks = [creator.select(scores, fraction=0.25, method=method, rng=seed, topics=topics)
           for seed in range(6)]
  for seed, picked in enumerate(picks):
    np.testing.assert_array_equal(
        picked, creator.select(scores, fraction=0.25, method=method, rng=seed, topics=topics))
    assert picked.dtype == np.int64 and len(picked) == 15
    assert np.all(np.diff(picked) > 0) and picked.min() >= 0 and picked.max() < 60
  distinct = {tuple(p) for p in picks}
  assert len(distinct) == (1 if method == "greedy" else 6)


def test_selection_rng_types():
  scores = np.arange(20.0)
  by_int = creator.select(scores, fraction=0.5, rng=7)
  by_gen = creator.select(scores, fraction=0.5, rng=np.random.default_rng(7))
  np.testing.assert_array_equal(by_int, by_gen)
  for key in (jax.random.key(3), jax.random.PRNGKey(3)):
    np.testing.assert_array_equal(creator.select(scores, fraction=0.5, rng=key),
                                  creator.select(scores, fraction=0.5, rng=key))
  with pytest.raises(TypeError, match="rng"):
    creator.select(scores, fraction=0.5, rng="seed")


def test_greedy_picks_top_with_index_tie_break():
  scores = np.array([0.5, 3.0, 1.0, 3.0, 2.0, 3.0, 0.0, 1.5])
  np.testing.assert_array_equal(creator.select(scores, fraction=0.25, method="greedy", rng=0),
                                [1, 3])
  np.testing.assert_array_equal(creator.select(scores, fraction=0.5, method="greedy", rng=0),
                                [1, 3, 4, 5])


def test_stratified_covers_every_bin():
  ranks = np.random.default_rng(1).permutation(100)  # prompt i has the ranks[i]-th lowest score
  scores = ranks * 0.37 - 5.0
  for seed in range(5):
    picked = creator.select(scores, fraction=0.1, method="stratified", rng=seed)
    assert sorted(ranks[picked] // 10) == list(range(10))
    picked = creator.select(scores, fraction=0.25, method="stratified", rng=seed)
    per_bin = np.bincount(ranks[picked] // 10, minlength=10)
    assert per_bin.sum() == 25 and set(per_bin) <= {2, 3}


def test_stratified_small_and_tied():
  # 15 prompts -> 10 bins of 2 or 1; selecting all of them must fill every bin.
  np.testing.assert_array_equal(
      creator.select(np.arange(15.0) % 3, fraction=1.0, method="stratified", rng=0), range(15))


@pytest.mark.parametrize("method", ["weighted", "greedy", "stratified"])
def test_all_equal_scores_fall_back_to_uniform(method, caplog):
  scores = np.full(20, 0.3)
  with caplog.at_level(logging.WARNING, logger="eva_jax.creator"):
    picked = creator.select(scores, fraction=0.25, method=method, rng=11)
  assert "selecting uniformly" in caplog.text
  np.testing.assert_array_equal(picked, creator.select(scores, fraction=0.25, method="uniform",
                                                       rng=11))
  assert not np.array_equal(picked, np.arange(5))  # not simply the first five


def test_selection_counts_and_errors():
  assert creator.num_selected(10, 0.25) == 3  # 2.5 rounds up
  assert creator.num_selected(10, 0.24) == 2
  assert creator.num_selected(3, 0.01) == 1
  assert creator.num_selected(7, 1.0) == 7
  for fraction in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="fraction"):
      creator.select(np.arange(4.0), fraction=fraction, rng=0)
  with pytest.raises(ValueError, match="unknown selection method"):
    creator.select(np.arange(4.0), fraction=0.5, method="topk", rng=0)
  with pytest.raises(ValueError, match=r"index\(es\) \[1\]"):
    creator.select(np.array([0.0, np.nan]), fraction=0.5, rng=0)


# Scores 0, 1, 2, 3 (min-max 0, 1/3, 2/3, 1: as a distribution 0, 1/6, 1/3, 1/2) and topics
# a, a, a, b: T = 2 topics, inverse frequencies 4/3, 4/3, 4/3, 4 (sum 8 = P T), normalised
# 1/6, 1/6, 1/6, 1/2 (each topic gets half the mass).
TOPIC_SCORES, TOPICS = np.array([0.0, 1.0, 2.0, 3.0]), ["a", "a", "a", "b"]


@pytest.mark.parametrize("topic_coef, expected", [
    (0.0, [0.0, 1 / 6, 1 / 3, 1 / 2]),
    (1.0, [1 / 6, 1 / 6, 1 / 6, 1 / 2]),
    # 0.75 w + 0.25 v: 1/24, 1/8 + 1/24, 1/4 + 1/24, 3/8 + 1/8.
    (0.25, [1 / 24, 4 / 24, 7 / 24, 12 / 24]),
])
def test_topic_weights_match_hand_values(topic_coef, expected):
  weights = creator.topic_weights(TOPIC_SCORES, TOPICS, topic_coef)
  np.testing.assert_allclose(weights, expected, rtol=1e-12, atol=1e-15)
  # All scores equal: the score part is uniform, the topic part stays.
  np.testing.assert_allclose(creator.topic_weights(np.ones(4), TOPICS, 0.25),
                             [0.75 / 4 + 0.25 / 6] * 3 + [0.75 / 4 + 0.25 / 2])


@pytest.mark.parametrize("topic_coef, weights", [
    (1.0, [1 / 6, 1 / 6, 1 / 6, 1 / 2]),      # inverse topic frequency alone
    (0.25, [1 / 24, 4 / 24, 7 / 24, 12 / 24]),
])
@pytest.mark.parametrize("fraction", [0.25, 0.5])  # K = 1 (the first pick), K = 2
def test_topic_weighted_matches_exact_inclusion_probabilities(topic_coef, weights, fraction):
  """Draws without replacement by the hand-computed weights (`exact_inclusion_probabilities`
  enumerates the draw sequences); K = 1 is the first pick's distribution itself."""
  num = creator.num_selected(4, fraction)
  expected = exact_inclusion_probabilities(weights, num)
  gen, num_draws = np.random.default_rng(0), 8000
  counts = np.zeros(4)
  for _ in range(num_draws):
    picked = creator.select(TOPIC_SCORES, fraction=fraction, method="topic_weighted", rng=gen,
                            topics=TOPICS, topic_coef=topic_coef)
    assert len(picked) == num
    counts[picked] += 1
  tolerance = 4 * np.sqrt(expected * (1 - expected) / num_draws)
  assert np.all(np.abs(counts / num_draws - expected) <= tolerance), (counts, expected)


def test_topic_weighted_with_coefficient_0_picks_what_weighted_picks():
  gen = np.random.default_rng(5)
  for seed in range(20):
    scores = gen.normal(size=40)
    topics = gen.integers(0, 3, size=40).tolist()
    np.testing.assert_array_equal(
        creator.select(scores, fraction=0.25, method="topic_weighted", rng=seed, topics=topics,
                       topic_coef=0.0),
        creator.select(scores, fraction=0.25, method="weighted", rng=seed))
  # With a positive coefficient the rare topic's low-score prompt is drawn: weighted never
  # draws prompt 0 (the lowest score, weight 0) first.
  firsts = {int(creator.select(TOPIC_SCORES, fraction=0.25, method="topic_weighted", rng=seed,
                               topics=["b", "a", "a", "a"], topic_coef=0.25)[0])
            for seed in range(200)}
  assert 0 in firsts


def test_topic_weighted_errors():
  with pytest.raises(ValueError, match="'topic_weighted' needs topics, one per prompt"):
    creator.select(TOPIC_SCORES, fraction=0.5, method="topic_weighted", rng=0)
  with pytest.raises(ValueError, match="one topic per prompt: got 3 for 4 scores"):
    creator.select(TOPIC_SCORES, fraction=0.5, method="topic_weighted", rng=0,
                   topics=TOPICS[:3])
  for coef in (-0.1, 1.5, True, float("nan"), "0.25"):
    with pytest.raises(ValueError, match=r"topic_coef must be a number in \[0, 1\]"):
      creator.select(TOPIC_SCORES, fraction=0.5, method="topic_weighted", rng=0, topics=TOPICS,
                     topic_coef=coef)


# -------------------------------------------------------------------------------------- filters


def words(text):
  return len(text.split())


PARENT = "Explain how a hash map handles collisions and when resizing is triggered in Python."


def test_filters_each_reason():
  buffer_texts = ["Write a short poem about the sea at night, in the style of a sailor's song.",
                  "List three ways to speed up a slow SQL query that joins five large tables."]
  candidates = [
      "   ",                                                           # empty
      None,                                                            # empty (unparsed)
      "Why?",                                                          # too short
      " ".join(["word"] * 40),                                         # too long
      "I\u2019m sorry, but I can't rewrite that request.",             # refusal, curly quote
      "explain how a HASH map handles collisions, and when resizing is triggered in python!",
      "Explain how a hash map handles collisions and when resizing is triggered in Python 3.",
      "write a short poem about the SEA at night -- in the style of a sailor\u2019s song",
      "List three ways to speed up a slow SQL query that joins five large tables today.",
      "Compare open addressing and chaining for a hash map that stores 10 million keys.",
      "Compare open addressing and chaining for a hash map that stores 10 million keys!",
  ]
  parents = [PARENT] * len(candidates)
  kept, rejected = filters.filter_candidates(
      candidates, parents, buffer_texts, tokenizer_len_fn=words, min_tokens=3, max_tokens=30,
      refusal_markers=("I'm sorry", "I cannot", "As an AI"), ngram_n=3, max_similarity=0.8)
  assert kept == [9]
  assert rejected == [(0, "empty"), (1, "empty"), (2, "too_short"), (3, "too_long"),
                      (4, "refusal"), (5, "copy_of_parent"), (6, "near_duplicate_of_parent"),
                      (7, "duplicate_in_buffer"), (8, "near_duplicate_in_buffer"),
                      (10, "duplicate_in_buffer")]
  # A looser parent threshold keeps the small edit of the parent. By hand: PARENT has 14 words,
  # 12 trigrams; "... Python 3" has those 12 plus "in python 3", so Jaccard = 12 / 13.
  parent_trigrams = filters.shingles(filters.normalize_text(PARENT), 3)
  edit_trigrams = filters.shingles(filters.normalize_text(candidates[6]), 3)
  assert filters.jaccard(parent_trigrams, edit_trigrams) == pytest.approx(12 / 13)
  kept, _ = filters.filter_candidates(candidates[6:7], parents[6:7], buffer_texts,
                                      tokenizer_len_fn=words, max_similarity=0.8,
                                      max_parent_similarity=0.95)
  assert kept == [0]


def test_filters_keep_real_rewrites_and_check_similarity():
  rewrite = ("Explain how a Python dict handles hash collisions, when it resizes, and what that "
             "costs for a dict that grows to 50 million string keys.")
  kept, rejected = filters.filter_candidates([rewrite], [PARENT], [], tokenizer_len_fn=words)
  assert kept == [0] and rejected == []
  # Jaccard by hand: trigrams of "a b c d" = {abc, bcd}, of "a b c e" = {abc, bce} -> 1/3.
  a = filters.shingles(filters.normalize_text("A b, c d"), 3)
  b = filters.shingles(filters.normalize_text("a B c e"), 3)
  assert filters.jaccard(a, b) == pytest.approx(1 / 3)
  index = filters._ShingleIndex(3)
  for text in ("a b c d", "x y z", "a b c e f"):
    index.add(text)
  assert index.max_similarity("a b c e") == pytest.approx(2 / 3)  # vs "a b c e f": {abc,bce}/3
  assert index.contains("x y z") and not index.contains("x y")


def test_filters_bad_options():
  with pytest.raises(ValueError, match="parents"):
    filters.filter_candidates(["a"], [], [], tokenizer_len_fn=words)
  with pytest.raises(ValueError, match="max_similarity"):
    filters.filter_candidates(["a"], ["b"], [], tokenizer_len_fn=words, max_similarity=0.0)
  with pytest.raises(ValueError, match="min_tokens"):
    filters.filter_candidates(["a"], ["b"], [], tokenizer_len_fn=words, min_tokens=5,
                              max_tokens=2)
  with pytest.raises(TypeError, match="tokenizer_len_fn"):
    filters.filter_candidates(["a"], ["b"], [], tokenizer_len_fn=None)


# ------------------------------------------------------------------------ templates and parsing


def test_templates_render():
  texts = templates.load_templates()
  assert sorted(texts) == sorted(templates.EVOLUTION_METHODS) and len(texts) == 10
  prompt = "Write a function {name} that returns {other} in C++"
  for name in templates.EVOLUTION_METHODS:
    other = "Summarise {prompt} for a child" if name == "mix" else None
    request = templates.render_evolution_request(name, prompt, other)
    assert request.count(prompt) == 1
    assert templates.PROMPT_OPEN in request and templates.PROMPT_CLOSE in request
    assert "{prompt}" not in request.replace(other or "", "")
    if name == "mix":
      assert request.count(other) == 1 and request.index(prompt) < request.index(other)
  with pytest.raises(ValueError, match="unknown evolution template"):
    templates.render_evolution_request("paraphrase", prompt)
  with pytest.raises(ValueError, match="other"):
    templates.render_evolution_request("mix", prompt)
  with pytest.raises(ValueError, match="other"):
    templates.render_evolution_request("deepen", prompt, "second")
  with pytest.raises(ValueError, match="non-empty"):
    templates.render_evolution_request("deepen", "  ")


@pytest.mark.parametrize("reply, expected", [
    ("<new_prompt>Write a haiku about rust.</new_prompt>", "Write a haiku about rust."),
    ("Sure! Here is the rewritten prompt:\n<new_prompt>\n  Plan a 3-day trip to Oslo.\n"
     "</new_prompt>\nLet me know if you want changes.", "Plan a 3-day trip to Oslo."),
    ("I'll wrap it between <new_prompt> and </new_prompt>.\n<new_prompt>Real one</new_prompt>",
     "Real one"),
    ("Rewritten prompt: \"Explain TCP slow start in 3 steps.\"",
     "Explain TCP slow start in 3 steps."),
    ("**New request:** \u201cSort a list without sort().\u201d", "Sort a list without sort()."),
    ("Here's the harder prompt: Compare A and B.", "Compare A and B."),
    ("<new_prompt> Explain Y with an example", "Explain Y with an example"),
    ("Explain Z in one line.</new_prompt>", "Explain Z in one line."),
    ("Question: what is a monad?", "Question: what is a monad?"),  # not a preamble
    ("  What is 'x' in Python?  ", "What is 'x' in Python?"),
    ("'Hello' said the 'world'", "'Hello' said the 'world'"),
    ("<new_prompt>   </new_prompt>", None),
    ("", None),
    ("\n\t ", None),
    ("\"\"", None),
])
def test_parse_evolved(reply, expected):
  assert templates.parse_evolved(reply) == expected


def load_arena_prompts():
  path = shared_data.arena_path()
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["turns"][0]["content"] for line in f if line.strip()]


# Gemma 2's chat template shape: turns between <start_of_turn> and <end_of_turn>, content trimmed.
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def tiny_chat_tokenizer(corpus):
  """A word-level tokenizer trained on the fly (no download) with a Gemma-style chat template."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  specials = ["[UNK]", "<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator(corpus, tokenizers.trainers.WordLevelTrainer(special_tokens=specials))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<bos>",
      eos_token="<eos>", extra_special_tokens=specials[4:])
  fast.chat_template = GEMMA_STYLE_TEMPLATE
  return fast


def test_arena_prompts_render_through_every_template_and_chat_template():
  prompts = load_arena_prompts()
  assert len(prompts) == 500
  texts = templates.load_templates()
  tok = tiny_chat_tokenizer(list(texts.values()) + ["user model"])
  start_id = tok.convert_tokens_to_ids("<start_of_turn>")
  for i, prompt in enumerate(prompts):
    for name in templates.EVOLUTION_METHODS:
      other = prompts[(i + 1) % len(prompts)] if name == "mix" else None
      request = templates.render_evolution_request(name, prompt, other)
      assert prompt.strip() in request and (other is None or other.strip() in request)
      chat = tok.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                     add_generation_prompt=True)
      assert chat.startswith("<bos><start_of_turn>user\n")
      assert chat.endswith("<end_of_turn>\n<start_of_turn>model\n")
      assert request in chat and chat.count(templates.PROMPT_OPEN) >= 1
      assert templates.PROMPT_CLOSE in chat
  ids = tok.apply_chat_template([{"role": "user", "content": request}], tokenize=True,
                                add_generation_prompt=True)["input_ids"]
  assert ids[:2] == [tok.bos_token_id, start_id] and ids.count(start_id) == 2


# ----------------------------------------------------------------------------------- the buffer


def make_buffer():
  buffer = PromptBuffer()
  for i, text in enumerate(["Base prompt one.", "Base prompt two.", "Base prompt three."]):
    buffer.add(text, iteration=0, extra={"question_id": f"q{i}"})
  return buffer


def test_buffer_provenance_and_ids():
  buffer = make_buffer()
  assert [r.id for r in buffer] == ["0-0", "0-1", "0-2"]
  child = buffer.add("Evolved one.", iteration=1, method="deepen", parent_id="0-1", step=1)
  grandchild = buffer.add("Evolved two.", iteration=1, method="persona", parent_id=child.id,
                          step=2)
  assert (child.id, grandchild.id) == ("1-0", "1-1")
  assert grandchild.parent_id == "1-0" and grandchild.root_id == "0-1" and child.root_id == "0-1"
  assert buffer.get("0-1").is_base and not grandchild.is_base
  assert [r.id for r in buffer.base_records()] == ["0-0", "0-1", "0-2"]
  assert [r.id for r in buffer.evolved_records()] == ["1-0", "1-1"]
  assert buffer.lineage_counts("method") == {"deepen": 1, "persona": 1}
  assert buffer.lineage_counts("root") == {"0-1": 2}
  assert buffer.lineage_counts("iteration") == {"1": 2}
  with pytest.raises(ValueError, match="not in the buffer"):
    buffer.add("x", iteration=1, method="deepen", parent_id="9-9", step=1)
  with pytest.raises(ValueError, match="base prompts"):
    buffer.add("x", iteration=1, method="deepen")
  with pytest.raises(KeyError, match="9-9"):
    buffer.get("9-9")


def test_buffer_save_load_round_trip(tmp_path):
  buffer = make_buffer()
  buffer.add("Evolved one.", iteration=1, method="deepen", parent_id="0-2", step=1)
  buffer.record_scores(["0-0", "1-0"], [[1.0, 3.0], [0.0, 4.0]], [2.0, 4.0])
  path = tmp_path / "run" / "buffer.jsonl"
  buffer.save(path)
  buffer.save(path)  # overwrite in place
  assert os.listdir(path.parent) == ["buffer.jsonl"]  # no temporary file left behind
  loaded = PromptBuffer.load(path)
  assert list(loaded) == list(buffer)
  assert loaded.get("1-0").reward_summary == {"mean": 2.0, "max": 4.0, "min": 0.0, "std": 2.0}
  assert loaded.get("0-0").extra == {"question_id": "q0"}
  # Ids continue deterministically after a restart.
  assert loaded.add("Another.", iteration=1, method="mix", parent_id="0-0", step=1).id == "1-1"
  assert buffer.add("Another.", iteration=1, method="mix", parent_id="0-0", step=1).id == "1-1"


def test_buffer_load_errors(tmp_path):
  path = tmp_path / "bad.jsonl"
  good = PromptRecord(id="0-0", text="t", parent_id=None, root_id="0-0", iteration=0,
                      method="base").to_json()
  orphan = dict(good, id="1-0", parent_id="0-5", method="deepen")
  path.write_text(json.dumps(good) + "\n" + json.dumps(orphan) + "\n")
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    PromptBuffer.load(path)
  path.write_text("{not json\n")
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    PromptBuffer.load(path)


def test_reward_summary():
  assert reward_summary([1.0, 2.0, 6.0]) == {"mean": 3.0, "max": 6.0, "min": 1.0,
                                             "std": pytest.approx(np.sqrt(14 / 3))}


# ------------------------------------------------------------------------------ mixing of pairs


def test_mix_pairs_ratio_and_determinism(caplog):
  base = [f"b{i}" for i in range(10)]
  evolved = [f"e{i}" for i in range(100)]
  mixed = creator.mix_pairs(base, evolved, rng=0)
  # Largest total at 0.2: 52 -> round(10.4) = 10 base + 42 evolved; 53 would need 11 base.
  assert len(mixed) == 52 and sum(m.startswith("b") for m in mixed) == 10
  assert len(set(mixed)) == 52 and mixed == creator.mix_pairs(base, evolved, rng=0)
  assert mixed != creator.mix_pairs(base, evolved, rng=1)
  assert not all(m.startswith("b") for m in mixed[:10])  # shuffled, not base first
  # Evolved short: 10 -> 2 base + 8 evolved (11 would need 9 evolved).
  few = creator.mix_pairs([f"b{i}" for i in range(100)], evolved[:8], rng=0)
  assert len(few) == 10 and sum(m.startswith("e") for m in few) == 8
  fixed = creator.mix_pairs(base, evolved, rng=0, total=20)
  assert sum(m.startswith("b") for m in fixed) == 4 and len(fixed) == 20
  with pytest.raises(ValueError, match="total"):
    creator.mix_pairs(base, evolved, rng=0, total=60)
  with caplog.at_level(logging.WARNING, logger="eva_jax.creator"):
    only_base = creator.mix_pairs(base, [], rng=0)
  assert sorted(only_base) == sorted(base) and "no evolved pairs" in caplog.text


# ------------------------------------------------------------------------ one evolution round


class FakeEvolver:
  """Deterministic evolver: for each prompt, a chain of texts given by `steps(text)`."""

  def __init__(self, steps):
    self.steps = steps
    self.calls = []

  def evolve(self, prompts, *, rng, iteration):
    self.calls.append((tuple(p.id for p in prompts), rng, iteration))
    return [creator.Candidate(text=text, parent_id=p.id, method=f"m{step}", step=step)
            for p in prompts for step, text in enumerate(self.steps(p.text), start=1)]


def test_evolve_round_adds_survivors_with_provenance():
  buffer = make_buffer()
  evolver = FakeEvolver(lambda t: [f"{t} Answer in exactly three bullet points for a beginner.",
                                   f"{t} Give three bullet points, then a worked example in Go."])
  assert isinstance(evolver, creator.Evolver)
  added = creator.evolve_round(buffer, ["0-2", "0-0"], evolver, rng=5, iteration=1,
                               tokenizer_len_fn=words)
  assert evolver.calls == [(("0-2", "0-0"), 5, 1)]
  assert [(r.id, r.parent_id, r.root_id, r.step, r.method) for r in added] == [
      ("1-0", "0-2", "0-2", 1, "m1"), ("1-1", "1-0", "0-2", 2, "m2"),
      ("1-2", "0-0", "0-0", 1, "m1"), ("1-3", "1-2", "0-0", 2, "m2")]
  assert len(buffer) == 7 and all(r.iteration == 1 for r in added)


def test_evolve_round_links_to_nearest_surviving_ancestor():
  buffer = make_buffer()
  # Step 1 copies its parent (rejected); step 2 is new and must hang off the selected prompt.
  evolver = FakeEvolver(lambda t: [t, "Write a limerick about compilers that rhymes 'parse'."])
  added = creator.evolve_round(buffer, ["0-1"], evolver, rng=0, iteration=2,
                               tokenizer_len_fn=words)
  assert [(r.parent_id, r.step) for r in added] == [("0-1", 2)]


def test_evolve_round_nothing_survives(caplog):
  buffer = make_buffer()
  evolver = FakeEvolver(lambda t: ["I'm sorry, but I can't help with that.", "", None])
  with caplog.at_level(logging.WARNING, logger="eva_jax.creator"):
    added = creator.evolve_round(buffer, ["0-0", "0-1"], evolver, rng=0, iteration=1,
                                 tokenizer_len_fn=words)
  assert added == [] and len(buffer) == 3
  assert "none of 6 evolved prompts survived" in caplog.text
  # The iteration then trains on base pairs only.
  assert len(creator.mix_pairs(["p0", "p1", "p2"], added, rng=0)) == 3


class FixedEvolver:
  """Returns the same candidates whatever it is asked."""

  def __init__(self, candidates):
    self.candidates = candidates

  def evolve(self, prompts, *, rng, iteration):
    return list(self.candidates)


def test_evolve_round_groups_chains_in_any_order():
  buffer = make_buffer()
  Cand = creator.Candidate
  evolver = FixedEvolver([
      Cand("Chain one, second rewrite: plan a week of vegan dinners for two.", "0-0", "b", 2, 1),
      Cand("Chain zero, first rewrite: explain the CAP theorem to a PM.", "0-0", "a", 1, 0),
      Cand("Chain one, first rewrite: plan three vegan dinners under ten euros.", "0-0", "b", 1, 1),
  ])
  added = creator.evolve_round(buffer, ["0-0"], evolver, rng=0, iteration=1,
                               tokenizer_len_fn=words)
  assert [(r.id, r.parent_id, r.step, r.text.split(",")[0]) for r in added] == [
      ("1-0", "0-0", 1, "Chain one"), ("1-1", "1-0", 2, "Chain one"),
      ("1-2", "0-0", 1, "Chain zero")]


def test_evolve_round_rejects_malformed_chains():
  buffer = make_buffer()
  stray = FixedEvolver([creator.Candidate("new text", "0-2", "deepen", 1)])
  with pytest.raises(ValueError, match="not selected"):
    creator.evolve_round(buffer, ["0-0"], stray, rng=0, iteration=1, tokenizer_len_fn=words)
  gap = FixedEvolver([creator.Candidate("new text", "0-0", "deepen", 2)])
  with pytest.raises(ValueError, match="steps 1..1"):
    creator.evolve_round(buffer, ["0-0"], gap, rng=0, iteration=1, tokenizer_len_fn=words)
  for ids in (["0-0", "7-7"], ["0-0", "0-0"]):
    with pytest.raises(ValueError, match="distinct ids in the buffer"):
      creator.evolve_round(buffer, ids, gap, rng=0, iteration=1, tokenizer_len_fn=words)


# --------------------------------------------------------------------------- template sets


def test_template_sets_name_their_templates():
  """"eva" is today's ten; "evolinstruct" is WizardLM's four in-depth mutations and its one
  in-breadth mutation (the eva authors' EvolInstruct), its in-breadth one a template of its own."""
  eva = templates.TEMPLATE_SETS.get("eva")
  assert eva.methods == templates.EVOLUTION_METHODS and not eva.uniform
  assert not eva.continue_after_unusable
  assert templates.load_templates("eva") == templates.load_templates()
  evol = templates.TEMPLATE_SETS.get("evolinstruct")
  assert evol.in_depth == ("add_constraints", "deepen", "concretize", "increase_reasoning")
  assert evol.in_breadth == ("breadth",) and evol.uniform and evol.continue_after_unusable
  texts = templates.load_templates("evolinstruct")
  assert list(texts) == list(evol.methods)
  assert templates.TEMPLATE_NAMES == templates.EVOLUTION_METHODS + ("breadth",)
  # The shared in-depth templates are the same files in both sets.
  for name in evol.in_depth:
    assert texts[name] == templates.load_templates()[name]
  assert texts["breadth"] not in templates.load_templates().values()
  with pytest.raises(ValueError, match="unknown template set 'wizard'"):
    templates.load_templates("wizard")


def test_breadth_template_renders_with_its_placeholder_and_markers():
  prompt = "Write a function {name} that returns {other} in C++"
  request = templates.render_evolution_request("breadth", prompt)
  assert request.count(prompt) == 1 and "{prompt}" not in request.replace(prompt, "")
  assert request.index("<original>") < request.index(prompt) < request.index("</original>")
  assert request.rstrip().endswith(f"{templates.PROMPT_OPEN} and {templates.PROMPT_CLOSE}.")
  # A reply in the asked-for form parses back to the new prompt.
  reply = f"{templates.PROMPT_OPEN}How do I write a C++ coroutine?{templates.PROMPT_CLOSE}"
  assert templates.parse_evolved(reply) == "How do I write a C++ coroutine?"
  with pytest.raises(ValueError, match="`other` is required for 'mix' and only there"):
    templates.render_evolution_request("breadth", prompt, "another prompt")
  with pytest.raises(ValueError, match="prompt must be a non-empty string"):
    templates.render_evolution_request("breadth", "  ")


def test_a_step_after_an_unusable_one_is_filtered_against_the_last_text():
  """A chain that goes on after an unusable reply (the "evolinstruct" LM chain) rewrote the last
  text it had: step 3 below repeats step 1, its real parent, so it is a copy of its parent; its
  survivor hangs off step 1's record."""
  buffer = make_buffer()
  first = "Base prompt one, rewritten: list three uses of a hash map in Go."
  third = "Base prompt one, rewritten again: compare hash maps and B-trees for range queries."
  evolver = FakeEvolver(lambda t: [first, None, first, third])
  rejections = {}
  added = creator.evolve_round(buffer, ["0-0"], evolver, rng=0, iteration=1,
                               tokenizer_len_fn=words, rejections=rejections)
  assert rejections == {"empty": 1, "copy_of_parent": 1}
  assert [(r.id, r.parent_id, r.step, r.text) for r in added] == [
      ("1-0", "0-0", 1, first), ("1-1", "1-0", 4, third)]
