"""experiments/gpu_check.py end to end at its smoke size on CPU (the kernel interpreted): one JSON
object on stdout with every field, the kernel within rounding of the float32 reference, and the
MFU and bandwidth figures consistent with the timings they come from."""
import json
import os
import subprocess
import sys

import pytest

from experiments import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "experiments/gpu_check.py", "--smoke"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, proc.stdout
  return json.loads(lines[0])


def test_kernel_matches_reference(smoke):
  diffs = smoke["kernel"]["max_abs_diff"]
  assert set(diffs) == {"float32", "bfloat16"}
  assert max(diffs["float32"][k] for k in ("logprob", "d_hidden", "d_w_out")) < 1e-4
  # bfloat16 inputs against the float32 reference on the same (rounded) values: the kernel
  # accumulates in float32, its bf16 gradients carry bf16 rounding (2^-8 relative).
  assert diffs["bfloat16"]["logprob"] < 1e-4
  assert max(diffs["bfloat16"]["d_hidden"], diffs["bfloat16"]["d_w_out"]) < 0.05


def test_update_and_sample_figures(smoke):
  assert smoke["smoke"] and smoke["platform"] == "cpu"
  update = smoke["update"]
  assert update["tokens"] == 2 * gpu_check.SIZES["smoke"]["pairs"] * (
      gpu_check.SIZES["smoke"]["seq_len"])
  assert update["model_flops"] == 6 * update["params"] * update["tokens"]
  assert update["mfu"] == pytest.approx(
      update["model_flops"] / update["seconds_per_step"] / smoke["peak_flops"])
  sample = smoke["sample"]
  rows = sample["prompts"] * sample["samples"]
  assert sample["tokens_per_s"] == pytest.approx(rows * sample["new_tokens"] / sample["seconds"])
  assert sample["hbm_fraction"] is None  # The CPU has no published HBM bandwidth.


def test_peaks_by_device_kind():
  class Device:
    platform = "gpu"
    device_kind = ""

  for kind, want in [("NVIDIA H100 80GB HBM3", (989e12, 3.35e12)),
                     ("NVIDIA H200", (989e12, 4.8e12)), ("NVIDIA A10G", (None, None))]:
    Device.device_kind = kind
    assert gpu_check.peaks(Device) == want, kind
