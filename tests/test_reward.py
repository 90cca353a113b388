"""Reward scoring against transformers' *ForSequenceClassification models, and the Scorer rules."""
import dataclasses
import string

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import tokenizers  # noqa: E402
import transformers  # noqa: E402

from eva_jax import models, reward, sharding, synthetic  # noqa: E402
from eva_jax.models import hf  # noqa: E402
from eva_jax.models.tokenizer import load_tokenizer  # noqa: E402
from tests import hf_fixtures  # noqa: E402

FAMILIES = ["llama", "gemma2", "qwen2"]
# Ids 0..2 are the fixtures' pad/bos/eos; every other piece is one character.
_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
_CHARS = string.ascii_lowercase + string.digits + " .,?!'"
_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
             "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = ["what is two plus two?", "hi", "name a colour", "count to five, slowly please",
           "why?"]
RESPONSES = ["four.", "hello there, how can i help you today?", "", "one two three four five",
             "because"]


def _char_tokenizer():
  """A character-level transformers tokenizer with a jinja chat template (49 ids)."""
  vocab = {t: i for i, t in enumerate(_SPECIALS + list(_CHARS))}
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  backend.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
      unk_token="<unk>")
  tok.chat_template = _TEMPLATE
  return tok


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
  """(family, torch reward model, its folder, a folder with the char tokenizer).

  The tokenizer has its own folder: transformers 5 loads any tokenizer beside a model_type
  "qwen2" config.json as Qwen2Tokenizer, whatever tokenizer_config.json declares.
  """
  model = hf_fixtures.torch_model(request.param, num_labels=1)
  path = hf_fixtures.save_torch_model(model, str(tmp_path_factory.mktemp(request.param)))
  tokenizer_path = str(tmp_path_factory.mktemp(request.param + "_tokenizer"))
  _char_tokenizer().save_pretrained(tokenizer_path)
  return request.param, model, path, tokenizer_path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  model = hf_fixtures.torch_model("llama", num_labels=1)
  path = hf_fixtures.save_torch_model(model, str(tmp_path_factory.mktemp("llama_rm")))
  _char_tokenizer().save_pretrained(path)
  return model, path


def _chat_ids(tok, prompt, response):
  """Ids of the chat as transformers' own tokenizer renders and encodes it."""
  text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": response}], tokenize=False)
  return tok.encode(text, add_special_tokens=False)


def _torch_scores(model, tokens, mask, position_ids=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=None if position_ids is None else torch.tensor(position_ids))
  return out.logits[:, 0].float().numpy()


def _torch_score_each(model, seqs):
  """transformers' score of each id list, one unpadded row at a time."""
  return np.asarray([_torch_scores(model, [s], [[1] * len(s)])[0] for s in seqs])


def test_scores_match_transformers_on_both_padding_sides(saved):
  family, model, path, _ = saved
  config, params = hf.load(path)
  forward = jax.jit(models.forward, static_argnums=0)
  for lengths, total, seed in (([12, 7, 3], 12, 0), ([5, 16, 9, 1], 16, 1)):
    right, right_mask = hf_fixtures.ragged_batch(lengths, total, seed=seed)
    left, left_mask = hf_fixtures.ragged_batch(lengths, total, seed=seed, side="left")
    ref = _torch_scores(model, right, right_mask)
    # transformers needs explicit positions to be correct on left padding.
    ref_left = _torch_scores(model, left, left_mask,
                             np.maximum(np.cumsum(left_mask, axis=1) - 1, 0))
    ours_right = np.asarray(forward(config, params, right, right_mask))
    ours_left = np.asarray(forward(config, params, left, left_mask))
    diffs = [np.abs(ours_right - ref).max(), np.abs(ours_left - ref).max(),
             np.abs(ours_left - ref_left).max()]
    print(f"{family} lengths {lengths}: max |score diff| right/left/left-vs-left = "
          + " ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) <= 1e-4


def test_neural_scorer_matches_transformers_on_chat_text(saved):
  family, model, path, tokenizer_path = saved
  config, params = hf.load(path)
  scorer = reward.NeuralScorer(config, params, load_tokenizer(tokenizer_path), max_length=64,
                               batch_size=2, length_buckets=(32, 64))
  tok = _char_tokenizer()
  ids = [_chat_ids(tok, p, r) for p, r in zip(PROMPTS, RESPONSES)]
  assert [scorer.token_ids(p, r) for p, r in zip(PROMPTS, RESPONSES)] == ids
  # Lengths 13..59 span both buckets, and the batches of 2 leave partial ones.
  ours = scorer.score(PROMPTS, RESPONSES)
  ref = _torch_score_each(model, ids)
  print(f"{family}: max |text score diff| = {np.abs(ours - ref).max():.1e}")
  assert ours.dtype == np.float32 and ours.shape == (5,)
  assert np.abs(ours - ref).max() <= 1e-4
  # The empty response (index 2) is scored; the same pairs in another order keep their scores.
  perm = [3, 0, 4, 2, 1]
  shuffled = scorer.score([PROMPTS[i] for i in perm], [RESPONSES[i] for i in perm])
  np.testing.assert_allclose(shuffled, ours[perm], atol=1e-6)
  groups = [RESPONSES[:3], RESPONSES[2:]]
  grouped = scorer.score_grouped(PROMPTS[:2], groups)
  ref_grouped = [_torch_score_each(model, [_chat_ids(tok, p, r) for r in group])
                 for p, group in zip(PROMPTS[:2], groups)]
  assert grouped.shape == (2, 3)
  assert np.abs(grouped - np.asarray(ref_grouped)).max() <= 1e-4


def test_sharded_scores_equal_unsharded(llama):
  _, path = llama
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(data=4, fsdp=2)
  sharded = reward.load_reward_model(path, mesh=mesh, max_length=64, batch_size=8)
  assert sharded.params["layers"]["mlp"]["up"].sharding.spec[1] == "fsdp"
  plain = reward.load_reward_model(path, max_length=64, batch_size=8)
  a, b = sharded.score(PROMPTS, RESPONSES), plain.score(PROMPTS, RESPONSES)
  np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="multiple of 8"):
    reward.load_reward_model(path, mesh=mesh, max_length=64, batch_size=6)


def test_long_pairs_are_cut_from_the_prompt_left_and_response_right(llama):
  model, path = llama
  scorer = reward.load_reward_model(path, max_length=24, batch_size=2)
  tok = _char_tokenizer()
  prompt, response = "abcdefghijklmnopqrstuvwxyz", "0123456789" * 3
  full = scorer.tokenizer.apply_chat_template(
      [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
      add_generation_prompt=False)
  assert len(full) == 1 + 1 + 26 + 2 + 30 + 1
  # Budget 23 after <bos>; the prompt part (<|user|>, 26 letters, <|end|>, <|assistant|>: 29)
  # keeps its last 11, the response part (30 digits and <|end|>) its first 12.
  expected = ([1] + tok.encode("rstuvwxyz", add_special_tokens=False) + [6, 5]
              + tok.encode("012345678901", add_special_tokens=False))
  assert scorer.token_ids(prompt, response) == expected
  # A short response keeps all of itself and its closing <|end|>.
  short = scorer.token_ids(prompt, "ok")
  assert short == [1] + tok.encode(prompt, add_special_tokens=False)[-18:] + [6, 5] \
      + tok.encode("ok", add_special_tokens=False) + [6]
  ours = scorer.score([prompt, prompt], [response, "ok"])
  ref = _torch_score_each(model, [expected, short])
  assert np.abs(ours - ref).max() <= 1e-4


def test_truncated_penalty(llama):
  _, path = llama
  raw = reward.load_reward_model(path, max_length=64, batch_size=2)
  penalised = reward.load_reward_model(path, max_length=64, batch_size=2, truncated_penalty=0.5)
  truncated = np.array([False, True, False, False, True])
  base = raw.score(PROMPTS, RESPONSES, truncated)
  np.testing.assert_array_equal(base, raw.score(PROMPTS, RESPONSES))
  np.testing.assert_allclose(penalised.score(PROMPTS, RESPONSES, truncated),
                             base - 0.5 * truncated, atol=1e-6)
  checker = reward.ProgrammaticScorer(lambda p, r: len(r), truncated_penalty=2.0)
  got = checker.score_grouped(["a", "b"], [["x", "yy"], ["", "zzz"]],
                              np.array([[True, False], [False, True]]))
  np.testing.assert_array_equal(got, [[-1.0, 2.0], [0.0, 1.0]])
  with pytest.raises(ValueError, match="truncated must be a bool array of shape"):
    checker.score(["a"], ["b"], np.array([1]))


def test_non_finite_score_names_the_prompt_index(llama):
  _, path = llama
  scorer = reward.load_reward_model(path, max_length=64, batch_size=2)
  bang = len(_SPECIALS) + _CHARS.index("!")
  # A NaN embedding for "!" poisons exactly the rows that contain it.
  params = dict(scorer.params, embedding=scorer.params["embedding"].at[bang].set(np.nan))
  poisoned = reward.NeuralScorer(scorer.config, params, scorer.tokenizer, max_length=64,
                                 batch_size=2)
  responses = ["fine", "ok", "no!", "sure"]
  with pytest.raises(reward.NonFiniteScoreError, match="prompt index 2") as err:
    poisoned.score(PROMPTS[:4], responses)
  assert err.value.index == 2
  with pytest.raises(reward.NonFiniteScoreError, match=r"prompt index 1 \(response 0\)"):
    poisoned.score_grouped(PROMPTS[:2], [["a", "b"], ["c!", "d"]])
  checker = reward.ProgrammaticScorer(lambda p, r: float("nan") if r == "bad" else 1.0)
  with pytest.raises(reward.NonFiniteScoreError, match="prompt index 1"):
    checker.score(["a", "b", "c"], ["good", "bad", "good"])


def test_programmatic_scorer_wraps_the_synthetic_checker():
  prompts = synthetic.base_prompts(3, seed=0)
  answers = [synthetic.solve(p) for p in prompts]
  checker = reward.ProgrammaticScorer(synthetic.reward)
  got = checker.score_grouped(prompts, [[a, "", a + " 9"] for a in answers])
  want = [[synthetic.reward(p, r) for r in (a, "", a + " 9")] for p, a in zip(prompts, answers)]
  np.testing.assert_array_equal(got, np.asarray(want, np.float32))
  assert (got[:, 0] == 1.0).all() and (got[:, 1] == 0.0).all()  # the empty one is scored


def test_bucketed_batches_cover_every_row_once():
  lengths = [3, 40, 17, 16, 64, 1, 33, 20, 5]
  plan = reward.plan_batches(lengths, batch_size=4, length_buckets=(16, 32, 64),
                             batch_sizes=(2, 4))
  rows = np.concatenate([r for r, _, _ in plan])
  assert sorted(rows.tolist()) == list(range(len(lengths)))
  for r, b, t in plan:
    assert len(r) <= b and b in (2, 4) and t in (16, 32, 64)
    assert max(lengths[i] for i in r) <= t
  # Rows of one bucket never pad to a bigger one: 3, 16, 1, 5 -> 16; 17, 20 -> 32; ...
  assert [(sorted(r.tolist()), b, t) for r, b, t in plan] == [
      ([0, 3, 5, 8], 4, 16), ([2, 7], 2, 32), ([1, 4, 6], 4, 64)]
  assert reward.default_length_buckets(100) == (16, 32, 64, 100)
  assert reward.batch_buckets(24, 4) == (4, 8, 16, 24)


def test_bad_inputs_raise(llama):
  _, path = llama
  checker = reward.ProgrammaticScorer(lambda p, r: 0.0)
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    checker.score(["a", "b"], ["c"])
  with pytest.raises(TypeError, match=r"responses\[1\] is int"):
    checker.score(["a", "b"], ["c", 3])
  with pytest.raises(ValueError, match="same number of responses"):
    checker.score_grouped(["a", "b"], [["x"], ["y", "z"]])
  assert checker.score([], []).shape == (0,)
  config, params = hf.load(path)
  with pytest.raises(ValueError, match="must reach max_length"):
    reward.NeuralScorer(config, params, None, max_length=64, batch_size=2,
                        length_buckets=(16, 32))
  with pytest.raises(ValueError, match="increasing positive ints"):
    reward.NeuralScorer(config, params, None, max_length=64, batch_size=2,
                        length_buckets=(64, 32))
  causal = hf_fixtures.save_torch_model(hf_fixtures.torch_model("llama"), path + "_lm")
  with pytest.raises(ValueError, match="not a reward model"):
    reward.load_reward_model(causal)


# --- ArmoRM's head against a NumPy transcription of the published modeling_custom.py ---


def _numpy_armo_score(t, hidden_BxTxD, last_B, gate_B, temperature, n_hidden):
  """The published head on torch-layout tensors ([out, in] weights), one row at a time."""
  out = []
  for h, last, gate in zip(hidden_BxTxD.astype(np.float64), last_B, gate_B):
    rewards = t["regression_layer.weight"] @ h[last]
    x = h[gate]
    for i in range(n_hidden + 1):
      x = t[f"gating.layers.{i}.weight"] @ x + t[f"gating.layers.{i}.bias"]
      x = np.maximum(x, 0) if i < n_hidden else x
    e = np.exp(x / temperature - np.max(x / temperature))
    gating = e / e.sum() * t["gating.logit_scale"][0]
    out.append(np.sum(gating * (rewards @ t["reward_transform_matrix"])))
  return np.asarray(out)


def test_armorm_head_matches_numpy_reference():
  from eva_jax.models import armorm
  pattern = (7, 8, 9)
  head = armorm.head_config_from_hf({"architectures": ["LlamaForRewardModelWithGating"],
                                     "num_objectives": 5, "gating_temperature": 10,
                                     "gating_hidden_dim": 16, "gating_n_hidden": 3})
  head = dataclasses.replace(head, gating_pattern=pattern)
  rng = np.random.default_rng(0)
  d = 32
  dims = [d, 16, 16, 16, 5]
  t = {"regression_layer.weight": rng.normal(size=(5, d)),
       "reward_transform_matrix": rng.normal(size=(5, 5)),  # not symmetric: order matters
       "gating.logit_scale": np.array([1.3])}
  for i in range(4):
    t[f"gating.layers.{i}.weight"] = rng.normal(size=(dims[i + 1], dims[i])) / np.sqrt(dims[i])
    t[f"gating.layers.{i}.bias"] = rng.normal(size=(dims[i + 1],))
  # regression_layer.weight loads as the backbone's `score` ([D, O]); the rest is the head.
  assert sorted(armorm.head_tensor_names(head) + ["regression_layer.weight"]) == sorted(t)
  params = armorm.head_params_from_tensors(head, t, d)
  score_DxO = t["regression_layer.weight"].T
  # Two rows: right padded, and left padded; the pattern occurs twice in the first row.
  ids = [[1, 7, 8, 9, 4, 7, 8, 9, 5, 6], [3, 7, 8, 9, 2]]
  assert [armorm.gating_position(s, pattern) for s in ids] == [5, 1]
  mask = np.array([[1] * 10 + [0, 0], [0] * 7 + [1] * 5])
  gate_B = np.array([5, 7 + 1])
  last_B = np.array([9, 11])
  hidden = rng.normal(size=(2, 12, d)).astype(np.float32)
  score, rewards, gate = armorm.head_scores(head, params, score_DxO, hidden, mask, gate_B)
  ref = _numpy_armo_score(t, hidden, last_B, gate_B, 10.0, 3)
  print(f"armorm head: max |score diff| = {np.abs(np.asarray(score) - ref).max():.1e}")
  assert np.abs(np.asarray(score) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
  np.testing.assert_allclose(np.asarray(gate).sum(-1), 1.3, rtol=1e-5)
  # The README's identity: score = rewards . (gate @ M^T).
  np.testing.assert_allclose(
      np.sum(np.asarray(rewards) * (np.asarray(gate) @ t["reward_transform_matrix"].T), -1),
      np.asarray(score), rtol=1e-4)
  with pytest.raises(ValueError, match="gating pattern"):
    armorm.gating_position([1, 2, 3], pattern)
  with pytest.raises(ValueError, match="has shape"):
    armorm.head_params_from_tensors(head, dict(t, **{"gating.layers.3.bias": np.zeros(4)}), d)
