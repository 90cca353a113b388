"""Tiny random transformers (PyTorch) models of each family, saved as local HF folders.

Shared by the model, sampling and reward parity tests. Every model is float32, built from a fixed
seed, with sizes small enough that a CPU forward takes milliseconds.
"""
from __future__ import annotations

import numpy as np

VOCAB = 97

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_config(family: str, num_labels: int = 0):
  import transformers as T
  if family == "llama":
    cfg = T.LlamaConfig(**_COMMON, head_dim=8, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  elif family == "gemma2":
    # A window of 5 so that the test sequences (up to 12 tokens) cross it.
    cfg = T.Gemma2Config(**_COMMON, head_dim=16, sliding_window=5, query_pre_attn_scalar=12,
                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
  elif family == "qwen2":
    cfg = T.Qwen2Config(**_COMMON, tie_word_embeddings=True, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0})
  elif family == "mistral":
    # head_dim 12 != hidden / heads (8), and a window of 5 on every layer.
    cfg = T.MistralConfig(**_COMMON, head_dim=12, sliding_window=5, tie_word_embeddings=False)
  else:
    raise ValueError(family)
  if num_labels:
    cfg.num_labels = num_labels
  return cfg


def torch_model(family: str, num_labels: int = 0, seed: int = 0):
  import torch
  import transformers as T
  torch.manual_seed(seed)
  cfg = hf_config(family, num_labels)
  prefix = {"llama": "Llama", "gemma2": "Gemma2", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
  head = "ForSequenceClassification" if num_labels else "ForCausalLM"
  model = getattr(T, prefix + head)(cfg).float().eval()
  # Random init leaves norms at identity and biases at zero; perturb them so a swapped or
  # missing norm/bias would show in the logits.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_torch_model(model, path: str) -> str:
  model.save_pretrained(path, safe_serialization=True)
  return path


def ragged_batch(lengths, total: int, seed: int = 0, side: str = "right"):
  """int32 tokens [B, total] and a mask, rows of the given real lengths, padded with 0."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), total), np.int32)
  mask = np.zeros((len(lengths), total), np.int32)
  for i, n in enumerate(lengths):
    row = rng.integers(3, VOCAB, size=n)
    if side == "right":
      tokens[i, :n], mask[i, :n] = row, 1
    else:
      tokens[i, total - n:], mask[i, total - n:] = row, 1
  return tokens, mask
