"""Which base prompts each iteration draws, and whether the creator runs in it (`c.protocol`).

  "fresh"  a new chunk of base prompts every iteration, the creator in every one (the static
           baseline: never). Our default: each iteration is one eva step on new prompts.
  "paper"  the paper's protocol (Ye et al., "Evolving Alignment via Asymmetric Self-Play",
           Sec. 4): both arms first train θ0 → θ1 on chunk X1 without the creator; then eva
           re-samples X1 with θ1, evolves it and trains θ1 → θ1̃, while static trains θ1 → θ2
           on a new chunk X2.
"""
from __future__ import annotations

import os
import shutil

PROTOCOLS = ("fresh", "paper")


def iteration_plan(protocol: str, t: int, creator_enabled: bool) -> tuple[int, bool]:
  """(the chunk of base prompts iteration t draws, whether the creator runs in it).

  Under "paper", iteration 0 is the same in both arms (so they share θ1 exactly, seed for
  seed); from t ≥ 1 eva takes chunk t − 1 again, now with the creator, and static chunk t. eva
  thus never sees a human prompt static has not, and each iteration of the two arms trains on
  the same pair budget. iterations = 2 is the paper's main table; iterations = 3 the authors'
  continual "split-by-3" runs (static X1 → X2 → X3; eva X1 → X̃1 → X̃2).
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  if protocol == "fresh":
    return t, creator_enabled
  if t == 0:
    return 0, False
  return (t - 1, True) if creator_enabled else (t, False)


# What a fork leaves behind: the source arm's own config and run records, its later
# iterations, and iteration 0's evaluation (it records the creator metric's informativeness of
# the source arm; the new arm recomputes it, which costs one held-out pass).
_NOT_FORKED = ("config.json", "run_info.json", "report.md", "plots", "tb")


def fork_theta1(src: str, dst: str) -> None:
  """Starts another arm of the paper protocol from an arm that has trained θ1.

  Under "paper" iteration 0 (θ0 → θ1 on X1, no creator) is the same in every arm of a seed,
  so an experiment computes it once (an arm run with iterations = 1) and forks each arm from
  it: `dst` gets the warm-start, iteration 0's artifacts and checkpoints 0 and 1; then
  `python -m eva_jax.main --workdir=dst` with the arm's config resumes at iteration 1, as the
  runner resumes any run. tests/test_protocol.py checks a forked arm equals an unforked one.
  Local folders only.
  """
  steps = os.path.join(src, "checkpoints")
  have = set(os.listdir(steps)) if os.path.isdir(steps) else set()
  if not {"0", "1"} <= have or not os.path.exists(os.path.join(src, "iter_000", "pairs.json")):
    raise ValueError(f"fork_theta1: {src!r} has no finished θ0 → θ1 (needs iter_000/ and "
                     f"checkpoints 0 and 1; have checkpoints {sorted(have)}): run it with "
                     "iterations=1, or checkpoint.keep above its iterations")
  if os.path.exists(dst) and os.listdir(dst):
    raise ValueError(f"fork_theta1: {dst!r} is not empty")
  os.makedirs(dst, exist_ok=True)
  for name in os.listdir(src):
    if name in _NOT_FORKED or (name.startswith("iter_") and name != "iter_000"):
      continue
    if name == "checkpoints":
      for step in ("0", "1"):
        shutil.copytree(os.path.join(steps, step), os.path.join(dst, name, step))
    elif name == "iter_000":
      shutil.copytree(os.path.join(src, name), os.path.join(dst, name),
                      ignore=shutil.ignore_patterns("evaluate.json"))
    elif os.path.isdir(os.path.join(src, name)):
      shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
    else:
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
