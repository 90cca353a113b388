"""W5: real-length sampling with SmolLM2-135M-Instruct against transformers `generate`.

BENCHMARKS.md: 64 Arena-Hard prompts x 6 samples through the chat template, up to 256 new tokens
stopping at EOS (<|im_end|>), temperature 0.7, top-p 0.9 (top-k off on both sides). Both sides
run the same float32 weights (`eva_jax.models.smollm2.cached_path()`, loaded by `hf.load` and by
transformers), in chunks of `--batch_size` prompts: ours through `sampling.sample_batched`
(right-padded), the peer through `generate(num_return_sequences=6)` (left-padded, as it needs).
With `--continuous`, ours also runs with continuous batching (`eva_jax.continuous`: one pool of
`--batch_size` x 6 KV-cache slots over all prompts, in prompt groups of `--group` slots, refilled
inside the decode loop), timed the same way beside the fixed chunks.
Prompts are the first ones of the file whose chat-templated length is at most
`--max_prompt_tokens`.

Figures: generated tokens/s of each side (its own responses' tokens, EOS included, over its own
wall time: the responses are random, so the two sides generate different amounts), their ratio,
and the share of row-steps spent on rows that had already finished: a chunk decodes until its
longest response ends, so 1 - (sum of lengths) / (rows x steps run). Ours is timed after a
warm-up run of the same shapes (its compile time is reported separately); the two sides run
one after the other, `--repeats` times, best of each. Prints one JSON line.

  python experiments/benchmarks/w5_real_sampling.py                       # full size
  python experiments/benchmarks/w5_real_sampling.py --prompts 16 --max_new_tokens 128  # smoke
  python experiments/benchmarks/w5_real_sampling.py --prompts 8 --batch_size 8 --continuous
"""
import argparse
import json
import os
import time

import jax
import numpy as np

from eva_jax import context, continuous, sampling
from eva_jax.models import hf, smollm2
from eva_jax.models.tokenizer import load_tokenizer

ARENA = os.environ.get("EVA_SHARED_DATA", "/work/shared/data") + \
    "/arena_hard_v0.1_questions.jsonl"


def _prompt_ids(tok, num: int, max_tokens: int) -> list[list[int]]:
  with open(ARENA) as f:
    questions = [json.loads(line)["turns"][0]["content"] for line in f]
  ids = []
  for question in questions:
    seq = tok.apply_chat_template(question)
    if len(seq) <= max_tokens:
      ids.append(seq)
    if len(ids) == num:
      return ids
  raise ValueError(f"only {len(ids)} Arena-Hard prompts fit in {max_tokens} tokens")


def _wasted_share(lengths_per_chunk: list[np.ndarray]) -> float:
  """1 - generated / (rows x steps run), over chunks that each decode until their longest row."""
  done = sum(int(l.sum()) for l in lengths_per_chunk)
  run = sum(l.size * int(l.max()) for l in lengths_per_chunk)
  return 1.0 - done / run


def _ours(config, params, tok, ids, args):
  def run():
    lengths = []
    for start in range(0, len(ids), args.batch_size):
      out = sampling.sample_batched(
          config, params, ids[start:start + args.batch_size], rng=jax.random.key(start),
          batch_size=args.batch_size, num_samples=args.samples,
          max_new_tokens=args.max_new_tokens, pad_id=tok.pad_id, temperature=args.temperature,
          top_p=args.top_p, top_k=0, eos_ids=tok.eos_ids)
      lengths.append(np.asarray(out.lengths).ravel())
    return lengths
  return run


def _ours_continuous(config, params, tok, ids, args):
  def run():
    out = continuous.sample_continuous(
        config, params, ids, rng=jax.random.key(0), slots=args.batch_size * args.samples,
        group=args.group, chunk=args.chunk, num_samples=args.samples,
        max_new_tokens=args.max_new_tokens, pad_id=tok.pad_id, temperature=args.temperature,
        top_p=args.top_p, top_k=0, eos_ids=tok.eos_ids)
    return [out.lengths.ravel()]
  return run


def _peer(model, tok, ids, args):
  import torch
  eos = list(tok.eos_ids)

  def run():
    lengths = []
    for start in range(0, len(ids), args.batch_size):
      chunk = ids[start:start + args.batch_size]
      width = max(map(len, chunk))
      input_ids = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
      mask = torch.zeros((len(chunk), width), dtype=torch.long)
      for row, seq in enumerate(chunk):  # left padding, which generate needs
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
      with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True,
                             temperature=args.temperature, top_p=args.top_p, top_k=0,
                             num_return_sequences=args.samples,
                             max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                             pad_token_id=tok.pad_id)
      new = out[:, width:].numpy()
      is_eos = np.isin(new, eos)
      # Up to and including the first eos; a row without one ran the whole budget.
      lengths.append(np.where(is_eos.any(1), is_eos.argmax(1) + 1, new.shape[1]))
    return lengths
  return run


def main():
  context.skip_absent_tpu()  # No libtpu start-up errors on a CPU machine's stderr.
  parser = argparse.ArgumentParser()
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--samples", type=int, default=6)
  parser.add_argument("--max_new_tokens", type=int, default=256)
  parser.add_argument("--max_prompt_tokens", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=16, help="prompts per sampling call")
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--top_p", type=float, default=0.9)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--no-peer", action="store_true")
  parser.add_argument("--continuous", action="store_true",
                      help="also time continuous batching (eva_jax.continuous)")
  parser.add_argument("--group", type=int, default=None,
                      help="continuous: slots per prompt group (default: --samples)")
  parser.add_argument("--chunk", type=int, default=None,
                      help="continuous: prompts prefilled at a time (default: the groups)")
  args = parser.parse_args()

  path = smollm2.cached_path()
  config, params = hf.load(path)
  tok = load_tokenizer(path)
  ids = _prompt_ids(tok, args.prompts, args.max_prompt_tokens)
  runs = {"ours": _ours(config, params, tok, ids, args)}
  if args.continuous:
    runs["continuous"] = _ours_continuous(config, params, tok, ids, args)
  if not args.no_peer:
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runs["peer"] = _peer(model, tok, ids, args)

  result = {"workload": "W5", "backend": jax.default_backend(), "prompts": len(ids),
            "samples": args.samples, "max_new_tokens": args.max_new_tokens,
            "mean_prompt_tokens": round(float(np.mean([len(s) for s in ids])), 1)}
  for name in [n for n in runs if n != "peer"]:
    start = time.perf_counter()
    runs[name]()  # Compiles every shape the timed runs use.
    result[f"{name}_first_run_s"] = round(time.perf_counter() - start, 1)
  best = {}
  for _ in range(args.repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      lengths = run()
      seconds = time.perf_counter() - start
      tokens = sum(int(l.sum()) for l in lengths)
      if name not in best or tokens / seconds > best[name][0]:
        best[name] = (tokens / seconds, seconds, tokens, _wasted_share(lengths))
  for name, (rate, seconds, tokens, wasted) in best.items():
    result.update({f"{name}_tokens_per_s": round(rate, 1), f"{name}_s": round(seconds, 1),
                   f"{name}_generated_tokens": tokens})
    if name != "continuous":  # Its slots are refilled: no chunk runs to its longest row.
      result[f"{name}_finished_row_step_share"] = round(wasted, 3)
  if "peer" in best:
    result["ratio"] = round(best["ours"][0] / best["peer"][0], 2)
  if "continuous" in best:
    result["continuous_over_ours"] = round(best["continuous"][0] / best["ours"][0], 2)
    if "peer" in best:
      result["continuous_over_peer"] = round(best["continuous"][0] / best["peer"][0], 2)
  result["load_average"] = round(os.getloadavg()[0], 1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
