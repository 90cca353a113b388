"""Tokenizer wrapper: sentencepiece trained on synthetic tasks, chat template, cache, batching,
and a hand-built local transformers folder."""
import json
import os
import sys

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers

from eva_jax import synthetic as syn
from eva_jax.models import tokenizer as tk


def _corpus():
  pairs = syn.sft_examples(400, seed=0, max_level=syn.MAX_LEVEL)
  return [p for p, _ in pairs] + [a for _, a in pairs]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tok"))
  return tk.train_sentencepiece(_corpus(), workdir, vocab_size=128), workdir


def test_round_trip_of_task_prompts_and_answers(trained):
  tok, _ = trained
  texts = [p for p, _, _ in syn.heldout_set(seed=0, per_level=11)]
  texts += [syn.solve(t) for t in texts] + ["0", "10000", "add: 0 + 0"]
  for text in texts:
    assert tok.decode(tok.encode(text)) == text


def test_segmentation_matches_the_sentencepiece_model(trained):
  import sentencepiece as spm
  tok, workdir = trained
  processor = spm.SentencePieceProcessor(
      model_file=os.path.join(workdir, "spm_tokenizer", "spm.model"))
  for prompt in syn.base_prompts(300, seed=2, max_level=syn.MAX_LEVEL):
    text = f"{prompt} {syn.solve(prompt)}"
    assert tok.encode(text) == processor.encode(text), text


def test_digits_are_single_tokens_and_easy_prompts_are_short(trained):
  tok, _ = trained
  pieces = tok.hf.convert_ids_to_tokens(tok.encode("add: 4705 + 385 count 3: 9 1"))
  digit_pieces = [p for p in pieces if any(ch.isdigit() for ch in p)]
  assert digit_pieces == list("4705385391")
  for prompt, level, _ in syn.heldout_set(seed=1, per_level=11, max_level=2):
    assert len(tok.apply_chat_template(prompt)) <= 24, prompt
    assert len(tok.encode(syn.solve(prompt))) + 1 <= 24


def test_special_ids_and_vocab(trained):
  tok, _ = trained
  vocab = tok.hf.get_vocab()
  assert tok.bos_id == vocab["<bos>"] and tok.pad_id == vocab["<pad>"]
  assert set(tok.eos_ids) == {vocab["<eos>"], vocab["<|end|>"]}
  assert tok.vocab_size == len(vocab) <= 128
  assert tok.encode("copy: 1 2 3", add_bos=True)[0] == tok.bos_id


def test_chat_template_renders_and_ends_with_generation_prompt(trained):
  tok, _ = trained
  prompt = "reverse: 3 9 1"
  assert tok.render_chat(prompt) == "<bos><|user|>reverse: 3 9 1<|end|><|assistant|>"
  ids = tok.apply_chat_template(prompt)
  vocab = tok.hf.get_vocab()
  # The prompt's content tokenises exactly as the bare text does.
  assert ids == ([vocab["<bos>"], vocab["<|user|>"]] + tok.encode(prompt)
                 + [vocab["<|end|>"], vocab["<|assistant|>"]])
  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt},
              {"role": "assistant", "content": "1 9 3"}]
  rendered = tok.render_chat(messages, add_generation_prompt=False)
  assert rendered == ("<bos><|system|>be brief<|end|><|user|>reverse: 3 9 1<|end|>"
                      "<|assistant|>1 9 3<|end|>")
  with pytest.raises(ValueError, match="robot"):
    tok.render_chat([{"role": "robot", "content": prompt}])
  with pytest.raises(ValueError, match="messages"):
    tok.render_chat([{"content": prompt}])


def test_decode_of_a_generated_response_skips_specials(trained):
  tok, _ = trained
  vocab = tok.hf.get_vocab()
  generated = tok.encode("1 9 3") + [vocab["<|end|>"], tok.pad_id, tok.pad_id]
  assert tok.decode(np.asarray(generated, np.int32)) == "1 9 3"
  assert tok.decode(generated, skip_special=False).startswith("1 9 3<|end|>")
  with pytest.raises(ValueError, match="one sequence"):
    tok.decode(np.zeros((2, 3), np.int32))


def test_cache_hit_skips_training_and_corpus_change_retrains(trained, monkeypatch):
  tok, workdir = trained
  tokenizer_json = os.path.join(workdir, "spm_tokenizer", "tokenizer.json")
  mtime = os.stat(tokenizer_json).st_mtime_ns
  calls = []
  real_train = tk._train_spm_bpe
  monkeypatch.setattr(tk, "_train_spm_bpe", lambda *a: calls.append(a) or real_train(*a))
  again = tk.train_sentencepiece(_corpus(), workdir, vocab_size=128)
  assert calls == [] and os.stat(tokenizer_json).st_mtime_ns == mtime
  assert again.encode("sort: 3 1 2") == tok.encode("sort: 3 1 2")
  tk.train_sentencepiece(_corpus()[:-1], workdir, vocab_size=128, name="other")
  tk.train_sentencepiece(_corpus(), workdir, vocab_size=100, name="other")
  assert len(calls) == 2
  assert sorted(os.listdir(workdir)) == ["other", "spm_tokenizer"]  # no temporary folders left


def test_batch_encode_padding_and_masks(trained):
  tok, _ = trained
  texts = ["copy: 1 2 3", "add: 47 + 385", "9"]
  seqs = [tok.encode(t) for t in texts]
  ids, mask = tok.batch_encode(texts, pad_to_multiple=8)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.shape == mask.shape and ids.shape[1] % 8 == 0
  assert ids.shape[1] == -(-max(map(len, seqs)) // 8) * 8
  for row, seq in enumerate(seqs):
    assert mask[row].tolist() == [1] * len(seq) + [0] * (ids.shape[1] - len(seq))
    assert ids[row, :len(seq)].tolist() == seq
    assert (ids[row, len(seq):] == tok.pad_id).all()
  left_ids, left_mask = tok.batch_encode(texts, side="left", add_bos=True)
  for row, seq in enumerate(seqs):
    assert left_ids[row, left_ids.shape[1] - len(seq) - 1:].tolist() == [tok.bos_id] + seq
    assert left_mask[row].sum() == len(seq) + 1 and left_mask[row, -1] == 1
  with pytest.raises(ValueError, match="text 1 is empty"):
    tok.batch_encode(["copy: 1 2 3", ""])
  ids, mask = tok.batch_encode(["", "9"], allow_empty=True)
  assert mask[0].tolist() == [0] * ids.shape[1]
  with pytest.raises(ValueError, match="side"):
    tok.batch_encode(texts, side="middle")


def test_saved_folder_loads_with_load_tokenizer(trained, tmp_path):
  tok, _ = trained
  tok.hf.save_pretrained(str(tmp_path))
  loaded = tk.load_tokenizer(str(tmp_path))
  prompt = "inc then sort: 9 0 5"
  assert loaded.apply_chat_template(prompt) == tok.apply_chat_template(prompt)
  assert loaded.eos_ids == tok.eos_ids and loaded.pad_id == tok.pad_id


def test_hand_built_gemma_style_folder(tmp_path):
  # A word-level vocabulary with Gemma's special tokens and ids, no pad token, and a
  # generation_config.json listing <eos> and <end_of_turn>, as Gemma 2 instruct ships it.
  words = ["<unk>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "user", "model",
           "hello", "world", "\n"]
  vocab = {w: i for i, w in enumerate(words)}
  backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.add_special_tokens([tokenizers.AddedToken(w, special=True) for w in words[:5]])
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                            bos_token="<bos>", eos_token="<eos>")
  hf.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                      "{{ 'model' if m['role'] == 'assistant' else m['role'] }} "
                      "{{ m['content'] }}<end_of_turn>{% endfor %}"
                      "{% if add_generation_prompt %}<start_of_turn>model{% endif %}")
  hf.save_pretrained(str(tmp_path))
  with open(tmp_path / "generation_config.json", "w") as f:
    json.dump({"bos_token_id": 2, "eos_token_id": [1, 4]}, f)
  tok = tk.load_tokenizer(str(tmp_path))
  assert tok.eos_ids == (1, 4)
  assert tok.pad_id == 1  # no pad token: the first stop id, masks mark the padding
  assert tok.bos_id == 2 and tok.vocab_size == len(words)
  ids = tok.apply_chat_template("hello world")
  assert ids == [2, 3, 5, 7, 8, 4, 3, 6]
  assert tok.render_chat("hello").endswith("<start_of_turn>model")
  assert tok.decode(ids) == "user hello world model"


def test_bad_inputs_raise(tmp_path):
  with pytest.raises(FileNotFoundError):
    tk.load_tokenizer(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="non-empty list"):
    tk.train_sentencepiece([], str(tmp_path))
  with pytest.raises(ValueError, match="non-empty list"):
    tk.train_sentencepiece("copy: 1 2 3", str(tmp_path))
  with pytest.raises(ValueError, match="vocab_size"):
    tk.train_sentencepiece(["copy: 1 2 3"], str(tmp_path), vocab_size=8)


def _tiny_folder(folder, chat_template=None):
  """A word-level tokenizer folder (no training) with the given chat template."""
  words = ["<unk>", "<eos>", "<bos>", "Hello", "there"]
  backend = tokenizers.Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                                  unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                            bos_token="<bos>", eos_token="<eos>")
  if chat_template is not None:
    hf.chat_template = chat_template
  hf.save_pretrained(str(folder))
  return str(folder)


def _edit_json(file, **fields):
  config = {}
  if os.path.isfile(file):
    with open(file) as f:
      config = json.load(f)
  with open(file, "w") as f:
    json.dump(dict(config, **fields), f)


_GOOD_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def test_folders_asking_for_remote_code_are_refused(tmp_path):
  marker = tmp_path / "code_ran"
  for name, config_file, auto_map in (
      ("tok_config", "tokenizer_config.json", {"AutoTokenizer": ["evil.Evil", "evil.Evil"]}),
      ("tok_config_list", "tokenizer_config.json", ["evil.Evil", None]),
      ("model_config", "config.json", {"AutoTokenizer": ["evil.Evil", None]})):
    folder = _tiny_folder(tmp_path / name, _GOOD_TEMPLATE)
    with open(os.path.join(folder, "evil.py"), "w") as f:
      f.write(f"open({str(marker)!r}, 'w').close()\n")
    _edit_json(os.path.join(folder, config_file), auto_map=auto_map)
    with pytest.raises(tk.TokenizerError, match=f"{config_file}.*trust_remote_code"):
      tk.load_tokenizer(folder)
  assert not marker.exists()
  folder = _tiny_folder(tmp_path / "bad_json", _GOOD_TEMPLATE)
  with open(os.path.join(folder, "tokenizer_config.json"), "wb") as f:
    f.write(b'{"auto_map": \xff')
  with pytest.raises(tk.TokenizerError, match="tokenizer_config.json: not valid JSON"):
    tk.load_tokenizer(folder)
  folder = _tiny_folder(tmp_path / "bad_eos", _GOOD_TEMPLATE)
  _edit_json(os.path.join(folder, "generation_config.json"), eos_token_id=["<eos>"])
  with pytest.raises(tk.TokenizerError, match="generation_config.json: eos_token_id"):
    tk.load_tokenizer(folder)


# (name, chat template, what the error says). Each fails when the folder is loaded.
_BAD_TEMPLATES = [
    ("raises", "{{ raise_exception('no chat here') }}", "rejected the messages.*no chat here"),
    ("divides_by_zero", "{{ 1 / 0 }}", "ZeroDivisionError"),
    ("huge_range", "{% for i in range(10**9) %}x{% endfor %}", "OverflowError.*Range too big"),
    ("nested_loops", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
     "{% endfor %}{{ messages[0]['content'] }}", r"more than \d+ steps"),
    ("recursive_macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
     "RecursionError"),
    ("syntax_error", "{% for m in messages %}", "TemplateSyntaxError"),
    ("renders_empty", "{% if false %}x{% endif %}", "rendered nothing"),
    ("drops_the_prompt", "<bos>", "drops the user's message"),
]


@pytest.mark.parametrize("name,template,message", _BAD_TEMPLATES,
                         ids=[c[0] for c in _BAD_TEMPLATES])
def test_bad_chat_template_fails_at_load_naming_the_folder(tmp_path, name, template, message):
  tracer = sys.gettrace()
  folder = _tiny_folder(tmp_path / name, template)
  with pytest.raises(tk.TokenizerError, match=message) as err:
    tk.load_tokenizer(folder)
  assert folder in str(err.value)
  assert sys.gettrace() is tracer  # the render budget's tracer is gone again


def test_runaway_on_some_prompts_is_stopped_at_render(tmp_path):
  # Renders the probe fine, loops (10**10 steps) only on a prompt saying "boom".
  template = ("{% for m in messages %}{% if 'boom' in m['content'] %}{% for i in range(100000) %}"
              "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
              "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
  tok = tk.load_tokenizer(_tiny_folder(tmp_path, template))
  assert tok.render_chat("Hello") == "<user>Hello"
  with pytest.raises(tk.TokenizerError, match=r"more than \d+ steps"):
    tok.render_chat("boom")
  folder = _tiny_folder(tmp_path / "plain")  # no chat template: loads, and says so on use
  with pytest.raises(tk.TokenizerError, match="has no chat template"):
    tk.load_tokenizer(folder).render_chat("Hello")
