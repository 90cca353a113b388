"""ArmoRM (`LlamaForRewardModelWithGating`) against a PyTorch transcription of its published
forward, on a tiny random checkpoint written in ArmoRM's own tensor layout and config.json.

The tokenizer puts Llama 3's special tokens at Llama 3's ids, so the reference below can use the
gating pattern exactly as the published modeling_custom.py hard-codes it.
"""
import dataclasses
import json
import os
import shutil
import string

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import safetensors.torch  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402

from eva_jax import reward, sharding  # noqa: E402
from eva_jax.models import armorm, hf  # noqa: E402
from eva_jax.models.tokenizer import load_tokenizer  # noqa: E402

VOCAB = 128256  # Llama 3's, so that the special ids below are the real ones.
SPECIALS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
            "<|finetune_right_pad_id|>": 128004, "<|start_header_id|>": 128006,
            "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
# Pieces that are single tokens in Llama 3 (ids as there); every other piece is one character.
WORDS = {"\n\n": 271, "user": 882, "assistant": 78191}
CHARS = string.ascii_letters + string.digits + " .,?!'\n"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
            "{% endif %}")
OBJECTIVES, GATING_HIDDEN, GATING_LAYERS, TEMPERATURE = 5, 16, 2, 2.0
ARMO_CONFIG = {
    "architectures": ["LlamaForRewardModelWithGating"],
    "auto_map": {"AutoModelForSequenceClassification":
                 "modeling_custom.LlamaForRewardModelWithGating"},
    "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "hidden_act": "silu", "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009,
    "pad_token_id": 128004, "torch_dtype": "float32",
    # Not the published defaults (19, 1024, 3, 10), so that each one is shown to be read.
    "num_objectives": OBJECTIVES, "gating_hidden_dim": GATING_HIDDEN,
    "gating_n_hidden": GATING_LAYERS, "gating_temperature": TEMPERATURE,
}
PROMPTS = ["what is two plus two?", "hi", "name a colour", "count to five, slowly please",
           "why?"]
RESPONSES = ["four.", "hello there, how can i help you today?", "", "one two three four five",
             "because"]


def _llama3_chat_tokenizer():
  """A character-level transformers tokenizer with Llama 3's chat template and special ids."""
  pieces = {**{c: i for i, c in enumerate(CHARS)}, **WORDS, **SPECIALS}
  by_id = {i: p for p, i in pieces.items()}
  vocab = {by_id.get(i, f"<|reserved_{i}|>"): i for i in range(VOCAB)}
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                              for t in SPECIALS])
  backend.add_tokens([tokenizers.AddedToken(t, normalized=False) for t in WORDS])
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
      pad_token="<|finetune_right_pad_id|>")
  tok.chat_template = TEMPLATE
  return tok


def _torch_armorm(seed=0):
  """transformers' LlamaModel backbone and ArmoRM's head tensors, named as in its checkpoint."""
  torch.manual_seed(seed)
  fields = {k: v for k, v in ARMO_CONFIG.items()
            if k not in ("architectures", "auto_map", "model_type", "torch_dtype")}
  backbone = transformers.LlamaModel(transformers.LlamaConfig(**fields)).float().eval()
  with torch.no_grad():
    for name, p in backbone.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  d, dims = ARMO_CONFIG["hidden_size"], [32] + [GATING_HIDDEN] * GATING_LAYERS + [OBJECTIVES]
  head = {"regression_layer.weight": torch.randn(OBJECTIVES, d) / d ** 0.5,
          # Not symmetric, and not the identity the published init leaves: order matters.
          "reward_transform_matrix": torch.eye(OBJECTIVES) + 0.3 * torch.randn(OBJECTIVES,
                                                                               OBJECTIVES),
          "gating.logit_scale": torch.tensor([1.3])}
  for i in range(GATING_LAYERS + 1):
    head[f"gating.layers.{i}.weight"] = torch.randn(dims[i + 1], dims[i]) / dims[i] ** 0.5
    head[f"gating.layers.{i}.bias"] = 0.3 * torch.randn(dims[i + 1])
  return backbone, head


def _save(path, backbone, head):
  os.makedirs(path, exist_ok=True)
  tensors = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
  tensors.update(head)
  safetensors.torch.save_file(tensors, os.path.join(path, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(ARMO_CONFIG, f)
  return path


# The published modeling_custom.py, written out: the pattern as it hard-codes it, the score read
# before the first pad token, the gate at the pattern's last occurrence.
PUBLISHED_PATTERN = [128009, 128006, 78191, 128007, 271]


def _published_find_token_for_gating(ids):
  for j in range(len(ids) - len(PUBLISHED_PATTERN), -1, -1):
    if ids[j:j + len(PUBLISHED_PATTERN)] == PUBLISHED_PATTERN:
      return j
  raise ValueError("Token pattern not found in the list.")


def _published_forward(backbone, head, seqs, pad_id=128004):
  """ArmoRM's `score` of right-padded rows, called as the eva authors call it (ids only)."""
  t = max(map(len, seqs))
  input_ids = torch.tensor([s + [pad_id] * (t - len(s)) for s in seqs])
  with torch.no_grad():
    h = backbone(input_ids).last_hidden_state
    rows = torch.arange(len(seqs))
    lengths = (torch.eq(input_ids, pad_id).int().argmax(-1) - 1) % t
    rewards = h[rows, lengths] @ head["regression_layer.weight"].T
    x = h[rows, [_published_find_token_for_gating(ids.tolist()) for ids in input_ids]]
    for i in range(GATING_LAYERS + 1):
      x = x @ head[f"gating.layers.{i}.weight"].T + head[f"gating.layers.{i}.bias"]
      x = torch.relu(x) if i < GATING_LAYERS else x
    gate = torch.softmax(x / TEMPERATURE, dim=1) * head["gating.logit_scale"][0]
    score = torch.sum(gate * (rewards @ head["reward_transform_matrix"]), dim=1)
  return score.numpy(), gate.numpy()


@pytest.fixture(scope="module")
def armo(tmp_path_factory):
  backbone, head = _torch_armorm()
  path = _save(str(tmp_path_factory.mktemp("armorm")), backbone, head)
  tok = _llama3_chat_tokenizer()
  tok.save_pretrained(path)
  return backbone, head, path, tok


def _chat_ids(tok, prompt, response):
  text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": response}], tokenize=False)
  return tok.encode(text, add_special_tokens=False)


def _reward_cfg(path):
  return ml_collections.ConfigDict(dict(kind="armorm", path=path, max_length=64, batch_size=2,
                                        truncated_penalty=0.0))


def test_scores_match_the_published_forward(armo):
  backbone, head, path, tok = armo
  scorer = reward.SCORERS.get("armorm")(_reward_cfg(path))
  assert isinstance(scorer, reward.ArmoRMScorer)
  assert scorer.head == armorm.ArmoHeadConfig(OBJECTIVES, TEMPERATURE, GATING_HIDDEN,
                                              GATING_LAYERS, tuple(PUBLISHED_PATTERN))
  ids = [_chat_ids(tok, p, r) for p, r in zip(PROMPTS, RESPONSES)]
  assert [scorer.token_ids(p, r) for p, r in zip(PROMPTS, RESPONSES)] == ids
  ours = scorer.score(PROMPTS, RESPONSES)
  ref, _ = _published_forward(backbone, head, ids)
  diff = np.abs(ours - ref).max()
  print(f"armorm: max |score diff| vs published forward = {diff:.1e} "
        f"(scores {np.round(ref, 3).tolist()})")
  assert ours.dtype == np.float32 and ours.shape == (5,)
  assert diff <= 1e-5 * max(1.0, np.abs(ref).max())
  assert np.ptp(ref) > 0.1  # The rows differ: a misplaced read would show.


def test_gate_is_read_at_the_prompt_end_on_either_padding_side(armo):
  backbone, head, path, tok = armo
  config, params, head_cfg, head_params = armorm.load(path)
  prompt = "count to five, slowly please"
  responses = ["one two three four five", "no", "five four three two one, done!"]
  seqs = [_chat_ids(tok, prompt, r) for r in responses]
  prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
  prompt_ids = tok.encode(prompt_ids, add_special_tokens=False)
  # The <|eot_id|> that closes the user turn, just before the assistant header.
  prompt_end = len(prompt_ids) - len(PUBLISHED_PATTERN)
  assert prompt_ids[prompt_end] == SPECIALS["<|eot_id|>"]
  t = max(map(len, seqs)) + 2
  for side in ("right", "left"):
    tokens = np.full((len(seqs), t), SPECIALS["<|finetune_right_pad_id|>"], np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for r, s in enumerate(seqs):
      start = 0 if side == "right" else t - len(s)
      tokens[r, start:start + len(s)], mask[r, start:start + len(s)] = s, 1
    pos = np.asarray(armorm.gating_positions(tokens, mask, head_cfg.gating_pattern))
    offsets = np.zeros(3, int) if side == "right" else t - np.array(list(map(len, seqs)))
    assert pos.tolist() == (offsets + prompt_end).tolist()
    score, rewards, gate = jax.jit(armorm.outputs, static_argnums=(0, 1))(
        config, head_cfg, {"model": params, "head": head_params}, tokens, mask)
    # One prompt: one gate, whatever the response; the rewards and scores differ.
    np.testing.assert_allclose(np.asarray(gate), np.asarray(gate)[:1].repeat(3, 0), atol=1e-6)
    assert np.ptp(np.asarray(rewards)[:, 0]) > 1e-3
    ref_score, ref_gate = _published_forward(backbone, head, seqs)
    np.testing.assert_allclose(np.asarray(gate), ref_gate, atol=1e-5)
    np.testing.assert_allclose(np.asarray(score), ref_score, atol=1e-5)


def test_sharded_scores_equal_unsharded(armo):
  _, _, path, _ = armo
  mesh = sharding.make_mesh(data=4, fsdp=2)
  sharded = reward.load_armorm(path, mesh=mesh, max_length=64, batch_size=8)
  assert sharded.params["model"]["layers"]["mlp"]["up"].sharding.spec[1] == "fsdp"
  plain = reward.load_armorm(path, max_length=64, batch_size=8)
  np.testing.assert_allclose(sharded.score(PROMPTS, RESPONSES), plain.score(PROMPTS, RESPONSES),
                             atol=1e-5)


def _copy_without(src, dst, drop=(), add=None):
  shutil.copytree(src, dst)
  tensors = safetensors.torch.load_file(os.path.join(dst, "model.safetensors"))
  tensors = {k: v for k, v in tensors.items() if k not in drop}
  tensors.update(add or {})
  safetensors.torch.save_file(tensors, os.path.join(dst, "model.safetensors"),
                              metadata={"format": "pt"})
  return str(dst)


@pytest.mark.parametrize("drop", ["gating.layers.2.bias", "regression_layer.weight",
                                  "reward_transform_matrix", "model.layers.1.mlp.up_proj.weight"])
def test_missing_tensor_is_named(armo, tmp_path, drop):
  path = _copy_without(armo[2], tmp_path / "armo", drop=[drop])
  with pytest.raises(ValueError, match=f"missing tensor '{drop}'"):
    armorm.load(path)


def test_unexpected_tensor_and_plain_load_are_refused(armo, tmp_path):
  path = _copy_without(armo[2], tmp_path / "armo", add={"gating.extra.weight": torch.zeros(2)})
  with pytest.raises(ValueError, match="unexpected tensor 'gating.extra.weight'"):
    armorm.load(path)
  # hf.load has no place for the gate: it names the loader that has.
  with pytest.raises(ValueError, match="unexpected tensor 'gating.*armorm.load"):
    hf.load(armo[2])
  bad_shape = _copy_without(armo[2], tmp_path / "armo2",
                            add={"gating.layers.0.bias": torch.zeros(3)})
  with pytest.raises(ValueError, match="'gating.layers.0.bias' has shape"):
    armorm.load(bad_shape)


def test_tokenizer_without_the_gating_pattern_is_refused(armo):
  _, _, path, _ = armo
  config, params, head, head_params = armorm.load(path)
  other = dataclasses.replace(head, gating_pattern=(1, 2, 3))
  with pytest.raises(ValueError, match="gating pattern"):
    reward.ArmoRMScorer(config, params, other, head_params, load_tokenizer(path), max_length=64,
                        batch_size=2)
