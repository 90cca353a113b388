"""The ablations of issues 8 and 16 over seeds, then a table and a plot of the results.

  python experiments/ablations.py --workdir_root=/tmp/eva_ablations
  python experiments/ablations.py --workdir_root=/tmp/eva_ablations --names=metric --dry_run
  python experiments/ablations.py --workdir_root=/tmp/eva_ablations --summarize_only

Runs the sweeps of configs/ablations.py (eva_vs_static, metric, selection, subset; see there)
through experiments/sweep.py, one run after another, each in <workdir_root>/<run name>; a run
shared by several sweeps (the default variant) runs once. Then reads every run's held-out
evaluations (iter_000/evaluate_warmstart.json, iter_<t>/evaluate.json), its pairs and its update
steps, and writes into workdir_root:
  ablations.md    per sweep and variant: mean ± std over seeds of the final held-out reward,
                  its gain over the warm-start, the win rate against the warm-start, and the
                  budget actually trained (pairs per iteration, update steps)
  ablations.png   the gain per variant (bars: mean ± std, dots: seeds) and the held-out reward
                  over iterations (mean over seeds)
  ablations.json  the per-run numbers behind both
std is the sample standard deviation over seeds (ddof=1). A run that has not finished all its
iterations is left out and counted in the `seeds` column as missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

# `python experiments/ablations.py` puts experiments/ on sys.path, not the repo root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from experiments import sweep  # noqa: E402

CONFIG = os.path.join(sweep.ROOT, "configs", "ablations.py")
NAMES = tuple(sweep.load_config_module(CONFIG).ABLATIONS)


def _read(path: str):
  with open(path) as f:
    return json.load(f)


def read_run(folder: str, iterations: int) -> Optional[dict]:
  """One run's results, or None until all `iterations` have been evaluated.

  Returns {"heldout": [warm-start, after iteration 1, ..., after `iterations`], "win_rate":
  final win rate vs the warm-start, "pairs": pairs per iteration, "train_steps": update steps}.
  """
  paths = [os.path.join(folder, "iter_000", "evaluate_warmstart.json")] + [
      os.path.join(folder, f"iter_{t:03d}", "evaluate.json") for t in range(iterations)]
  if not all(os.path.exists(p) for p in paths):
    return None
  evals = [_read(p) for p in paths]
  pairs = [len(_read(os.path.join(folder, f"iter_{t:03d}", "pairs.json")))
           for t in range(iterations)]
  # A resumed run logs some train steps twice; distinct step ids count each update once.
  steps = set()
  with open(os.path.join(folder, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line) if line.strip() else {}
      if row.get("kind") == "train":
        steps.add(row["step"])
  return {"heldout": [e["heldout_reward"] for e in evals], "win_rate": evals[-1]["win_rate"],
          "pairs": pairs, "train_steps": len(steps)}


def summarize(workdir_root: str, names: Sequence[str] = NAMES) -> dict:
  """{sweep: {"field", "variants": [{"value", "runs": {run name: read_run or None}}]}}."""
  out = {}
  for name in names:
    runs = sweep.expand(f"{CONFIG}:{name}")
    field = _varied_field(runs)
    variants: dict[str, dict] = {}
    for run in runs:
      value = _get(run.config, field)
      entry = variants.setdefault(str(value), {"value": value, "runs": {}})
      entry["runs"][run.name] = read_run(os.path.join(workdir_root, run.name),
                                         run.config.iterations)
    out[name] = {"field": field, "variants": list(variants.values())}
  return out


def _varied_field(runs: Sequence[sweep.SweepRun]) -> str:
  # A field every run overrides to the same value (a sweep's FIXED override) does not vary.
  fields = {k for run in runs for k in run.overrides if k != "seed"
            if len({str(_get(r.config, k)) for r in runs}) > 1}
  if len(fields) != 1:
    raise ValueError(f"an ablation sweep varies one field besides the seed, got {sorted(fields)}")
  return fields.pop()


def _get(config, dotted: str):
  for key in dotted.split("."):
    config = config[key]
  return config


def _stats(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  if not values.size:
    return float("nan"), float("nan")
  return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else float("nan"))


def _pm(values: Sequence[float], digits: int = 3) -> str:
  mean, std = _stats(values)
  if np.isnan(mean):
    return "–"
  return f"{mean:.{digits}f}" + ("" if np.isnan(std) else f" ± {std:.{digits}f}")


def variant_numbers(variant: dict) -> dict[str, list]:
  """Per finished seed: final held-out reward, gain over the warm-start, win rate, budget."""
  done = [r for r in variant["runs"].values() if r is not None]
  return {"final": [r["heldout"][-1] for r in done],
          "gain": [r["heldout"][-1] - r["heldout"][0] for r in done],
          "win_rate": [r["win_rate"] for r in done if r["win_rate"] is not None],
          "pairs": [float(np.mean(r["pairs"])) for r in done],
          "train_steps": [r["train_steps"] for r in done],
          "curves": [r["heldout"] for r in done]}


def markdown_table(summary: dict) -> str:
  lines = ["# Ablations on the embedded default", "",
           "Mean ± std (sample std over seeds) of the held-out mean reward after the last "
           "iteration, its gain over the warm-start, and the win rate against the warm-start's "
           "answers; pairs per iteration and update steps show the budget each variant trained "
           "on.", ""]
  for name, sweep_summary in summary.items():
    lines += [f"## {name} (`{sweep_summary['field']}`)", "",
              "| variant | seeds | final held-out reward | gain over warm-start | "
              "win rate vs warm-start | pairs / iteration | update steps |",
              "|---|---|---|---|---|---|---|"]
    for variant in sweep_summary["variants"]:
      n = variant_numbers(variant)
      lines.append(f"| {variant['value']} | {len(n['final'])}/{len(variant['runs'])} | "
                   f"{_pm(n['final'])} | {_pm(n['gain'])} | {_pm(n['win_rate'])} | "
                   f"{_pm(n['pairs'], 1)} | {_pm(n['train_steps'], 1)} |")
    lines.append("")
  return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, len(summary), figsize=(4.2 * len(summary), 6.5), squeeze=False)
  for col, (name, sweep_summary) in enumerate(summary.items()):
    top, bottom = axes[0, col], axes[1, col]
    for i, variant in enumerate(sweep_summary["variants"]):
      n = variant_numbers(variant)
      mean, std = _stats(n["gain"])
      top.bar(i, 0 if np.isnan(mean) else mean, yerr=0 if np.isnan(std) else std, capsize=4,
              alpha=0.6, color=f"C{i}")
      top.plot([i] * len(n["gain"]), n["gain"], "k.")
      if n["curves"]:
        curves = np.asarray(n["curves"])
        bottom.plot(np.arange(curves.shape[1]), curves.mean(0), "o-", color=f"C{i}",
                    label=str(variant["value"]))
    top.axhline(0, color="k", lw=0.8)
    top.set_xticks(range(len(sweep_summary["variants"])),
                   [str(v["value"]) for v in sweep_summary["variants"]])
    top.set(title=f"{name} ({sweep_summary['field']})", ylabel="held-out gain over warm-start")
    bottom.set(xlabel="iteration (0 = warm-start)", ylabel="held-out reward (mean over seeds)")
    bottom.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_outputs(summary: dict, workdir_root: str) -> dict[str, str]:
  paths = {ext: os.path.join(workdir_root, f"ablations.{ext}") for ext in ("md", "png", "json")}
  with open(paths["md"], "w") as f:
    f.write(markdown_table(summary))
  plot(summary, paths["png"])
  with open(paths["json"], "w") as f:
    json.dump(summary, f, indent=1)
  return paths


def run_all(names: Sequence[str], args) -> None:
  """Each sweep's runs, in order; a run that an earlier sweep already ran is not repeated."""
  seen: set[str] = set()
  for name in names:
    spec = f"{CONFIG}:{name}"
    runs = [r for r in sweep.expand(spec) if r.name not in seen]
    seen.update(r.name for r in runs)
    if args.print_tpu_commands:
      sweep.print_tpu_commands(spec, runs, args)
    else:
      sweep.run_local(spec, runs, args.workdir_root, dry_run=args.dry_run)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--names", default=",".join(NAMES),
                      help=f"Comma-separated sweeps of configs/ablations.py ({', '.join(NAMES)}).")
  parser.add_argument("--summarize_only", action="store_true",
                      help="Only read the finished runs under --workdir_root and write the table.")
  sweep.add_flags(parser)
  args = parser.parse_args(argv)
  names = [n for n in args.names.split(",") if n]
  unknown = sorted(set(names) - set(NAMES))
  if unknown or not names:
    raise ValueError(f"--names: unknown sweep {unknown[0] if unknown else '(none)'!r}; expected "
                     f"some of {', '.join(NAMES)}")
  if not args.summarize_only:
    run_all(names, args)
    if args.dry_run or args.print_tpu_commands:
      return
  os.makedirs(args.workdir_root, exist_ok=True)
  paths = write_outputs(summarize(args.workdir_root, names), args.workdir_root)
  with open(paths["md"]) as f:
    print(f.read())
  print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
  main()
