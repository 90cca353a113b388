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
