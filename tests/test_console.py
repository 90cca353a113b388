"""The console: a stage's metrics row and summary line (computed vs loaded from its artifact),
the stages' progress bars (what they are told adds up to the work done), and the score stage's
chunks (the same rewards as one scorer call, errors naming the prompt's index in the stage)."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import logging as absl_logging

from eva_jax import console, context, reward, stages


class _Metrics:
  def __init__(self):
    self.rows = []

  def log(self, kind, step, **values):
    self.rows.append(dict(kind=kind, step=step, **values))


class _Bar:
  """Records what a stage reports to its bar."""

  opened: list = []

  def __init__(self, desc, total, unit="it"):
    self.desc, self.total, self.done, self.postfix = desc, total, 0, {}
    _Bar.opened.append(self)

  def update(self, n=1):
    self.done += n

  def set_postfix(self, **values):
    self.postfix = values

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def test_stage_logs_seconds_and_says_cached_when_its_compute_did_not_run(capsys):
  metrics = _Metrics()
  with console.Stage(metrics, "generate", 0) as st:
    st.compute(lambda: None)()
    st.note(prompts=8, mean_reward=0.25)
  with console.Stage(metrics, "score", 1) as st:
    st.note(mean_reward=0.5)
  computed, cached = metrics.rows
  assert computed["kind"] == "stage" and computed["stage"] == "generate"
  assert computed["seconds"] >= 0 and computed["cached"] is False
  assert computed["prompts"] == 8 and computed["mean_reward"] == 0.25
  assert cached["cached"] is True and cached["step"] == 1
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("iter 0") and "generate" in out[0]
  assert out[0].endswith(" s  prompts 8, mean_reward 0.250")
  assert out[1].split() == ["iter", "1", "score", "cached", "mean_reward", "0.500"]


def test_a_failed_stage_logs_and_prints_nothing(capsys):
  metrics = _Metrics()
  with pytest.raises(RuntimeError):
    with console.Stage(metrics, "train", 0):
      raise RuntimeError("boom")
  assert metrics.rows == [] and capsys.readouterr().out == ""


def _gen(num_prompts, n):
  texts = [[f"{p}-{i}" for i in range(n)] for p in range(num_prompts)]
  return {"texts": texts, "finished": np.ones((num_prompts, n), bool)}


def test_score_in_chunks_equals_one_call_and_fills_its_bar(monkeypatch):
  monkeypatch.setattr(stages, "SCORE_CHUNK", 3)
  scorer = reward.ProgrammaticScorer(lambda p, r: float(len(p) * 10 + int(r.split("-")[1])))
  prompts = [f"p{'x' * k}" for k in range(7)]
  gen = _gen(7, 2)
  gen["finished"][4, 1] = False
  scorer.truncated_penalty = 0.5
  _Bar.opened = []
  got = stages.score(scorer, prompts, gen, progress=_Bar)
  want = scorer.score_grouped(prompts, gen["texts"], truncated=~gen["finished"])
  np.testing.assert_array_equal(got, want)
  assert want[4, 1] == 50.5  # len("pxxxx") * 10 + 1 - 0.5: the penalty applied per chunk too.
  (bar,) = _Bar.opened
  assert (bar.desc, bar.total, bar.done) == ("score", 7, 7)


def test_a_non_finite_score_names_its_index_in_the_stage(monkeypatch):
  monkeypatch.setattr(stages, "SCORE_CHUNK", 2)
  scorer = reward.ProgrammaticScorer(lambda p, r: float("nan") if r == "3-1" else 0.0)
  with pytest.raises(reward.NonFiniteScoreError,
                     match=r"prompt index 1 \(response 1\).*counts from prompt 2 of 5") as err:
    stages.score(scorer, [f"q{p}" for p in range(5)], _gen(5, 2))
  assert err.value.index == 3 * 2 + 1  # Flat index of (prompt 3, response 1) in the stage.


def test_bar_is_silent_off_a_terminal_unless_forced():
  for forced, silent in ((False, True), (True, False)):
    console.configure(progress=forced)
    with console.bar("x", 3) as bar:
      assert bar.disable == silent
  console.configure(progress=None)


@pytest.mark.parametrize("verbosity,level", [(None, logging.WARNING), (0, logging.INFO),
                                             (1, logging.DEBUG)])
def test_quiet_logs_sets_absl_and_the_chatty_loggers(verbosity, level):
  before = absl_logging.get_verbosity()
  try:
    console.quiet_logs(verbosity)
    for name in console.CHATTY_LOGGERS:
      assert logging.getLogger(name).level == level
  finally:
    absl_logging.set_verbosity(before)
    for name in console.CHATTY_LOGGERS:
      logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.parametrize("env,chips,nvidia,amd,libtpu,expected", [
    ({}, 0, False, 0, True, "cpu"),              # CPU-only machine with the tpu extra
    ({}, 0, False, 0, False, None),              # no libtpu: JAX probes nothing noisy
    ({}, 4, False, 0, True, None),               # a TPU VM
    ({}, 0, True, 0, True, None),                # an NVIDIA GPU machine
    ({}, 0, False, 2, True, None),               # an AMD GPU machine
    ({"JAX_PLATFORMS": "tpu"}, 0, False, 0, True, None),       # the user's own choice
    ({"JAX_FORCE_TPU_INIT": "1"}, 0, False, 0, True, None),
])
def test_platforms_without_absent_tpu(env, chips, nvidia, amd, libtpu, expected):
  assert context.platforms_without_absent_tpu(env, chips, nvidia, amd, libtpu) == expected


def test_a_run_on_a_cpu_machine_starts_without_libtpu_chatter():
  """main.py's first JAX step in a fresh process, JAX_PLATFORMS unset: stderr stays empty."""
  from jax._src import hardware_utils
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] or \
      hardware_utils.has_visible_nvidia_gpu():
    pytest.skip("this machine has an accelerator")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  code = ("from eva_jax import context; context.init_distributed(); import jax; "
          "print(jax.devices()[0].platform)")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  assert out.stdout.strip() == "cpu"
  assert out.stderr == ""
