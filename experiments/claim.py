r"""The paper's claim at CPU scale: eva vs static under the paper's protocol, paired over seeds.

  python experiments/claim.py --workdir_root=/tmp/eva_claim
  python experiments/claim.py --workdir_root=/tmp/eva_claim --sweeps=eva_vs_static --seeds=0,1
  python experiments/claim.py --workdir_root=/tmp/eva_claim --summarize_only

The runs are the sweeps of configs/ablations.py (the embedded default under c.protocol "paper",
2 iterations): per seed, every arm first trains θ0 → θ1 on X1 without the creator, the same in
all arms, so it runs once per seed (`theta1_seed-<s>`, an arm with iterations 1) and each arm
starts from a copy of it (`eva_jax.protocol.fork_theta1`; a forked arm equals an unforked one,
tests/test_protocol.py). Then eva re-samples X1 with θ1 and evolves it, static takes X2, and
each ablation changes one creator setting. Every arm trains the same pairs per iteration and
the same update steps as static, except the subset arms, which train on the selected prompts'
pairs only (as the authors' subset ablation did).

Writes, per finished arm, `<results>/<run name>.json` (held-out reward after the warm-start, θ1
and the final iteration, per level, the win rate, the budget trained, the command), and
`<results>/claim.md`: per arm against eva (and eva against static) the per-seed differences of
the final held-out reward, their mean with a paired bootstrap 95 % interval, and the same per
difficulty level. Runs resume: finished arms are skipped, a killed one resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from eva_jax import protocol  # noqa: E402
from experiments import ablations, stats, sweep  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "ablations.py")
RESULTS = os.path.join(ROOT, "experiments", "results", "claim")
SWEEPS = ("eva_vs_static", "metric", "selection", "subset")


def _read(path: str):
  with open(path) as f:
    return json.load(f)


def _main_cmd(spec: str, folder: str, overrides: dict) -> list[str]:
  return [sys.executable, "-m", "eva_jax.main", *sweep.main_args(spec, folder, overrides)]


def _run(cmd: list[str], env: dict) -> float:
  print("[claim] " + shlex.join(cmd), flush=True)
  start = time.time()
  result = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
  if result.returncode:
    raise RuntimeError(f"run failed (exit {result.returncode}): {shlex.join(cmd)}; rerun to "
                       "resume it")
  return time.time() - start


def theta1_overrides(seed: int) -> dict:
  """The shared θ0 → θ1 iteration of a seed: an arm stopped after iteration 0 (the creator's
  fields do not enter iteration 0 under the paper protocol)."""
  return {"seed": seed, "iterations": 1, "creator.enabled": False}


def arms(names: Sequence[str], seeds: Sequence[int],
         only: Optional[str] = None) -> list[sweep.SweepRun]:
  """Every run of the sweeps for these seeds, each once (the eva arm is in every sweep); with
  `only`, the runs whose name matches that regular expression."""
  out: dict[str, sweep.SweepRun] = {}
  for name in names:
    for run in sweep.expand(f"{CONFIG}:{name}"):
      if run.overrides.get("seed") in seeds and (only is None or re.search(only, run.name)):
        out.setdefault(run.name, run)
  # Seed by seed, eva and static first: an experiment cut short still has whole seeds.
  headline = lambda r: (len(r.overrides) > 1, r.overrides.get("creator.enabled", True), r.name)  # noqa: E731
  return sorted(out.values(), key=lambda r: (r.overrides["seed"], *headline(r)))


def run_all(names: Sequence[str], seeds: Sequence[int], workdir_root: str, results: str,
            only: Optional[str] = None) -> None:
  root = os.path.abspath(workdir_root)
  env = sweep.local_env(root)
  spec = f"{CONFIG}:eva_vs_static"
  for run in arms(names, seeds, only):
    seed = run.overrides["seed"]
    folder = os.path.join(root, run.name)
    if ablations.read_run(folder, run.config.iterations) is None:
      prefix = os.path.join(root, f"theta1_seed-{seed}")
      if ablations.read_run(prefix, 1) is None:
        _run(_main_cmd(spec, prefix, theta1_overrides(seed)), env)
      if not os.path.exists(folder):
        protocol.fork_theta1(prefix, folder)
      wall = _run(_main_cmd(spec, folder, run.overrides), env)
      with open(os.path.join(folder, "claim_wall_seconds.json"), "w") as f:
        json.dump({"wall_seconds": wall}, f)
    write_run_json(run, folder, results)


def _levels(evaluation: dict) -> dict:
  return {str(k): float(v) for k, v in evaluation["heldout_by_level"].items()}


def write_run_json(run: sweep.SweepRun, folder: str, results: str) -> dict:
  iterations = run.config.iterations
  done = ablations.read_run(folder, iterations)
  evals = [_read(os.path.join(folder, f"iter_{t:03d}", "evaluate.json"))
           for t in range(iterations)]
  warm = _read(os.path.join(folder, "iter_000", "evaluate_warmstart.json"))
  wall_path = os.path.join(folder, "claim_wall_seconds.json")
  pairs = [_read(os.path.join(folder, f"iter_{t:03d}", "pairs.json")) for t in range(iterations)]
  out = {
      "run": run.name, "seed": run.overrides["seed"], "overrides": run.overrides,
      "command": shlex.join(["python", "-m", "eva_jax.main",
                             *sweep.main_args("configs/ablations.py:eva_vs_static",
                                              f"<root>/{run.name}", run.overrides)]),
      "forked_from": f"<root>/theta1_seed-{run.overrides['seed']} (experiments/claim.py)",
      "heldout_reward": done["heldout"],  # [warm-start, θ1, final]
      "heldout_by_level": {"warmstart": _levels(warm), "theta1": _levels(evals[0]),
                           "final": _levels(evals[-1])},
      "win_rate_vs_warmstart": done["win_rate"],
      "pairs_per_iteration": done["pairs"],
      "evolved_pairs_last_iteration": sum(p["source"] == "evolved" for p in pairs[-1]),
      "train_steps": done["train_steps"],
      "arm_wall_seconds": (_read(wall_path)["wall_seconds"] if os.path.exists(wall_path)
                           else None),
  }
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, f"{run.name}.json"), "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
  return out


def _variant(run_json: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in sorted(run_json["overrides"].items())
                  if k != "seed") or "eva (default)"


def load(results: str) -> dict[str, dict[int, dict]]:
  """{variant: {seed: run json}} of every arm written under `results`."""
  out: dict[str, dict[int, dict]] = {}
  for name in sorted(os.listdir(results)) if os.path.isdir(results) else []:
    if name.endswith(".json"):
      run = _read(os.path.join(results, name))
      out.setdefault(_variant(run), {})[run["seed"]] = run
  return out


def _fmt(ci: tuple) -> str:
  mean, lo, hi = ci
  return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def paired(a: dict[int, dict], b: dict[int, dict], key) -> tuple[list[int], np.ndarray]:
  seeds = sorted(set(a) & set(b))
  return seeds, np.asarray([key(a[s]) - key(b[s]) for s in seeds], np.float64)


def markdown(table: dict[str, dict[int, dict]]) -> str:
  eva = table.get("eva (default)", {})
  static = table.get("creator.enabled=False", {})
  levels = sorted({lv for runs in table.values() for r in runs.values()
                   for lv in r["heldout_by_level"]["final"]}, key=int)
  final = lambda r: r["heldout_reward"][-1]  # noqa: E731
  lines = ["# eva vs static under the paper's protocol, CPU scale", "",
           "Final held-out reward (greedy answers, programmatic reward) after θ1 → θ1̃ (eva) or "
           "θ1 → θ2 (static); every arm of a seed starts from the same θ1. Differences are "
           "paired per seed; intervals are paired bootstrap 95 % intervals over seeds "
           "(experiments/stats.py, 10 000 resamples). Produced by experiments/claim.py from "
           "the per-run JSON files beside this one.", ""]

  def block(title: str, a: dict, b: dict) -> None:
    seeds, d = paired(a, b, final)
    if not seeds:
      return
    lines.extend([f"## {title}", "",
                  f"seeds {seeds}: per-seed difference of the final held-out reward "
                  + ", ".join(f"{x:+.4f}" for x in d), "",
                  f"mean difference {_fmt(stats.paired_bootstrap_ci(d))}", "",
                  "| level | mean difference [95 % CI] |", "|---|---|"])
    for lv in levels:
      _, dl = paired(a, b, lambda r: r["heldout_by_level"]["final"][lv])
      lines.append(f"| {lv} | {_fmt(stats.paired_bootstrap_ci(dl))} |")
    lines.append("")

  block("eva − static (the claim)", eva, static)
  lines.extend(["## Every arm", "",
                "| arm | seeds | θ1 (mean) | final held-out reward (mean) | − eva, mean [95 % CI] | "
                "− static, mean [95 % CI] | pairs / iteration | update steps |",
                "|---|---|---|---|---|---|---|---|"])
  for name, runs in sorted(table.items()):
    finals = [final(r) for r in runs.values()]
    vs = []
    for ref in (eva, static):
      seeds, d = paired(runs, ref, final)
      vs.append(_fmt(stats.paired_bootstrap_ci(d)) if runs is not ref and seeds else "–")
    pairs = np.mean([np.mean(r["pairs_per_iteration"]) for r in runs.values()])
    steps = np.mean([r["train_steps"] for r in runs.values()])
    theta1 = np.mean([r["heldout_reward"][1] for r in runs.values()])
    lines.append(f"| {name} | {len(runs)} | {theta1:.4f} | {np.mean(finals):.4f} | {vs[0]} | "
                 f"{vs[1]} | {pairs:.0f} | {steps:.0f} |")
  lines.append("")
  for name, runs in sorted(table.items()):
    if name in ("eva (default)", "creator.enabled=False"):
      continue
    block(f"{name} − eva", runs, eva)
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir_root", required=True)
  parser.add_argument("--sweeps", default=",".join(SWEEPS))
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--results", default=RESULTS)
  parser.add_argument("--summarize_only", action="store_true")
  parser.add_argument("--only", default=None,
                      help="Run only the arms whose run name matches this regular expression "
                      "(e.g. to split the arms between two processes; never two processes on "
                      "one seed's theta1 run).")
  args = parser.parse_args(argv)
  if not args.summarize_only:
    run_all(args.sweeps.split(","), [int(s) for s in args.seeds.split(",")], args.workdir_root,
            args.results, args.only)
  text = markdown(load(args.results))
  with open(os.path.join(args.results, "claim.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
