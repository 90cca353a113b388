"""W3: reward scoring throughput against transformers LlamaForSequenceClassification.

The reference model (Llama-shaped: vocab 32000, hidden 512, MLP 1408, 8 layers, 8 query / 2 KV
heads, untied, float32) with a scalar head; 48 sequences of 256 tokens. A random transformers
model is saved to a temporary folder and loaded by `hf.load`, so both sides hold the same weights.
Ours is `reward.score_sequences` (host batching, one jitted forward over [48, 256], scores back on
the host), timed after its compile; the peer is the transformers forward under torch.no_grad on
the same ids. Each side's best of REPEATS runs, interleaved; one JSON line: ratio is our
throughput over the peer's, ratio_cpu_time the same from the CPU seconds of those runs.

  python experiments/benchmarks/w3_reward.py [--repeats 3]
"""
import argparse
import json
import tempfile
import time

import numpy as np
import torch
import transformers

from eva_jax import context, reward
from eva_jax.models import hf

SEQUENCES, LENGTH = 48, 256


def _peer_model():
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
      num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
      max_position_embeddings=LENGTH, rms_norm_eps=1e-5, num_labels=1, pad_token_id=0)
  return transformers.LlamaForSequenceClassification(cfg).float().eval()


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process over all its threads) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def main():
  context.skip_absent_tpu()  # No libtpu start-up errors on a CPU machine's stderr.
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  model = _peer_model()
  with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path, safe_serialization=True)
    config, params = hf.load(path)
  ids_BxT = np.random.default_rng(0).integers(1, config.vocab_size, (SEQUENCES, LENGTH))
  seqs = [row.tolist() for row in ids_BxT]

  def ours():
    return reward.score_sequences(config, params, seqs, pad_id=0, batch_size=SEQUENCES,
                                  length_buckets=(LENGTH,))

  ids = torch.tensor(ids_BxT, dtype=torch.long)
  mask = torch.ones_like(ids)

  def peer():
    with torch.no_grad():
      return model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()

  compile_start = time.perf_counter()
  ours_scores = ours()
  compile_s = time.perf_counter() - compile_start
  max_diff = float(np.abs(ours_scores - peer()).max())
  ours_runs, peer_runs = [], []
  for _ in range(args.repeats):  # Interleaved, so both sides see the same machine load.
    ours_runs.append(_timed(ours))
    peer_runs.append(_timed(peer))
  (ours_s, ours_cpu), (peer_s, peer_cpu) = min(ours_runs), min(peer_runs)
  print(json.dumps({
      "workload": "W3", "sequences": SEQUENCES, "length": LENGTH,
      "ours_sequences_per_s": round(SEQUENCES / ours_s, 2),
      "transformers_sequences_per_s": round(SEQUENCES / peer_s, 2),
      "ratio": round(peer_s / ours_s, 3),
      # CPU seconds of the fastest runs: less sensitive to other jobs on a shared machine.
      "ratio_cpu_time": round(peer_cpu / ours_cpu, 3), "ours_compile_s": round(compile_s, 2),
      "max_abs_score_diff": max_diff, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
