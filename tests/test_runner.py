"""The runner: config validation, exact resume after SIGKILL, and two processes vs one.

The end-to-end tests run `python -m eva_jax.main` in subprocesses on the smoke config, with a
persistent compilation cache shared between them so that only the first one compiles.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import default as default_config
from eva_jax import config_check, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# --- end to end in subprocesses ---


def _env(cache_dir, **extra):
  env = dict(os.environ)
  # Single-process runs see 2 devices, the same mesh (data=2) as the two-process run.
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT)
  env.update(extra)
  return env


def _main(workdir, cache_dir, *flags, **env):
  cmd = [sys.executable, "-m", "eva_jax.main", "--config=configs/default.py:smoke",
         f"--workdir={workdir}", "--config.checkpoint.use_async=True", *flags]
  return subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir, **env), capture_output=True,
                        text=True, timeout=600)


def _final_params(workdir):
  """The last checkpoint's arrays, read back with Orbax (no target: plain numpy)."""
  import orbax.checkpoint as ocp
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  import jax
  path = os.path.join(workdir, "checkpoints", str(steps[-1]), "default")
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckpt:
    # Onto one device, whatever topology wrote it (the two-process run saves from 2 hosts).
    meta = ckpt.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          meta, is_leaf=lambda m: hasattr(m, "shape"))
    restored = ckpt.restore(path, target)
  return steps[-1], [np.asarray(x) for x in jax.tree.leaves(restored)]


def _artifacts(workdir):
  """Every stage artifact (everything under iter_*), by content."""
  snap = _snapshot(workdir)
  return {k: v for k, v in snap.items() if k.startswith("iter_")}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("reference")
  cache = tmp_path_factory.getbasetemp() / "jax_cache"
  proc = _main(root / "run", cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / "run", cache


def test_resume_after_sigkill_is_exact(reference_run, tmp_path):
  ref_dir, cache = reference_run
  workdir = tmp_path / "run"
  # Each restart skips what the previous run finished, so the counts are per process:
  # the second sampling call (after the warm-start evaluation), the second update of
  # iteration 0, and the first checkpoint this process writes (iteration 1, async).
  for point in ("sampling:2", "train_step:2", "checkpoint_write:1"):
    proc = _main(workdir, cache, EVA_TEST_KILL_AT=point)
    assert proc.returncode == -9, f"{point} did not kill: {proc.stderr[-2000:]}"
  proc = _main(workdir, cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step, params = _final_params(workdir)
  ref_step, ref_params = _final_params(ref_dir)
  assert step == ref_step
  for a, b in zip(params, ref_params):
    np.testing.assert_array_equal(a, b)  # Bit for bit.
  assert _artifacts(workdir) == _artifacts(ref_dir)
  report = (workdir / "report.md").read_text()
  assert "held-out reward" in report
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert any(r["kind"] == "eval" for r in rows)


def test_restart_on_another_device_count_is_refused(reference_run):
  """mesh.data = -1 resolved to 2 devices there; on 1 device the same config would sample and
  train differently, so the restart stops before touching the workdir."""
  ref_dir, cache = reference_run
  before = _snapshot(ref_dir)
  proc = _main(ref_dir, cache, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  assert proc.returncode != 0
  assert ("workdir holds a run on mesh data 2 x fsdp 1 x tensor 1, but this start resolves "
          "mesh.data/fsdp/tensor to data 1 x fsdp 1 x tensor 1") in proc.stderr
  assert _snapshot(ref_dir) == before


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(reference_run, tmp_path):
  """2 CPU processes x 1 device (jax.distributed over gloo) vs 1 process x 2 fake devices."""
  one, cache = reference_run
  two = tmp_path / "two"
  port = _free_port()
  cmd = [sys.executable, "-m", "eva_jax.main", "--config=configs/default.py:smoke",
         f"--workdir={two}", "--config.checkpoint.use_async=True"]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(
      cache, XLA_FLAGS="", EVA_COORDINATOR=f"127.0.0.1:{port}", EVA_NUM_PROCESSES="2",
      EVA_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  _, params_one = _final_params(one)
  _, params_two = _final_params(two)
  for a, b in zip(params_one, params_two):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert _artifacts(one).keys() == _artifacts(two).keys()
  assert (json.loads((one / "iter_000" / "pairs.json").read_text())
          == json.loads((two / "iter_000" / "pairs.json").read_text()))
