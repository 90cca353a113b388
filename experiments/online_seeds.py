"""The default online run (`configs/online.py`) over several seeds: wall time and held-out gain.

  python experiments/online_seeds.py --workdir_root=/tmp/eva_online_seeds
  python experiments/online_seeds.py --workdir_root=/tmp/eva_online_seeds --summarize_only
  python experiments/online_seeds.py --workdir_root=/tmp/x --seeds=1 --smoke --out=/tmp/x/results

Each seed is one `python -m eva_jax.main --config=configs/online.py --config.seed=<s>` in
<workdir_root>/online_seed-<s> (a finished run is skipped, an unfinished one resumes; the launch
and its bookkeeping are online_vs_offline.py's). Writes into --out, per seed online_seed-<s>.json
(held-out reward at step 0 and at the end, its curve, the hardest level, tokens, the wall time
of this script's launches and the commits they ran) and online_seeds.md (the per-seed table,
the mean gain and its 95 % bootstrap interval over seeds: experiments/stats.py).

The wall time is the process's, start-up and compiles included, on whatever else the machine was
running: the table says so, and the per-seed JSON keeps the launch time only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from experiments import online_vs_offline as ovo  # noqa: E402
from experiments import sweep  # noqa: E402
from experiments.stats import paired_bootstrap_ci  # noqa: E402

OUT = os.path.join(_ROOT, "experiments", "results", "online_default")
ARM = "online_eva"  # online_vs_offline's name for configs/online.py with the creator on.


def run_seed(seed: int, args) -> Optional[dict]:
  """Runs (or resumes, or skips) one seed; its summary, or None if it has not finished."""
  folder = os.path.abspath(os.path.join(args.workdir_root, f"online_seed-{seed}"))
  overrides = {"seed": seed}
  path, arg = sweep.split_spec(ovo.arm_spec(ARM, args.smoke))
  steps = sweep.apply_overrides(sweep.load_config_module(path).get_config(arg or ""),
                                overrides).online.steps
  result = ovo.read_online(folder, steps, 0)
  if result is None and not args.summarize_only:
    ovo.launch(ARM, seed, folder, overrides, args.smoke,
               sweep.local_env(os.path.abspath(args.workdir_root)))
    result = ovo.read_online(folder, steps, 0)
  if result is None:
    return None
  wall = os.path.join(folder, ovo.WALL_FILE)
  launches = {}
  if os.path.exists(wall):
    with open(wall) as f:
      launches = json.load(f)
  with open(os.path.join(folder, "online", f"evaluate_{result['steps']:06d}.json")) as f:
    win_rate = json.load(f)["win_rate"]
  return dict(result, win_rate=win_rate, seed=seed, workdir=folder, config=ovo.arm_spec(ARM, args.smoke),
              overrides=overrides, wall_seconds=launches.get("seconds"),
              commits=launches.get("commits"))


def markdown_table(runs: Sequence[dict], smoke: bool) -> str:
  lines = [f"# Default online run (configs/online.py{':smoke' * smoke}) per seed", "",
           "Wall time: this script's launch of `python -m eva_jax.main` (start-up and compiles "
           "included) on a shared 2-core CPU; other jobs ran beside it.", "",
           "| seed | steps | held-out at step 0 | held-out at the end | gain | hardest level "
           "(final) | win vs θ_0 | tokens | wall s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    wall = "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
    lines.append(f"| {r['seed']} | {r['steps']} | {r['heldout_start']:.3f} | "
                 f"{r['heldout_final']:.3f} | {r['heldout_final'] - r['heldout_start']:+.3f} | "
                 f"{r['hardest_level']} ({r['hardest_final']:.3f}) | {r['win_rate']:.3f} | "
                 f"{r['tokens']['total']:,} | "
                 f"{wall} |")
  if runs:
    mean, lo, hi = paired_bootstrap_ci([r["heldout_final"] - r["heldout_start"] for r in runs])
    lines += ["", f"Mean gain over {len(runs)} seeds: {mean:+.3f} (95 % bootstrap interval "
              f"{lo:+.3f} .. {hi:+.3f})."]
  return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir_root", required=True, help="Run folders go under it.")
  parser.add_argument("--seeds", type=int, default=5, help="Seeds 0 .. seeds-1.")
  parser.add_argument("--smoke", action="store_true", help="configs/online.py:smoke.")
  parser.add_argument("--out", default=OUT, help="Per-seed JSONs and the table.")
  parser.add_argument("--summarize_only", action="store_true",
                      help="Only read the finished runs and write the outputs.")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
  os.makedirs(args.out, exist_ok=True)
  runs = []
  for seed in range(args.seeds):
    result = run_seed(seed, args)
    if result is None:
      print(f"seed {seed}: not finished, left out")
      continue
    runs.append(result)
    with open(os.path.join(args.out, f"online_seed-{seed}.json"), "w") as f:
      json.dump(result, f, indent=1)
  table = markdown_table(runs, args.smoke)
  with open(os.path.join(args.out, "online_seeds.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
