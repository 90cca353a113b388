"""W1: solver sampling throughput against transformers `generate` (BENCHMARKS.md).

The Llama-shaped reference model (vocab 32000, hidden 512, MLP 1408, 8 layers, 8 query / 2 KV
heads, untied, float32, about 55M parameters) is built in PyTorch from a fixed seed, saved as an
HF folder and loaded into ours with `hf.load`, so both sides run the same weights. 8 prompts of
64 tokens, 6 samples each, exactly 128 new tokens (no eos), temperature 0.7, top-p 0.9 (top-k
off on both sides). Each side is timed after a warm-up (ours: after compiling), best of
`--repeats` runs, the two sides interleaved; prints one JSON line with generated tokens/s for
both and their ratio, plus the ratio of process CPU seconds and the 1-minute load average: on a
busy shared machine both figures move (PyTorch's threads spin while they wait for a core), so
only runs at a low load average compare cleanly. `--profile` adds the seconds of one decode
step and of one token selection at W1's shapes.

  python experiments/benchmarks/w1_sampling.py [--repeats 3] [--no-peer] [--profile]
"""
import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from eva_jax import context, models, sampling, token_select
from eva_jax.models import hf

PROMPTS, SAMPLES, PROMPT_LEN, NEW_TOKENS = 8, 6, 64, 128
TEMPERATURE, TOP_P = 0.7, 0.9


def _torch_model():
  import torch
  import transformers as T
  torch.manual_seed(0)
  cfg = T.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                      tie_word_embeddings=False, max_position_embeddings=2048,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
  return T.LlamaForCausalLM(cfg).float().eval()


def _best_of(fn, repeats: int) -> float:
  return min(_timed(fn, repeats))[0]


def _timed(fn, repeats: int) -> list[tuple[float, float]]:
  """(wall seconds, process CPU seconds) of each run."""
  times = []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    times.append((time.perf_counter() - wall, time.process_time() - cpu))
  return times


def _ours(config, params, prompts, mask):
  """A function that samples W1 with our sampler."""
  def run():
    out = sampling.sample(config, params, prompts, mask, rng=jax.random.key(0),
                          num_samples=SAMPLES, max_new_tokens=NEW_TOKENS,
                          temperature=TEMPERATURE, top_p=TOP_P, top_k=0, eos_ids=())
    jax.block_until_ready(out)
    assert int(out.lengths.min()) == NEW_TOKENS
  return run


def _peer(model, prompts, mask):
  """A function that samples W1 with transformers `generate`."""
  import torch
  ids, attn = torch.tensor(prompts, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

  def run():
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                           temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                           num_return_sequences=SAMPLES, max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, pad_token_id=0)
    assert out.shape == (PROMPTS * SAMPLES, PROMPT_LEN + NEW_TOKENS)
  return run


def _profile(config, params) -> dict:
  """Seconds of one decode step (the model, LM head included) and of one token selection, each
  alone, at W1's shapes (48 rows, cache half full)."""
  rows = PROMPTS * SAMPLES
  prompt_cache = jax.tree.map(lambda c: jnp.swapaxes(c, 2, 3),
                              models.init_cache(config, PROMPTS, PROMPT_LEN))
  gen_cache = models.init_generated_cache(config, rows, NEW_TOKENS - 1, jnp.float32)
  prompt_pos = jnp.tile(jnp.arange(PROMPT_LEN), (PROMPTS, 1))
  tokens = jnp.ones((rows,), jnp.int32)
  half = NEW_TOKENS // 2

  @jax.jit
  def step(params, prompt_cache, gen_cache):
    split = models.SplitCache(prompt_cache["k"], prompt_cache["v"], gen_cache["k"],
                              gen_cache["v"], prompt_pos, prompt_pos >= 0, half)
    hidden, new_kv = models.sample_step(config, params, tokens, tokens * (PROMPT_LEN + half),
                                        split)
    return models.logits_from_hidden(config, params, hidden), new_kv

  keys = jax.random.split(jax.random.key(0), rows)
  select = jax.jit(lambda logits, keys: token_select.select_tokens(
      logits, keys, temperature=TEMPERATURE, top_p=TOP_P))
  logits, _ = step(params, prompt_cache, gen_cache)
  jax.block_until_ready(select(logits, keys))
  t_step = _best_of(lambda: jax.block_until_ready(step(params, prompt_cache, gen_cache)), 5)
  t_select = _best_of(lambda: jax.block_until_ready(select(logits, keys)), 5)
  return {"decode_step_s": round(t_step, 4), "select_s": round(t_select, 4)}


def main():
  context.skip_absent_tpu()  # No libtpu start-up errors on a CPU machine's stderr.
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-peer", action="store_true")
  parser.add_argument("--profile", action="store_true")
  args = parser.parse_args()

  torch_model = _torch_model()
  with tempfile.TemporaryDirectory() as folder:
    torch_model.save_pretrained(folder, safe_serialization=True)
    config, params = hf.load(folder)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, config.vocab_size, (PROMPTS, PROMPT_LEN)).astype(np.int32)
  mask = np.ones_like(prompts)
  generated = PROMPTS * SAMPLES * NEW_TOKENS

  result = {"workload": "W1", "backend": jax.default_backend()}
  runs = {"ours": _ours(config, params, prompts, mask)}
  if not args.no_peer:
    runs["peer"] = _peer(torch_model, prompts, mask)
  for run in runs.values():
    run()  # Compile / warm up.
  # Interleaved, so that both sides meet the same load on a shared machine; best of each.
  times = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, run in runs.items():
      times[name] += _timed(run, 1)
  ours_s, ours_cpu = min(times["ours"])
  result["ours_tokens_per_s"] = round(generated / ours_s, 1)
  if not args.no_peer:
    peer_s, peer_cpu = min(times["peer"])
    result["peer_tokens_per_s"] = round(generated / peer_s, 1)
    result["ratio"] = round(peer_s / ours_s, 2)
    result["ratio_cpu_time"] = round(peer_cpu / ours_cpu, 2)
  result["load_average"] = round(os.getloadavg()[0], 1)
  if args.profile:
    result.update(_profile(config, params))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
