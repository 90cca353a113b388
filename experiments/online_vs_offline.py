"""Online vs offline eva at an equal budget of generated tokens (issue 17), paired per seed.

  python experiments/online_vs_offline.py --workdir_root=/tmp/eva_ovo
  python experiments/online_vs_offline.py --workdir_root=/tmp/eva_ovo --summarize_only
  python experiments/online_vs_offline.py --workdir_root=/tmp/eva_ovo_smoke --seeds=1 --smoke \
      --out=/tmp/eva_ovo_smoke/results

Four arms per seed, each a run of `python -m eva_jax.main` in <workdir_root>/<arm>_seed-<s>:
  offline_eva     configs/default.py (its eva iterations)
  offline_static  configs/default.py with creator.enabled False (= its :static variant)
  online_eva      configs/online.py, online.token_budget = offline_eva's tokens of the seed
  online_static   configs/online.py with creator.enabled False (= its :static variant: fresh
                  base prompts in the evolved slots), the same budget
(--smoke: the :smoke variants of both files, for a seconds-long check of the script.) The
offline runs go first; a finished run is skipped, an unfinished one resumes. All arms of a seed
start from the same SFT warm-start θ_0 (same seed and config) and are scored on the same
held-out prompts.

Generated tokens = policy samples + creator rewrites; held-out evaluation answers are not
counted. Offline, per iteration: the `lengths` of iter_t/generate.npz and generate_evolved.npz,
plus the rewrites of iter_t/create.json in the run's tokenizer; the rejected candidates' texts
are not kept, so each counts at the mean accepted length (`creator_tokens_estimated` in the JSON).
Online: the step rows' total_policy_tokens + total_creator_tokens (every candidate counted). An
online run stops after the step that reaches the budget (overshoot under one step).

online.steps stays the length of the learning-rate schedule; under a budget it is a cap the
budget should end first: ceil(margin · budget / (P · K · L0)), L0 the mean response length of the
offline eva run's first generate (the same θ_0). A run that hits the cap first is flagged
(`budget_reached` false); `learning_rate_end` records where the schedule stood when the budget
ended the run. Evaluations: about `--online_evals` along the expected steps.

Cost on the 2-core CPU (from experiments/results/default_seed0.json and online_seed0.json): an
offline run ~4 min; the budget, ~620,000 tokens at seed 0, is ~1,200 online steps of ~530
tokens at ~1.3 s, so ~28 min per online run: ~65 min per seed, ~5.5 h for 5 seeds.

Writes into --out, per run <arm>_seed-<s>.json (held-out reward at the final budget, the
reward-vs-tokens curve, the hardest level's reward and curve, tokens, wall time of this script's
launches and the commits they ran), and online_vs_offline.md (per-seed paired differences, their
mean and a 95 % paired bootstrap interval: experiments/stats.py) and online_vs_offline.png
(held-out reward vs generated tokens, one line per arm, mean over seeds).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from experiments import sweep  # noqa: E402
from experiments.stats import paired_bootstrap_ci  # noqa: E402

ARMS = ("offline_eva", "offline_static", "online_eva", "online_static")
# (arm minus arm) rows of the table.
PAIRS = (("online_eva", "offline_eva"), ("online_static", "offline_static"),
         ("online_eva", "online_static"), ("offline_eva", "offline_static"))
OUT = os.path.join(_ROOT, "experiments", "results", "online_vs_offline")
WALL_FILE = "launch_seconds.json"  # In each run folder: this script's launches, summed.


def _read(path: str):
  with open(path) as f:
    return json.load(f)


def arm_spec(arm: str, smoke: bool) -> str:
  name = "online" if arm.startswith("online") else "default"
  return os.path.join(_ROOT, "configs", f"{name}.py") + (":smoke" if smoke else "")


def _config(arm: str, smoke: bool, overrides: dict):
  path, arg = sweep.split_spec(arm_spec(arm, smoke))
  return sweep.apply_overrides(sweep.load_config_module(path).get_config(arg or ""), overrides)


def _commit() -> str:
  """The code a launch ran: HEAD of this checkout, '+dirty' when files differ from it."""
  git = lambda *a: subprocess.run(["git", *a], cwd=_ROOT, capture_output=True, text=True,  # noqa: E731
                                  check=False).stdout.strip()
  head = git("rev-parse", "--short", "HEAD") or "unknown"
  return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def launch(arm: str, seed: int, folder: str, overrides: dict, smoke: bool, env: dict) -> None:
  """One `eva_jax.main` run (it resumes in `folder`); adds its wall time and commit to WALL_FILE."""
  cmd = [sys.executable, "-m", "eva_jax.main",
         *sweep.main_args(arm_spec(arm, smoke), folder, overrides)]
  print(f"[{arm} seed {seed}] {shlex.join(cmd)}", flush=True)
  start = time.perf_counter()
  result = subprocess.run(cmd, cwd=_ROOT, env=env, check=False)
  if result.returncode:
    raise RuntimeError(f"{arm} seed {seed} failed (exit {result.returncode}); rerun to resume")
  wall = os.path.join(folder, WALL_FILE)
  before = _read(wall) if os.path.exists(wall) else {"seconds": 0.0}
  commits = sorted(set(before.get("commits", [])) | {_commit()})
  with open(wall, "w") as f:
    json.dump({"seconds": before["seconds"] + time.perf_counter() - start, "commits": commits}, f)


# --- reading the runs ---------------------------------------------------------------------------


def _load_tokenizer(folder: str):
  from eva_jax.models import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  return tokenizer_lib.load_tokenizer(os.path.join(folder, "cache", "tokenizer"))


def offline_tokens(folder: str, iterations: int) -> list[dict]:
  """Per iteration: {"policy", "creator", "creator_estimated"} generated tokens."""
  tok, out = None, []
  for t in range(iterations):
    it = os.path.join(folder, f"iter_{t:03d}")
    policy = sum(int(np.load(p)["lengths"].sum()) for p in
                 (os.path.join(it, f"{n}.npz") for n in ("generate", "generate_evolved"))
                 if os.path.exists(p))
    creator = estimated = 0
    if os.path.exists(os.path.join(it, "create.json")):
      created = _read(os.path.join(it, "create.json"))
      tok = tok or _load_tokenizer(folder)
      lengths = [len(tok.encode(text)) for text in created["evolved"]]
      rejected = sum(created.get("rejected", {}).values())
      estimated = round(rejected * float(np.mean(lengths))) if lengths else 0
      creator = sum(lengths) + estimated
    out.append({"policy": policy, "creator": creator, "creator_estimated": estimated})
  return out


def _hardest(by_level: dict) -> tuple[str, float]:
  level = max(by_level, key=int)
  return level, by_level[level]


def read_offline(folder: str, iterations: int) -> Optional[dict]:
  paths = [os.path.join(folder, "iter_000", "evaluate_warmstart.json")] + [
      os.path.join(folder, f"iter_{t:03d}", "evaluate.json") for t in range(iterations)]
  if not all(os.path.exists(p) for p in paths):
    return None
  evals = [_read(p) for p in paths]
  per_iter = offline_tokens(folder, iterations)
  used = np.cumsum([0] + [t["policy"] + t["creator"] for t in per_iter]).tolist()
  return _summary(evals, used, {
      "policy": sum(t["policy"] for t in per_iter), "creator": sum(t["creator"] for t in per_iter),
      "creator_estimated": sum(t["creator_estimated"] for t in per_iter)},
      iterations=iterations)


def read_online(folder: str, steps: int, budget: int) -> Optional[dict]:
  """None until the run ended (at `steps` or at the step that reached `budget`)."""
  metrics = os.path.join(folder, "metrics.jsonl")
  if not os.path.exists(metrics):
    return None
  rows = {}
  with open(metrics) as f:
    for line in f:
      row = json.loads(line) if line.strip() else {}
      if row.get("kind") == "online":
        rows[row["step"]] = row
  used = {s: r["total_policy_tokens"] + r["total_creator_tokens"] for s, r in rows.items()}
  ends = [s for s in sorted(rows) if s == steps or (budget and used[s] >= budget)]
  final = os.path.join(folder, "online", f"evaluate_{ends[0]:06d}.json") if ends else ""
  if not ends or not os.path.exists(final):
    return None
  end, used[0] = ends[0], 0
  evals = [_read(p) for p in sorted(glob.glob(os.path.join(folder, "online", "evaluate_*.json")))]
  evals = [e for e in evals if e["step"] <= end]
  last = rows[end]
  return _summary(evals, [used[e["step"]] for e in evals], {
      "policy": last["total_policy_tokens"], "creator": last["total_creator_tokens"],
      "creator_estimated": 0}, steps=end, budget_reached=bool(budget and used[end] >= budget),
      learning_rate_end=last.get("learning_rate"))


def _summary(evals: list[dict], used: list[int], tokens: dict, **extra) -> dict:
  level, hardest = _hardest(evals[-1]["heldout_by_level"])
  return {"heldout_final": evals[-1]["heldout_reward"], "heldout_start": evals[0]["heldout_reward"],
          "heldout_by_level_final": evals[-1]["heldout_by_level"], "hardest_level": level,
          "hardest_final": hardest,
          "curve": [[int(u), e["heldout_reward"]] for u, e in zip(used, evals)],
          "curve_hardest": [[int(u), e["heldout_by_level"][level]] for u, e in zip(used, evals)],
          "tokens": dict(tokens, total=tokens["policy"] + tokens["creator"]), **extra}


# --- running ------------------------------------------------------------------------------------


def online_overrides(cfg, offline: dict, folder: str, margin: float, evals: int) -> dict:
  """online.token_budget = the offline eva run's tokens; steps and eval_every sized to it."""
  budget = offline["tokens"]["total"]
  first = np.load(os.path.join(folder, "iter_000", "generate.npz"))["lengths"]
  per_step = cfg.online.prompts_per_step * cfg.online.num_samples * max(float(first.mean()), 1.0)
  expected = max(1, math.ceil(budget / per_step))
  return {"online.token_budget": budget, "online.steps": math.ceil(margin * expected),
          "online.eval_every": max(1, round(expected / evals))}


def run_seed(seed: int, args) -> dict:
  """Runs (or resumes, or skips) the four arms of one seed -> {arm: (folder, overrides)}."""
  env = sweep.local_env(os.path.abspath(args.workdir_root))
  folder = lambda arm: os.path.abspath(  # noqa: E731
      os.path.join(args.workdir_root, f"{arm}_seed-{seed}"))
  runs = {}
  for arm in ARMS:
    overrides = {"seed": seed, **({"creator.enabled": False} if "static" in arm else {})}
    if arm.startswith("online"):
      eva = read_offline(folder("offline_eva"), _config("offline_eva", args.smoke,
                                                        {"seed": seed}).iterations)
      if eva is None:
        raise RuntimeError(f"seed {seed}: offline_eva has not finished; its tokens set the budget")
      overrides.update(online_overrides(_config(arm, args.smoke, overrides), eva,
                                        folder("offline_eva"), args.steps_margin,
                                        args.online_evals))
    runs[arm] = (folder(arm), overrides)
    if not args.summarize_only and read_arm(arm, *runs[arm], args.smoke) is None:
      launch(arm, seed, folder(arm), overrides, args.smoke, env)
  return runs


def read_arm(arm: str, folder: str, overrides: dict, smoke: bool) -> Optional[dict]:
  c = _config(arm, smoke, overrides)
  if arm.startswith("online"):
    return read_online(folder, c.online.steps, c.online.token_budget)
  return read_offline(folder, c.iterations)


# --- summary ------------------------------------------------------------------------------------


def markdown_table(results: dict[str, dict[int, dict]], smoke: bool) -> str:
  seeds = sorted(set.intersection(*(set(r) for r in results.values())))
  lines = [f"# Online vs offline eva at an equal budget of generated tokens{' (smoke)' * smoke}",
           "", f"Seeds with all four arms: {seeds}. Budget: each seed's offline eva tokens "
           "(policy samples + creator rewrites). 95 % interval: paired bootstrap over seeds "
           "(10 000 resamples, experiments/stats.py).", "",
           "| arm | seeds | tokens (mean) | held-out reward at the end | hardest level | "
           "wall s (mean) |", "|---|---|---|---|---|---|"]
  for arm in ARMS:
    runs = [results[arm][s] for s in seeds]
    if not runs:
      continue
    lines.append(f"| {arm} | {len(runs)} | {np.mean([r['tokens']['total'] for r in runs]):.0f} | "
                 f"{np.mean([r['heldout_final'] for r in runs]):.4f} | "
                 f"{np.mean([r['hardest_final'] for r in runs]):.4f} | "
                 f"{np.mean([r.get('wall_seconds') or np.nan for r in runs]):.0f} |")
  for key, title in (("heldout_final", "held-out reward at the final budget"),
                     ("hardest_final", "hardest level's held-out reward")):
    lines += ["", f"## Paired differences: {title}", "",
              "| difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | 95 % CI |",
              "|---|" + "---|" * (len(seeds) + 2)]
    for a, b in PAIRS:
      if not seeds:
        break
      diffs = [results[a][s][key] - results[b][s][key] for s in seeds]
      mean, lo, hi = paired_bootstrap_ci(diffs)
      lines.append(f"| {a} − {b} | " + " | ".join(f"{d:+.4f}" for d in diffs)
                   + f" | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
  flagged = [f"{arm} seed {s}" for arm in ARMS if arm.startswith("online")
             for s in seeds if not results[arm][s]["budget_reached"]]
  if flagged:
    lines += ["", f"Ended at the step cap before the budget: {', '.join(flagged)}."]
  return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[int, dict]], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, key, title in zip(axes, ("curve", "curve_hardest"),
                            ("held-out reward", "hardest level's held-out reward")):
    for i, arm in enumerate(ARMS):
      curves = [np.asarray(r[key], np.float64) for r in results[arm].values()]
      if not curves:
        continue
      # Each seed's points sit at its own token counts: interpolate onto a common grid up to the
      # smallest final count, then average over seeds.
      grid = np.linspace(0, min(c[-1, 0] for c in curves), 50)
      ax.plot(grid, np.mean([np.interp(grid, c[:, 0], c[:, 1]) for c in curves], 0),
              color=f"C{i}", label=f"{arm} ({len(curves)} seeds)")
      for c in curves:
        ax.plot(c[:, 0], c[:, 1], ".", color=f"C{i}", alpha=0.4)
    ax.set(xlabel="generated tokens (policy + creator)", ylabel=title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir_root", required=True, help="Run folders go under it.")
  parser.add_argument("--seeds", type=int, default=5, help="Seeds 0 .. seeds-1.")
  parser.add_argument("--smoke", action="store_true", help="The configs' :smoke variants.")
  parser.add_argument("--out", default=OUT, help="Per-run JSONs, the table and the plot.")
  parser.add_argument("--steps_margin", type=float, default=1.25,
                      help="online.steps = margin x the steps the budget is expected to take.")
  parser.add_argument("--online_evals", type=int, default=6,
                      help="Held-out evaluations along an online run's expected steps.")
  parser.add_argument("--summarize_only", action="store_true",
                      help="Only read the finished runs and write the outputs.")
  args = parser.parse_args(argv)
  if args.seeds < 1 or args.steps_margin < 1 or args.online_evals < 1:
    raise ValueError("--seeds and --online_evals must be >= 1 and --steps_margin >= 1")
  os.makedirs(args.out, exist_ok=True)
  results: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
  for seed in range(args.seeds):
    try:
      runs = run_seed(seed, args)
    except RuntimeError as e:
      if not args.summarize_only:
        raise
      print(f"skipped: {e}")
      continue
    for arm, (folder, overrides) in runs.items():
      result = read_arm(arm, folder, overrides, args.smoke)
      if result is None:
        print(f"{arm} seed {seed}: not finished, left out")
        continue
      wall = os.path.join(folder, WALL_FILE)
      launches = _read(wall) if os.path.exists(wall) else {}
      result.update(arm=arm, seed=seed, workdir=folder, config=arm_spec(arm, args.smoke),
                    overrides=overrides, wall_seconds=launches.get("seconds"),
                    commits=launches.get("commits"))
      results[arm][seed] = result
      with open(os.path.join(args.out, f"{arm}_seed-{seed}.json"), "w") as f:
        json.dump(result, f, indent=1)
  table = markdown_table(results, args.smoke)
  with open(os.path.join(args.out, "online_vs_offline.md"), "w") as f:
    f.write(table)
  plot(results, os.path.join(args.out, "online_vs_offline.png"))
  print(table)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
