"""The end-of-iteration report: report.md with PNG plots, from the workdir's artifacts.

Plots: the reward distribution of each iteration's samples, the informativeness histogram of
the prompts the creator saw, held-out reward (overall and per difficulty level) over iterations,
and the evolved-prompt lineage counts by method.

Sections read from the workdir (each left out when its artifacts are absent): the time per stage
(metrics.jsonl rows of kind "stage"), the creator's filter rejections by reason and a gallery of
evolved prompts with their parents (iter_NNN/create.json, generate_evolved_scores.npz), and the
best and worst response of a few prompts (iter_NNN/pairs.json, token ids decoded by `decode`).
Texts in tables are truncated and escaped (`md_cell`).
"""
from __future__ import annotations

import io
import json
from typing import Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # Headless: the report is written on TPU VMs and CI alike.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from eva_jax import creator, fileio  # noqa: E402
from eva_jax import workdir as wd  # noqa: E402

GALLERY_SIZE = 5  # Evolved prompts shown per iteration.
PAIRS_SHOWN = 3  # Best/worst pairs shown per iteration.
TEXT_LIMIT = 240  # Characters of a prompt or response shown in a table cell.
_ESCAPES = {"\\": "\\\\", "|": "\\|", "`": "\\`", "*": "\\*", "_": "\\_", "&": "&amp;",
            "<": "&lt;", ">": "&gt;", "\r": "", "\t": " ", "\n": "<br>"}


def md_cell(text, limit: int = TEXT_LIMIT) -> str:
  """`text` as one Markdown table cell: cut to `limit` characters (saying how many were cut),
  markup characters escaped (a model's `|`, `*` or `<tag>` shows as written) and newlines as
  <br>."""
  text = str(text)
  if len(text) > limit:
    text = text[:limit].rstrip() + f" … (+{len(text) - limit} chars)"
  return "".join(_ESCAPES.get(ch, ch) for ch in text)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _read(path: str, reader):
  """The artifact, or None when it is missing or unreadable: a section of the report is not
  worth stopping the run for (the runner recomputes what it needs itself)."""
  try:
    return reader(path) if fileio.exists(path) else None
  except wd.CorruptArtifact:
    return None


def _iter_path(workdir: str, t: int, name: str) -> str:
  return fileio.join(workdir, f"iter_{t:03d}", name)


def _where(step: int) -> str:
  return "warm-start" if step < 0 else f"iter {step}"


def stage_times(workdir: str) -> list[str]:
  """Seconds per stage and iteration, from the runs that computed them (a resumed run loads
  finished stages from their artifacts; those loads are not counted)."""
  path = fileio.join(workdir, "metrics.jsonl")
  if not fileio.exists(path):
    return []
  seconds: dict[tuple[str, int], float] = {}
  for line in fileio.iter_lines(path):
    try:
      row = json.loads(line)
    except ValueError:  # Blank, or the last line of a run killed mid-append.
      continue
    if row.get("kind") == "stage" and "seconds" in row and not row.get("cached", False):
      seconds[(row["stage"], row["step"])] = float(row["seconds"])
  if not seconds:
    return []
  stages = list(dict.fromkeys(name for name, _ in seconds))
  steps = sorted({step for _, step in seconds})
  rows = [[name] + [f"{seconds[(name, s)]:.1f}" if (name, s) in seconds else "" for s in steps]
          + [f"{sum(v for (n, _), v in seconds.items() if n == name):.1f}"] for name in stages]
  rows.append(["**total**"] + [f"{sum(v for (_, s), v in seconds.items() if s == step):.1f}"
                               for step in steps] + [f"{sum(seconds.values()):.1f}"])
  return (["## Time per stage (seconds)", ""]
          + _table(["stage"] + [_where(s) for s in steps] + ["all"], rows) + [""])


def filter_rejections(created: dict[int, dict]) -> list[str]:
  """Evolved candidates kept and rejected, by the filter's reason, per iteration."""
  created = {t: c for t, c in created.items() if "rejected" in c}
  if not created:
    return []
  ts = sorted(created)
  reasons = sorted({r for c in created.values() for r in c["rejected"]})
  rows = [[md_cell(r)] + [created[t]["rejected"].get(r, 0) for t in ts] for r in reasons]
  rows.append(["**kept**"] + [len(created[t]["evolved"]) for t in ts])
  rows.append(["candidates"] + [len(created[t]["evolved"]) + sum(created[t]["rejected"].values())
                                for t in ts])
  return (["## Evolved candidates rejected by the filters", ""]
          + _table(["reason"] + [f"iter {t}" for t in ts], rows) + [""])


def evolved_gallery(workdir: str, created: dict[int, dict], metric: str) -> list[str]:
  """Per iteration, the GALLERY_SIZE evolved prompts whose own responses were most informative:
  parent → child, method, the parent's informativeness (when it is a base prompt of the
  iteration), the child's rewards and informativeness."""
  lines = []
  for t, c in sorted(created.items()):
    if not c.get("evolved"):
      continue
    scores = _read(_iter_path(workdir, t, "generate_evolved_scores.npz"), wd.read_npz)
    prompts = _read(_iter_path(workdir, t, "prompts.json"), wd.read_json) or []
    base_info = dict(zip((p["text"] for p in prompts), c.get("informativeness", [])))
    rewards_ExN = None if scores is None else np.asarray(scores["rewards"], np.float64)
    info_E = (creator.informativeness(rewards_ExN, metric) if rewards_ExN is not None
              and rewards_ExN.ndim == 2 and rewards_ExN.shape[1] >= 2 else None)
    order = (np.argsort(-info_E, kind="stable") if info_E is not None
             else np.arange(len(c["evolved"])))[:GALLERY_SIZE]
    parents = c.get("parents", [""] * len(c["evolved"]))
    rows = []
    for e in order:
      parent_info = base_info.get(parents[e])
      rows.append([
          md_cell(c["methods"][e]), md_cell(parents[e]), md_cell(c["evolved"][e]),
          "" if parent_info is None else f"{parent_info:.3f}",
          "" if rewards_ExN is None else ", ".join(f"{r:.2f}" for r in rewards_ExN[e]),
          "" if info_E is None else f"{info_E[e]:.3f}"])
    lines += [f"### Iteration {t}: {len(order)} of {len(c['evolved'])} evolved prompts", ""]
    lines += _table(["method", "parent", "child", "parent informativeness", "child rewards",
                     f"child informativeness ({md_cell(metric)})"], rows) + [""]
  return ["## Evolved prompts", ""] + lines if lines else []


def _response(pair: dict, side: str, decode: Optional[Callable]) -> str:
  if f"{side}_text" in pair:
    text = pair[f"{side}_text"]
  elif decode is not None:
    text = decode(pair[side])
  else:
    text = f"({len(pair[side])} tokens)"
  return f"{md_cell(text) if text else '(empty)'} ({pair[f'{side}_reward']:.3f})"


def best_worst(workdir: str, ts: Sequence[int], decode: Optional[Callable]) -> list[str]:
  """The first PAIRS_SHOWN training pairs of each iteration (the mix is shuffled: a random
  sample): the prompt, its best and its worst sampled response, with their rewards."""
  lines = []
  for t in ts:
    pairs = _read(_iter_path(workdir, t, "pairs.json"), wd.read_json)
    if not pairs:
      continue
    rows = [[md_cell(p.get("source", "")), md_cell(p["prompt"]), _response(p, "chosen", decode),
             _response(p, "rejected", decode)] for p in pairs[:PAIRS_SHOWN]]
    lines += [f"### Iteration {t}: {len(rows)} of {len(pairs)} training pairs", ""]
    lines += _table(["source", "prompt", "chosen (reward)", "rejected (reward)"], rows) + [""]
  return ["## Best and worst responses", ""] + lines if lines else []


def _save(fig, path: str) -> None:
  """Renders in memory, then one atomic write (a local file or a gs:// object)."""
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=90)
  plt.close(fig)
  fileio.atomic_write(path, png.getvalue())


def _legend(ax) -> None:
  if ax.get_legend_handles_labels()[0]:  # An empty legend would only warn.
    ax.legend(fontsize=7)


def write_report(workdir: str, iterations: Sequence[dict], lineage: dict[str, int], *,
                 decode: Optional[Callable[[list[int]], str]] = None) -> str:
  """Writes report.md + plots/*.png. `iterations[i]` holds per-iteration summaries:
  {"iteration", "rewards" (flat array), "informativeness" (array), "heldout_reward",
   "heldout_by_level" (dict level -> reward), "win_rate" (optional)}; iteration 0 is the
  warm-start, iteration t + 1 the evaluation after eva iteration t (artifacts in iter_{t}).
  decode: token ids -> text, for the responses of the training pairs."""
  if not wd.is_writer():
    return ""
  plots = fileio.join(workdir, "plots")

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for it in iterations:
    if len(it.get("rewards", ())):
      ax.hist(np.asarray(it["rewards"]), bins=20, alpha=0.5, label=f"iter {it['iteration']}")
  ax.set(xlabel="reward", ylabel="samples", title="Reward of sampled responses")
  _legend(ax)
  _save(fig, fileio.join(plots, "rewards.png"))

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for it in iterations:
    if len(it.get("informativeness", ())):
      ax.hist(np.asarray(it["informativeness"]), bins=20, alpha=0.5,
              label=f"iter {it['iteration']}")
  ax.set(xlabel="informativeness", ylabel="prompts", title="Prompt informativeness")
  _legend(ax)
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
  _legend(ax)
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
  ts = [it["iteration"] - 1 for it in iterations if it["iteration"] >= 1]
  created = {t: c for t in ts
             if (c := _read(_iter_path(workdir, t, "create.json"), wd.read_json)) is not None}
  config = _read(fileio.join(workdir, "config.json"), wd.read_json) or {}
  metric = config.get("creator", {}).get("metric", "gap")
  lines += stage_times(workdir)
  lines += filter_rejections(created)
  lines += evolved_gallery(workdir, created, metric)
  lines += best_worst(workdir, ts, decode)
  path = fileio.join(workdir, "report.md")
  fileio.atomic_write(path, "\n".join(lines))
  return path
