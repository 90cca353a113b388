"""LLM-as-judge scores against the same expectation computed from transformers' PyTorch logits."""
import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import tokenizers  # noqa: E402
import transformers  # noqa: E402

from eva_jax import judge, reward, sharding  # noqa: E402
from eva_jax.models import hf  # noqa: E402
from eva_jax.models.tokenizer import load_tokenizer  # noqa: E402
from tests import hf_fixtures  # noqa: E402

# Ids 0..2 are the fixtures' pad/bos/eos; every other piece is one character, so "10" is the two
# tokens "1", "0" and the scale 1..10 takes the two-token path.
_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
_CHARS = string.ascii_letters + string.digits + " .,?!'\n:[]"
_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
             "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = ["What is two plus two?", "hi", "Name a colour.", "Count to five, slowly please."]
RESPONSES = ["Four.", "Hello there, how can I help you today?", "", "One two three four five"]
SHORT_TEMPLATE = "Q: {prompt}\nA: {response}\nScore {low} to {high}:"


def _char_tokenizer():
  vocab = {t: i for i, t in enumerate(_SPECIALS + list(_CHARS))}
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  backend.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
  backend.decoder = tokenizers.decoders.Fuse()  # decode joins characters without spaces
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
      unk_token="<unk>")
  tok.chat_template = _TEMPLATE
  return tok


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(torch causal LM, its folder with the char tokenizer beside it)."""
  model = hf_fixtures.torch_model("llama")
  path = hf_fixtures.save_torch_model(model, str(tmp_path_factory.mktemp("judge_llama")))
  _char_tokenizer().save_pretrained(path)
  return model, path


def _torch_expected_scores(model, tok, requests, scale):
  """E[score] from transformers' logits, one unpadded sequence at a time, by the formula:
  P(s) is the next-token probability of s's one token, or for a two-token label (a, b)
  P(a) P(b | a); the one-token label a itself gets P(a) (1 - sum of those P(b | a))."""
  labels = [tok.encode(str(s), add_special_tokens=False) for s in scale]
  shared = {seq[0] for seq in labels if len(seq) == 2}
  scores = []
  for request in requests:
    text = tok.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False) + sorted(shared)
    with torch.no_grad():
      logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    at = -2 if shared else -1
    p_first = torch.softmax(logits[at], -1).numpy()
    p_after = torch.softmax(logits[-1], -1).numpy()
    seconds = [seq[1] for seq in labels if len(seq) == 2]
    probs = []
    for seq in labels:
      if len(seq) == 2:
        probs.append(p_first[seq[0]] * p_after[seq[1]])
      elif seq[0] in shared:
        probs.append(p_first[seq[0]] * (1 - p_after[seconds].sum()))
      else:
        probs.append(p_first[seq[0]])
    probs = np.asarray(probs) / np.sum(probs)
    scores.append(float(probs @ np.asarray(list(scale), np.float64)))
  return np.asarray(scores)


@pytest.mark.parametrize("scale", [range(1, 11), range(1, 6)])
def test_scores_match_transformers(llama, scale):
  model, path = llama
  config, params = hf.load(path)
  scorer = judge.JudgeScorer(config, params, load_tokenizer(path), template=SHORT_TEMPLATE,
                             scale=scale, max_length=128, batch_size=2,
                             length_buckets=(64, 128))
  requests = [scorer.request(p, r) for p, r in zip(PROMPTS, RESPONSES)]
  assert requests[0] == f"Q: What is two plus two?\nA: Four.\nScore 1 to {max(scale)}:"
  ours = scorer.score(PROMPTS, RESPONSES)
  ref = _torch_expected_scores(model, _char_tokenizer(), requests, scale)
  print(f"scale 1..{max(scale)}: max |E[score] diff| = {np.abs(ours - ref).max():.1e}")
  assert ours.dtype == np.float32 and ours.shape == (4,)
  assert np.abs(ours - ref).max() <= 1e-4
  assert ((ours >= 1) & (ours <= max(scale))).all()
  # Lengths span buckets and the batches of 2; another order gives the same scores.
  perm = [2, 0, 3, 1]
  shuffled = scorer.score([PROMPTS[i] for i in perm], [RESPONSES[i] for i in perm])
  np.testing.assert_allclose(shuffled, ours[perm], atol=1e-6)
  grouped = scorer.score_grouped(PROMPTS[:2], [[RESPONSES[0]], [RESPONSES[1]]])
  np.testing.assert_allclose(grouped[:, 0], ours[:2], atol=1e-6)


def test_sharded_scores_equal_unsharded(llama):
  _, path = llama
  mesh = sharding.make_mesh(data=4, fsdp=2)
  tok = load_tokenizer(path)
  kwargs = dict(template=SHORT_TEMPLATE, max_length=64, batch_size=8, length_buckets=(64,))
  place = sharding.param_shardings_for(mesh)
  sharded = judge.JudgeScorer(*hf.load(path, shardings=place), tok, mesh=mesh, **kwargs)
  plain = judge.JudgeScorer(*hf.load(path), tok, **kwargs)
  np.testing.assert_allclose(sharded.score(PROMPTS, RESPONSES), plain.score(PROMPTS, RESPONSES),
                             atol=1e-5)
  with pytest.raises(ValueError, match="multiple of 8"):
    judge.JudgeScorer(*hf.load(path, shardings=place), tok, mesh=mesh,
                      **dict(kwargs, batch_size=6))


def test_judge_is_the_registered_judge_scorer(llama):
  import ml_collections
  _, path = llama
  cfg = ml_collections.ConfigDict(dict(path=path, max_length=512, batch_size=8,
                                       truncated_penalty=0.0))
  scorer = reward.SCORERS.get("judge")(cfg, source=None)
  direct = judge.JudgeScorer(*hf.load(path), load_tokenizer(path), max_length=512, batch_size=8)
  assert isinstance(scorer, judge.JudgeScorer)
  np.testing.assert_array_equal(scorer.score(PROMPTS, RESPONSES),
                                direct.score(PROMPTS, RESPONSES))


def test_long_pairs_are_cut_to_max_length(llama):
  _, path = llama
  scorer = judge.JudgeScorer(*hf.load(path), load_tokenizer(path), template=SHORT_TEMPLATE,
                             max_length=64, batch_size=2)
  prompt, response = "why " * 40, "because " * 40
  ids = scorer.token_ids(prompt, response)
  tok = scorer.tokenizer
  assert 60 <= len(ids) <= 64  # re-encoding a cut text may leave a token or two spare
  # Both texts keep their start; the request's closing wording, the chat markers and the
  # shared label token "1" are all still there.
  text = tok.decode(ids, skip_special=False)
  assert "Q: why why" in text and "A: because because" in text
  assert text.endswith("\nScore 1 to 10:<|end|><|assistant|>1")
  assert np.isfinite(scorer.score([prompt], [response])).all()
  with pytest.raises(ValueError, match="leaves no room"):
    judge.JudgeScorer(*hf.load(path), load_tokenizer(path), template=SHORT_TEMPLATE,
                      max_length=16, batch_size=2).token_ids(prompt, response)


def test_bad_settings_raise(llama):
  _, path = llama
  config, params = hf.load(path)
  tok = load_tokenizer(path)
  with pytest.raises(ValueError, match="one token, or two tokens"):
    judge.JudgeScorer(config, params, tok, scale=[1, 100], max_length=64)
  with pytest.raises(ValueError, match="at least two distinct"):
    judge.JudgeScorer(config, params, tok, scale=[3, 3], max_length=64)
  with pytest.raises(ValueError, match=r"\{response\}"):
    judge.JudgeScorer(config, params, tok, template="{prompt}", max_length=64)
  rm_path = hf_fixtures.save_torch_model(hf_fixtures.torch_model("llama", num_labels=1),
                                         path + "_rm")
  with pytest.raises(ValueError, match="causal LM"):
    judge.JudgeScorer(*hf.load(rm_path), tok, max_length=64)
  assert isinstance(judge.JudgeScorer(config, params, tok, max_length=64), reward.Scorer)


def test_real_judge_smollm2(smollm2_path):
  """SmolLM2 judging two real pairs with the default template: the same expectation as
  transformers computes on the same folder."""
  config, params = hf.load(smollm2_path)
  tok = load_tokenizer(smollm2_path)
  scorer = judge.JudgeScorer(config, params, tok, max_length=512, batch_size=2)
  prompts = ["What is the capital of France?"] * 2
  responses = ["The capital of France is Paris.", "Bananas are yellow."]
  ours = scorer.score(prompts, responses)
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path,
                                                            dtype=torch.float32).eval()
  ref = _torch_expected_scores(model, tok.hf, [scorer.request(p, r)
                                               for p, r in zip(prompts, responses)], range(1, 11))
  print(f"SmolLM2 judge: ours {ours}, transformers {ref}")
  assert np.abs(ours - ref).max() <= 1e-3
