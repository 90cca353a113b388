"""eva_jax.report on a small hand-made workdir: the new sections (time per stage, filter
rejections, evolved-prompt gallery, best and worst responses) hold the values written into the
artifacts, texts are escaped for Markdown tables and cut, and the older sections stay."""
import numpy as np

from eva_jax import report
from eva_jax import workdir as wd

PIPE_PROMPT = "Sort a | b\nthen *shout*"
LONG_CHILD = "x" * 1000


def _rows(md: str, heading: str) -> list[str]:
  """The table lines under `heading` (up to the next heading)."""
  part = md.split(heading, 1)[1].split("\n#", 1)[0]
  return [line for line in part.splitlines() if line.startswith("|")]


def _workdir(tmp_path):
  d = tmp_path / "run"
  (d / "iter_000").mkdir(parents=True)
  wd.write_json(str(d / "config.json"), {"creator": {"metric": "gap"}})
  wd.write_json(str(d / "iter_000" / "prompts.json"),
                [{"text": "p0", "id": None}, {"text": PIPE_PROMPT, "id": None}])
  wd.write_json(str(d / "iter_000" / "create.json"), {
      "selected": ["0-1"], "informativeness": [0.25, 0.75],
      "evolved": ["child one", LONG_CHILD], "methods": ["deepen", "add_constraints"],
      "parents": [PIPE_PROMPT, "child one"], "rejected": {"too_long": 2, "new_reason": 1}})
  # Child 0's rewards gap is 0.5, child 1's is 1.0: the gallery lists child 1 first.
  wd.write_npz(str(d / "iter_000" / "generate_evolved_scores.npz"),
               rewards=np.array([[0.25, 0.75], [0.0, 1.0]], np.float32))
  wd.write_json(str(d / "iter_000" / "pairs.json"), [
      {"prompt": PIPE_PROMPT, "chosen": [3, 4], "rejected": [5], "chosen_reward": 1.0,
       "rejected_reward": 0.125, "source": "base"},
      {"prompt": "p0", "chosen": [7], "rejected": [8], "chosen_reward": 0.5,
       "rejected_reward": 0.0, "source": "evolved"}])
  metrics = wd.Metrics(str(d))
  for name, step, seconds in (("sft", -1, 12.0), ("generate", 0, 3.0), ("train", 0, 4.5)):
    metrics.log("stage", step, stage=name, seconds=seconds, cached=False)
  metrics.log("stage", 0, stage="generate", seconds=99.0, cached=True)  # A resume's load.
  metrics.close()
  with open(d / "metrics.jsonl", "a") as f:
    f.write('{"kind": "stage", "step": 0, "sta')  # A run killed mid-append.
  return d


def _write(d):
  iterations = [
      {"iteration": 0, "heldout_reward": 0.1, "heldout_by_level": {"1": 0.1}},
      {"iteration": 1, "rewards": [0.0, 1.0], "informativeness": [0.25, 0.75],
       "heldout_reward": 0.3, "heldout_by_level": {"1": 0.3}, "win_rate": 0.6}]
  decode = lambda ids: "tok" + "|".join(map(str, ids))  # noqa: E731
  path = report.write_report(str(d), iterations, {"base": 2, "deepen": 1}, decode=decode)
  return open(path).read()


def test_report_sections_hold_the_artifacts_values(tmp_path):
  md = _write(_workdir(tmp_path))
  # The existing sections stay.
  assert "| 1 | 0.3000 | 0.600 | 0.5000 | 0.5000 |" in md
  assert "Prompt buffer: base: 2, deepen: 1" in md
  for plot in ("rewards", "informativeness", "heldout", "lineage"):
    assert (tmp_path / "run" / "plots" / f"{plot}.png").stat().st_size > 0

  times = _rows(md, "## Time per stage")
  assert times[0] == "| stage | warm-start | iter 0 | all |"
  # The cached load (99 s) is not counted.
  assert "| sft | 12.0 |  | 12.0 |" in times
  assert "| generate |  | 3.0 | 3.0 |" in times
  assert "| **total** | 12.0 | 7.5 | 19.5 |" in times

  rejections = _rows(md, "## Evolved candidates rejected by the filters")
  # Reasons come from whatever the filters returned, unknown ones included.
  assert "| new\\_reason | 1 |" in rejections
  assert "| too\\_long | 2 |" in rejections
  assert "| **kept** | 2 |" in rejections
  assert "| candidates | 5 |" in rejections

  gallery = _rows(md, "### Iteration 0: 2 of 2 evolved prompts")
  first, second = gallery[2], gallery[3]
  assert first.startswith("| add\\_constraints | child one | " + "x" * report.TEXT_LIMIT
                          + " … (+760 chars) |  | 0.00, 1.00 | 1.000 |")
  # The parent is a base prompt of the iteration: its informativeness (0.75) is shown.
  assert second == ("| deepen | Sort a \\| b<br>then \\*shout\\* | child one | 0.750 | "
                    "0.25, 0.75 | 0.500 |")

  pairs = _rows(md, "### Iteration 0: 2 of 2 training pairs")
  assert pairs[2] == ("| base | Sort a \\| b<br>then \\*shout\\* | tok3\\|4 (1.000) | "
                      "tok5 (0.125) |")
  assert pairs[3] == "| evolved | p0 | tok7 (0.500) | tok8 (0.000) |"
  # The escaped pipes leave the row its 4 columns.
  assert pairs[2].replace("\\|", "").count("|") == 5


def test_md_cell_escapes_and_cuts():
  assert report.md_cell("a|b\r\nc<d>&`e`_f_\\") == "a\\|b<br>c&lt;d&gt;&amp;\\`e\\`\\_f\\_\\\\"
  assert report.md_cell("abcdef", limit=3) == "abc … (+3 chars)"


def test_report_without_eva_iterations_has_only_the_old_sections(tmp_path):
  path = report.write_report(str(tmp_path), [
      {"iteration": 0, "heldout_reward": 0.1, "heldout_by_level": {"1": 0.1}}], {})
  md = open(path).read()
  assert "| 0 | 0.1000 |" in md
  for section in ("## Time per stage", "## Evolved", "## Best and worst"):
    assert section not in md

