"""The runner: config validation, exact resume after SIGKILL, and two processes vs one.

The end-to-end tests run `python -m eva_jax.main` in subprocesses on the smoke config, with a
persistent compilation cache shared between them so that only the first one compiles; faults
(SIGKILL, a full disk, corrupt files) are injected through eva_jax.fileio's test hooks.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import default as default_config
from eva_jax import config_check, runner
from tests import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# With pytest-xdist, on the worker that runs the session's smoke reference (conftest.py).
pytestmark = pytest.mark.xdist_group("smoke")


def _snapshot(folder):
  """{relative path: sha256} of every file under folder."""
  out = {}
  for dirpath, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


# --- bad input: one clear error, an existing workdir untouched ---


def _bad(tmp_path, **overrides):
  c = default_config.get_config("smoke")
  for dotted, value in overrides.items():
    section, _, key = dotted.rpartition("__")
    node = c
    for part in section.split("__") if section else []:
      node = node[part]
    node[key] = value
  return c


BAD_CONFIGS = [
    ({"creator__fraction": 1.5}, "creator.fraction: must lie in \\(0, 1\\]"),
    ({"sampling__num_samples": 1}, "sampling.num_samples: must be >= 2"),
    ({"train__min_chosen_reward": float("nan")}, "train.min_chosen_reward: must be a number"),
    ({"model__source": "hf", "model__path": "/nonexistent/ckpt"},
     "model.path: checkpoint folder '/nonexistent/ckpt' does not exist"),
    ({"train__loss": "dpoo"}, "train.loss: 'dpoo' is not one of"),
    ({"sampling__top_p": 0.0}, "sampling.top_p: must lie in \\(0, 1\\]"),
    ({"sampling__temperature": -0.5}, "sampling.temperature: must be >= 0"),
    ({"creator__selection": "best"}, "creator.selection: 'best' is not one of"),
    ({"train__max_prompt_length": 64}, "train.max_prompt_length: \\(64\\) must be below"),
    ({"train__learning_rate": 0.0}, "train.learning_rate: must be a positive number"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_config_is_refused_before_anything_is_written(tmp_path, overrides, message):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("earlier results")
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match=message):
    runner.run(_bad(tmp_path, **overrides), str(workdir))
  assert _snapshot(workdir) == before


def test_empty_prompt_file(tmp_path):
  empty = tmp_path / "prompts.jsonl"
  empty.write_text("")
  c = _bad(tmp_path, data__source="jsonl", data__path=str(empty), reward__kind="synthetic",
           creator__evolver="lm")
  with pytest.raises(ValueError, match="data.path: prompt file .* is empty"):
    runner.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_too_small_prompt_file_is_refused_before_anything_is_written(tmp_path):
  """Held-out prompts must never be trained on: a file that cannot hold the held-out slice and
  every iteration's own chunk is refused up front (it used to wrap around into the held-out)."""
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(20)))
  c = _bad(tmp_path, data__source="jsonl", data__path=str(prompts), reward__kind="neural",
           reward__path=str(tmp_path), creator__evolver="lm", data__heldout_per_level=4,
           iterations=3)
  with pytest.raises(ValueError, match=r"has 20 prompts, but 4 held-out .* \+ 3 iterations x 8 "
                                       r"prompts per iteration need 28"):
    runner.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(PermissionError, match="is not writable"):
    runner.run(default_config.get_config("smoke"), str(blocker / "run"))


def test_unknown_config_key_on_the_command_line(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "eva_jax.main", "--config=configs/default.py:smoke",
       f"--workdir={workdir}", "--config.sampling.num_sample=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "num_sample" in proc.stderr
  assert not workdir.exists()


def test_incompatible_workdir_is_refused_unless_overwrite(tmp_path):
  c = default_config.get_config("smoke")
  saved = tmp_path / "config.json"
  saved.write_text(c.to_json())
  config_check.check_workdir_config(c, str(saved))  # Same config: fine.
  c2 = default_config.get_config("smoke")
  c2.seed = 7
  with pytest.raises(ValueError, match="seed: 0 there, 7 now"):
    config_check.check_workdir_config(c2, str(saved))
  c2.overwrite = True
  config_check.check_workdir_config(c2, str(saved))


@pytest.mark.parametrize("field,value", [("sampling.batch_size", 3), ("train.grad_accum", 2),
                                         ("mesh.data", 1), ("mesh.fsdp", 2),
                                         ("reward.batch_size", 8)])
def test_a_change_that_changes_results_is_refused(tmp_path, field, value):
  """The sampling keys fold in each chunk's start and the train batch rounds up to a multiple of
  the batch shards x accumulation steps; a reward model's scores change in the last bits with
  the batch shape: none of these may change on a restart."""
  saved = tmp_path / "config.json"
  saved.write_text(default_config.get_config("smoke").to_json())
  c = default_config.get_config("smoke")
  section, key = field.split(".")
  old, c[section][key] = c[section][key], value
  with pytest.raises(ValueError, match=f"{field}: {old!r} there, {value!r} now"):
    config_check.check_workdir_config(c, str(saved))


def test_result_invariant_changes_are_resumable(tmp_path):
  saved = tmp_path / "config.json"
  saved.write_text(default_config.get_config("smoke").to_json())
  c = default_config.get_config("smoke")
  c.iterations, c.checkpoint.use_async = 5, True
  config_check.check_workdir_config(c, str(saved))


def test_a_different_resolved_mesh_is_refused(tmp_path):
  saved = tmp_path / config_check.RUN_INFO
  saved.write_text(json.dumps({"mesh": {"data": 8, "fsdp": 1, "tensor": 1}}))
  c = default_config.get_config("smoke")
  config_check.check_workdir_run_info(c, {"mesh": {"data": 8, "fsdp": 1, "tensor": 1}},
                                      str(saved))
  with pytest.raises(ValueError, match="on mesh data 8 x fsdp 1 x tensor 1, but this start "
                                       "resolves mesh.data/fsdp/tensor to data 4 x fsdp 1"):
    config_check.check_workdir_run_info(c, {"mesh": {"data": 4, "fsdp": 1, "tensor": 1}},
                                        str(saved))
  c.overwrite = True
  config_check.check_workdir_run_info(c, {"mesh": {"data": 4, "fsdp": 1, "tensor": 1}},
                                      str(saved))


# --- end to end in subprocesses (conftest.py: run_smoke, smoke_reference) ---


def _artifacts(workdir):
  """Every stage artifact (everything under iter_*), by content."""
  snap = _snapshot(workdir)
  return {k: v for k, v in snap.items() if k.startswith("iter_")}


def _assert_same_run(workdir, ref_dir):
  """Final params bit for bit, every stage artifact byte for byte, the same checkpoints kept."""
  step, params = checkpoints.checkpoint_arrays(workdir)
  ref_step, ref_params = checkpoints.checkpoint_arrays(ref_dir)
  assert step == ref_step and len(params) == len(ref_params)
  for a, b in zip(params, ref_params):
    np.testing.assert_array_equal(a, b)  # Bit for bit.
  assert _artifacts(workdir) == _artifacts(ref_dir)
  assert (sorted(os.listdir(os.path.join(workdir, "checkpoints")))
          == sorted(os.listdir(os.path.join(ref_dir, "checkpoints"))))
  assert "held-out reward" in (workdir / "report.md").read_text()


def _assert_kept(before, workdir):
  """No stage artifact that existed before a run was lost or changed by it."""
  after = _artifacts(workdir)
  changed = sorted(k for k, v in before.items() if after.get(k) != v)
  assert not changed, f"artifacts lost or changed: {changed}"


# Where each restart of a 2-iteration run is killed; each run resumes from what the previous
# one left and dies at the next point. Counts are per process (a restart skips what is done).
# "<file>.write" fires before the first byte of an atomic write, "<file>.written" once the file
# is in place (eva_jax/fileio.py).
KILL_CHAIN = (
    "sampling:2",  # Iteration 0 sampled (after the warm-start evaluation), generate.npz not yet.
    "reference.npz.write:1",  # Pairs written, reference log-probs not.
    "train_step:2",  # Mid-training of iteration 0.
    "checkpoint_write:1",  # Checkpoint 1 still being written (async): no commit yet.
    "report.md.write:1",  # Inside the report of iteration 0: the plots written, report.md not.
    "buffer.jsonl.written:1",  # Iteration 1 read iteration 0's buffer and wrote its own.
    "generate_evolved.npz.written:1",  # Iteration 1's evolved prompts sampled and saved.
    "checkpoint_delete:1",  # Checkpoint 2 committed; keep-2 is about to delete checkpoint 0.
    "evaluate.json.written:1",  # Iteration 1 evaluated; its report not written.
)


def test_killed_anywhere_across_iterations_resumes_exactly(smoke_reference, run_smoke, tmp_path):
  """One 2-iteration run killed (SIGKILL) at every point of KILL_CHAIN in turn, then run to the
  end: the same final params, the same artifacts and checkpoints as an uninterrupted run, and
  no run lost or changed an artifact an earlier one had written."""
  workdir = tmp_path / "run"
  for point in KILL_CHAIN:
    before = _artifacts(workdir) if workdir.exists() else {}
    proc = run_smoke(workdir, "--config.iterations=2", env={"EVA_TEST_KILL_AT": point})
    assert proc.returncode == -9, f"{point} did not kill: {proc.stderr[-2000:]}"
    _assert_kept(before, workdir)
  before = _artifacts(workdir)
  proc = run_smoke(workdir, "--config.iterations=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  _assert_kept(before, workdir)
  _assert_same_run(workdir, smoke_reference)
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert {r["step"] for r in rows if r["kind"] == "eval"} == {0, 1, 2}


def _copy_run(ref_dir, dest):
  shutil.copytree(ref_dir, dest)
  return dest


def _corrupt(path, how):
  data = path.read_bytes()
  path.write_bytes(b"" if how == "empty" else data[:len(data) // 2])


def test_corrupt_artifacts_are_recomputed_identically(smoke_reference, run_smoke, tmp_path):
  """Stage artifacts are a cache: a zero-byte or half-written one is recomputed (a warning
  names it) and rewritten identically. A checkpoint that was never committed (the temp folder
  of a killed write) is written again; an old step half-deleted by keep-N is deleted."""
  workdir = _copy_run(smoke_reference, tmp_path / "run")
  it1, ckpts = workdir / "iter_001", workdir / "checkpoints"
  _corrupt(it1 / "evaluate.json", "empty")  # Iteration 1 is no longer done...
  _corrupt(it1 / "reference.npz", "half")  # ...its reference is cut short...
  _corrupt(it1 / "pairs.json", "empty")
  # ...and checkpoint 2 is a write killed before its commit (Orbax's temp name), so iteration 1
  # trains again from checkpoint 1 on the recomputed pairs and reference.
  os.rename(ckpts / "2", ckpts / "2.orbax-checkpoint-tmp-1700000000000000")
  shutil.copytree(ckpts / "1", ckpts / "0")  # A step keep-N was deleting when killed:
  shutil.rmtree(ckpts / "0" / "default")  # its array data already gone.
  proc = run_smoke(workdir, "--config.iterations=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name, reason in (("evaluate.json", "empty file"), ("reference.npz", "not a readable .npz"),
                       ("pairs.json", "empty file")):
    assert f"corrupt artifact {it1 / name}: {reason}" in proc.stderr
  _assert_same_run(workdir, smoke_reference)


def _derived(name):
  return name in ("metrics.jsonl", "report.md") or name.startswith("plots/")


def test_unrecoverable_artifacts_stop_with_one_error_and_change_nothing(smoke_reference,
                                                                        run_smoke, tmp_path):
  """A committed checkpoint that cannot be read, or the prompt buffer an iteration hands on
  (its checkpoint is gone, so it cannot be recomputed), stop the run with one error naming the
  file; every artifact and checkpoint that was there is still there, unchanged."""
  ckpt_run = _copy_run(smoke_reference, tmp_path / "ckpt")
  (ckpt_run / "iter_001" / "evaluate.json").unlink()  # Iteration 1 must evaluate checkpoint 2,
  data = ckpt_run / "checkpoints" / "2" / "default" / "ocdbt.process_0" / "d"
  for blob in data.iterdir():  # whose array data is cut short.
    _corrupt(blob, "half")
  buffer_run = _copy_run(smoke_reference, tmp_path / "buffer")
  (buffer_run / "iter_001" / "create.json").unlink()  # Iteration 1 must create again...
  (buffer_run / "iter_001" / "evaluate.json").unlink()
  _corrupt(buffer_run / "iter_000" / "buffer.jsonl", "half")  # ...from a cut-short buffer.
  for workdir, culprit in ((ckpt_run, ckpt_run / "checkpoints" / "2"),
                           (buffer_run, buffer_run / "iter_000" / "buffer.jsonl")):
    before = _snapshot(workdir)
    metrics_before = (workdir / "metrics.jsonl").read_bytes()
    proc = run_smoke(workdir, "--config.iterations=2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "CorruptArtifact:" in line]
    assert len(errors) == 1 and f"corrupt artifact {culprit}: " in errors[0], proc.stderr[-3000:]
    after = _snapshot(workdir)
    # The report is derived: rewritten from the artifacts after each iteration, so it now shows
    # the iterations this run got through. The metrics log only grows.
    assert {k: v for k, v in after.items() if k in before and not _derived(k)} == \
        {k: v for k, v in before.items() if not _derived(k)}
    assert (workdir / "metrics.jsonl").read_bytes().startswith(metrics_before)


def test_disk_full_mid_run_stops_cleanly_and_resumes_exactly(smoke_reference, run_smoke,
                                                            tmp_path):
  """An artifact write that fails half-way (ENOSPC, injected) stops the run with one error
  naming the file, leaves no partial file and every earlier artifact intact; a restart on a
  healthy disk ends bit-identical to the uninterrupted run."""
  workdir = _copy_run(smoke_reference, tmp_path / "run")
  shutil.rmtree(workdir / "iter_001")  # Back to the state after iteration 0.
  shutil.rmtree(workdir / "checkpoints" / "2")
  for point in ("reference.npz", "evaluate.json", "report.md"):
    before = _artifacts(workdir)
    proc = run_smoke(workdir, "--config.iterations=2", env={"EVA_TEST_FAIL_WRITE_AT": point})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "No space left on device" in line]
    assert len(errors) == 1 and point in errors[0], proc.stderr[-3000:]
    _assert_kept(before, workdir)
    leftovers = [p for p in workdir.rglob("*") if ".tmp" in p.name and "orbax" not in p.name]
    assert not leftovers
  proc = run_smoke(workdir, "--config.iterations=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  _assert_same_run(workdir, smoke_reference)


def test_restart_on_another_device_count_is_refused(smoke_reference, run_smoke):
  """mesh.data = -1 resolved to 2 devices there; on 1 device the same config would sample and
  train differently, so the restart stops before touching the workdir."""
  before = _snapshot(smoke_reference)
  proc = run_smoke(smoke_reference, "--config.iterations=2",
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert proc.returncode != 0
  assert ("workdir holds a run on mesh data 2 x fsdp 1 x tensor 1, but this start resolves "
          "mesh.data/fsdp/tensor to data 1 x fsdp 1 x tensor 1") in proc.stderr
  assert _snapshot(smoke_reference) == before


def _env(cache_dir, **extra):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT)
  env.update(extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(smoke_reference, smoke_cache, tmp_path):
  """2 CPU processes x 1 device (jax.distributed over gloo) vs 1 process x 2 fake devices, on
  one iteration (the reference's checkpoint 1)."""
  two = tmp_path / "two"
  port = _free_port()
  cmd = [sys.executable, "-m", "eva_jax.main", "--config=configs/default.py:smoke",
         f"--workdir={two}", "--config.checkpoint.use_async=True"]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(
      smoke_cache, XLA_FLAGS="", EVA_COORDINATOR=f"127.0.0.1:{port}", EVA_NUM_PROCESSES="2",
      EVA_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  _, params_one = checkpoints.checkpoint_arrays(smoke_reference, 1)
  _, params_two = checkpoints.checkpoint_arrays(two, 1)
  assert len(params_one) == len(params_two)
  for a, b in zip(params_one, params_two):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  one_iteration = {k for k in _artifacts(smoke_reference) if k.startswith("iter_000/")}
  assert _artifacts(two).keys() == one_iteration
  assert (json.loads((smoke_reference / "iter_000" / "pairs.json").read_text())
          == json.loads((two / "iter_000" / "pairs.json").read_text()))
