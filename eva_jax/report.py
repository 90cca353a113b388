"""The end-of-iteration report: report.md with PNG plots, from the workdir's artifacts.

Plots: the reward distribution of each iteration's samples, the informativeness histogram of
the prompts the creator saw, held-out reward (overall and per difficulty level) over iterations,
and the evolved-prompt lineage counts by method.
"""
from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # Headless: the report is written on TPU VMs and CI alike.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from eva_jax import fileio  # noqa: E402
from eva_jax import workdir as wd  # noqa: E402


def _save(fig, path: str) -> None:
  """Renders in memory, then one atomic write (a local file or a gs:// object)."""
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=90)
  plt.close(fig)
  fileio.atomic_write(path, png.getvalue())


def write_report(workdir: str, iterations: Sequence[dict], lineage: dict[str, int]) -> str:
  """Writes report.md + plots/*.png. `iterations[i]` holds per-iteration summaries:
  {"iteration", "rewards" (flat array), "informativeness" (array), "heldout_reward",
   "heldout_by_level" (dict level -> reward), "win_rate" (optional)}."""
  if not wd.is_writer():
    return ""
  plots = fileio.join(workdir, "plots")

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for it in iterations:
    if len(it.get("rewards", ())):
      ax.hist(np.asarray(it["rewards"]), bins=20, alpha=0.5, label=f"iter {it['iteration']}")
  ax.set(xlabel="reward", ylabel="samples", title="Reward of sampled responses")
  ax.legend(fontsize=7)
  _save(fig, fileio.join(plots, "rewards.png"))

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for it in iterations:
    if len(it.get("informativeness", ())):
      ax.hist(np.asarray(it["informativeness"]), bins=20, alpha=0.5,
              label=f"iter {it['iteration']}")
  ax.set(xlabel="informativeness", ylabel="prompts", title="Prompt informativeness")
  ax.legend(fontsize=7)
  _save(fig, fileio.join(plots, "informativeness.png"))

  fig, ax = plt.subplots(figsize=(6, 3.5))
  xs = [it["iteration"] for it in iterations]
  ax.plot(xs, [it["heldout_reward"] for it in iterations], "o-", label="mean", color="k")
  levels = sorted({lv for it in iterations for lv in it.get("heldout_by_level", {})}, key=int)
  for lv in levels:
    ax.plot(xs, [it["heldout_by_level"].get(lv, np.nan) for it in iterations], ".--",
            label=f"level {lv}", alpha=0.7)
  ax.set(xlabel="iteration (0 = warm-start)", ylabel="held-out reward",
         title="Held-out reward over iterations")
  ax.legend(fontsize=7)
  _save(fig, fileio.join(plots, "heldout.png"))

  fig, ax = plt.subplots(figsize=(6, 3.5))
  names = sorted(lineage)
  ax.bar(range(len(names)), [lineage[n] for n in names])
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
  ax.set(ylabel="prompts", title="Prompt buffer by method")
  _save(fig, fileio.join(plots, "lineage.png"))

  lines = ["# eva run report", "", "| iteration | held-out reward | win rate vs warm-start | "
           "mean sample reward | mean informativeness |", "|---|---|---|---|---|"]
  for it in iterations:
    rewards, info = np.asarray(it.get("rewards", [])), np.asarray(it.get("informativeness", []))
    win = it.get("win_rate")
    lines.append(
        f"| {it['iteration']} | {it['heldout_reward']:.4f} | "
        f"{'' if win is None else f'{win:.3f}'} | "
        f"{rewards.mean() if rewards.size else float('nan'):.4f} | "
        f"{info.mean() if info.size else float('nan'):.4f} |")
  lines += ["", "Prompt buffer: " + ", ".join(f"{k}: {v}" for k, v in sorted(lineage.items())),
            "", "![rewards](plots/rewards.png)", "![informativeness](plots/informativeness.png)",
            "![held-out](plots/heldout.png)", "![lineage](plots/lineage.png)", ""]
  path = fileio.join(workdir, "report.md")
  fileio.atomic_write(path, "\n".join(lines))
  return path
