"""colab/quickstart.ipynb runs top to bottom in a fresh kernel and leaves a complete run behind.

The notebook is executed in memory (the file in the repo is never rewritten) with the kernel's
working directory at the repo root, as after `%cd` into the repo in Colab, and its workdir in a
temp folder.
"""
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "quickstart.ipynb")


def _kernel_env(workdir):
  env = dict(os.environ)
  # conftest's 8 fake devices would shard the tiny run 8 ways: the notebook is a one-device run.
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", EVA_QUICKSTART_WORKDIR=str(workdir), MPLBACKEND="Agg",
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  return env


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("quickstart") / "run"
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}})
  client.execute(env=_kernel_env(workdir))  # Raises CellExecutionError on the first failing cell.
  return nb, workdir


def _outputs(nb):
  return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def test_every_code_cell_ran_without_error(executed):
  nb, _ = executed
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code and all(cell.execution_count for cell in code)
  assert not [out for out in _outputs(nb) if out.output_type == "error"]


def test_run_artifacts_exist(executed):
  _, workdir = executed
  with open(workdir / "config.json") as f:
    saved = json.load(f)
  last = saved["iterations"] - 1
  for name in ("report.md", "metrics.jsonl", "iter_000/evaluate_warmstart.json",
               f"iter_{last:03d}/evaluate.json", f"iter_{last:03d}/create.json"):
    assert (workdir / name).is_file(), name
  for name in ("heldout.png", "rewards.png", "informativeness.png", "lineage.png"):
    with open(workdir / "plots" / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  # The warm-start in the notebook is long enough for the iteration to find preference pairs.
  with open(workdir / f"iter_{last:03d}" / "pairs.json") as f:
    assert len(json.load(f)) > 0


def test_notebook_shows_plots_and_answers(executed):
  nb, workdir = executed
  outputs = _outputs(nb)
  images = [out for out in outputs if "image/png" in out.get("data", {})]
  assert len(images) == 4
  text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
  assert f"workdir: {workdir}" in text
  assert "correct:" in text and "warm-start:" in text
  # Every line the answers cell printed for a prompt names its level.
  assert text.count("[level ") >= 3
