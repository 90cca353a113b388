"""experiments/online_vs_offline.py's token accounting and run reading, on hand-made workdirs."""
import json

import numpy as np
import pytest

from experiments import online_vs_offline as ovo


class _WordTokenizer:
  def encode(self, text):
    return text.split()


def _write_json(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def test_offline_tokens_and_curve(tmp_path, monkeypatch):
  monkeypatch.setattr(ovo, "_load_tokenizer", lambda folder: _WordTokenizer())
  levels = lambda r: {"1": r + 0.5, "6": r}  # noqa: E731
  _write_json(tmp_path / "iter_000" / "evaluate_warmstart.json",
              {"heldout_reward": 0.1, "heldout_by_level": levels(0.0)})
  for t, reward in enumerate((0.2, 0.3)):
    it = tmp_path / f"iter_{t:03d}"
    _write_json(it / "evaluate.json", {"heldout_reward": reward, "heldout_by_level": levels(t)})
    np.savez(it / "generate.npz", lengths=np.array([[1, 2], [3, 4]]))  # 10 tokens.
  np.savez(tmp_path / "iter_000" / "generate_evolved.npz", lengths=np.array([[5, 6]]))  # 11.
  # Rewrites of 2 and 4 words, and 2 rejected candidates counted at the mean, 3 words each.
  _write_json(tmp_path / "iter_000" / "create.json",
              {"evolved": ["a b", "a b c d"], "rejected": {"duplicate_in_buffer": 2}})
  assert ovo.offline_tokens(str(tmp_path), 2) == [
      {"policy": 21, "creator": 12, "creator_estimated": 6},
      {"policy": 10, "creator": 0, "creator_estimated": 0}]
  got = ovo.read_offline(str(tmp_path), 2)
  assert got["tokens"] == {"policy": 31, "creator": 12, "creator_estimated": 6, "total": 43}
  assert got["curve"] == [[0, 0.1], [33, 0.2], [43, 0.3]]
  assert got["hardest_level"] == "6" and got["curve_hardest"] == [[0, 0.0], [33, 0], [43, 1]]
  assert ovo.read_offline(str(tmp_path), 3) is None  # Iteration 3 not evaluated yet.


@pytest.mark.parametrize("budget, end, reached", [(25, 2, True), (0, 3, False), (1000, 3, False)])
def test_online_run_ends_at_the_budget_step_or_the_last(tmp_path, budget, end, reached):
  policy, creator = (10, 10, 10), (0, 5, 5)  # Totals after steps 1-3: 10, 25, 35 tokens.
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for s in range(1, 4):
      f.write(json.dumps({"kind": "online", "step": s,
                          "total_policy_tokens": sum(policy[:s]),
                          "total_creator_tokens": creator[s - 1]}) + "\n")
  for s in sorted({0, end}):
    _write_json(tmp_path / "online" / f"evaluate_{s:06d}.json",
                {"step": s, "heldout_reward": 0.1 * s, "heldout_by_level": {"6": 0.01 * s}})
  got = ovo.read_online(str(tmp_path), 3, budget)
  total = {2: 25, 3: 35}[end]
  assert got["steps"] == end and got["budget_reached"] == reached
  assert got["tokens"]["total"] == total
  assert got["curve"] == [[0, 0.0], [total, pytest.approx(0.1 * end)]]
  assert ovo.read_online(str(tmp_path), 4, 0) is None  # Not ended: step 4 never ran.


def test_online_seeds_reads_finished_runs_and_tables_the_gains(tmp_path):
  """experiments/online_seeds.py: a finished default online run is read (final step, win rate,
  launch wall time) and the table's mean gain is the mean of the hand-computed gains."""
  from experiments import online_seeds  # pylint: disable=import-outside-toplevel
  steps = online_seeds.sweep.load_config_module(
      online_seeds.ovo.arm_spec(online_seeds.ARM, False)).get_config("").online.steps
  for seed, final in ((0, 0.5), (1, 0.6)):
    folder = tmp_path / f"online_seed-{seed}"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps(
        {"kind": "online", "step": steps, "total_policy_tokens": 90,
         "total_creator_tokens": 10}) + "\n")
    for s, reward, win in ((0, 0.4, None), (steps, final, 0.6)):
      _write_json(folder / "online" / f"evaluate_{s:06d}.json",
                  {"step": s, "heldout_reward": reward, "heldout_by_level": {"6": reward},
                   "win_rate": win})
    _write_json(folder / ovo.WALL_FILE, {"seconds": 100.0 + seed, "commits": ["abc"]})
  args = online_seeds.argparse.Namespace(workdir_root=str(tmp_path), smoke=False,
                                         summarize_only=True)
  runs = [online_seeds.run_seed(s, args) for s in (0, 1)]
  assert online_seeds.run_seed(2, args) is None  # Never launched (summarize_only).
  assert [(r["heldout_final"], r["win_rate"], r["wall_seconds"]) for r in runs] == [
      (0.5, 0.6, 100.0), (0.6, 0.6, 101.0)]
  assert runs[0]["tokens"]["total"] == 100 and runs[0]["commits"] == ["abc"]
  table = online_seeds.markdown_table(runs, smoke=False)
  assert "| 0 | " + str(steps) + " | 0.400 | 0.500 | +0.100 |" in table
  assert "Mean gain over 2 seeds: +0.150" in table  # (0.1 + 0.2) / 2.
