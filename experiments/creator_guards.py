"""Creator guards on a real model: SmolLM2-135M-Instruct rewrites Arena-Hard prompts.

Runs `LMEvolver` (`--chained` steps, default 2, up to 256 new tokens, temperature 0.7, top-p
0.9) on `--prompts` Arena-Hard prompts of at most `--max_words` words (drawn with `--seed`),
filters every candidate once with the old filters (the guards switched off) and once with every
guard on (`reject_answers=True`), and writes one JSON line per candidate (text, parent, method,
step, the two verdicts) to `--out`. The hand labels and the table (creator_guards.md) are added
by hand afterwards.

  python experiments/creator_guards.py --out /tmp/creator_guards_raw.jsonl
"""
import argparse
import json
import time

import jax
import numpy as np

from eva_jax import filters
from eva_jax.buffer import PromptBuffer
from eva_jax.lm_evolver import LMEvolver
from eva_jax.models import hf, smollm2
from eva_jax.models.tokenizer import load_tokenizer

ARENA = "/work/shared/data/arena_hard_v0.1_questions.jsonl"


class RecordingEvolver(LMEvolver):
  """Keeps every raw reply, so that unparsed ones (text None) can be read too."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.replies = []

  def _parse(self, reply, finished):
    self.replies.append((reply, finished))
    return super()._parse(reply, finished)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--prompts", type=int, default=40)
  parser.add_argument("--max_words", type=int, default=120)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--chained", type=int, default=2)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  with open(ARENA) as f:
    questions = [json.loads(line)["turns"][0]["content"] for line in f]
  short = [q for q in questions if len(q.split()) <= args.max_words]
  picked = np.random.default_rng(args.seed).choice(len(short), args.prompts, replace=False)
  buffer = PromptBuffer()
  records = [buffer.add(short[i], iteration=0) for i in sorted(picked)]

  path = smollm2.cached_path()
  config, params = hf.load(path)
  tok = load_tokenizer(path)
  evolver = RecordingEvolver(config, params, tok, num_chained=args.chained,
                            max_new_tokens=256, temperature=0.7, top_p=0.9,
                            batch_size=args.prompts)
  start = time.time()
  cands = evolver.evolve(records, rng=args.seed, iteration=1)
  print(f"{len(cands)} candidates in {time.time() - start:.0f} s", flush=True)
  # Replies come step by step, chain by chain; candidates chain by chain, step by step.
  order = sorted(range(len(cands)), key=lambda i: (cands[i].step, i))
  raw = {i: evolver.replies[k] for k, i in enumerate(order)}
  with open(args.out + ".raw", "w") as f:  # the expensive part, kept whatever follows
    json.dump([[c.parent_id, c.method, c.step, c.text, *raw[i]] for i, c in enumerate(cands)], f)

  # Each candidate against the text it rewrote (as creator.evolve_round filters them).
  texts = {r.id: r.text for r in records}
  parents, previous = [], {}
  for cand in cands:
    parents.append(texts[cand.parent_id] if cand.step == 1 else previous[cand.parent_id])
    previous[cand.parent_id] = cand.text or ""
  base = [r.text for r in records]
  count = lambda t: len(tok.encode(t))  # noqa: E731
  verdicts = {}
  for name, kwargs in (("old", dict(reply_patterns=(), templates=("",))),
                       ("new", dict(reject_answers=True))):
    kept, rejected = filters.filter_candidates([c.text for c in cands], parents, base,
                                               tokenizer_len_fn=count, max_tokens=1024, **kwargs)
    verdicts[name] = {**dict(rejected), **{i: "kept" for i in kept}}
    print(name, "kept", len(kept), {k: v for k, v in filters.reason_counts(rejected).items() if v})
  with open(args.out, "w") as f:
    for i, (cand, parent) in enumerate(zip(cands, parents)):
      f.write(json.dumps({"index": i, "parent_id": cand.parent_id, "method": cand.method,
                          "step": cand.step, "parent": parent, "text": cand.text,
                          "reply": raw[i][0], "finished": raw[i][1],
                          "old_filters": verdicts["old"][i], "new_guards": verdicts["new"][i]})
              + "\n")


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")
  main()
