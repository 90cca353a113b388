"""What a person sees while a run goes: a progress bar per long stage (stderr), one summary line
per stage (stdout), and the libraries' INFO logs off unless asked for.

    bar(desc, total, unit)            a tqdm bar, or a silent one (other processes, no terminal)
    with Stage(metrics, "generate", t) as st:
      out = cached(path, st.compute(fn))   st.compute marks the stage as computed, not loaded
      st.note(prompts=8, mean_reward=0.25)
    → "iter 0  generate          3.1 s  prompts 8, mean_reward 0.250" and a metrics row
      {"kind": "stage", "stage": "generate", "seconds": 3.1, "cached": false, ...}

Stages never print: `eva_jax.stages` takes a bar factory argument (silent by default) and the
runner passes `bar`. Only process 0 of a multi-host run prints.
"""
from __future__ import annotations

import logging as py_logging
import sys
import time
from typing import Callable, Optional

import jax
from absl import logging
from absl.logging import converter
from tqdm import tqdm

# The libraries whose INFO logs (Orbax's per-save throughput and signalling threads, JAX's
# backend probing) drown the run's own lines; `quiet_logs` sets them to WARNING.
CHATTY_LOGGERS = ("absl", "orbax", "jax")

_SETTINGS = {"progress": None}  # None: bars only when stderr is a terminal.


def is_printer() -> bool:
  return jax.process_index() == 0


def configure(*, progress: Optional[bool] = None) -> None:
  """progress: True/False forces the bars on/off; None shows them only on a terminal (a log
  file or a pipe then holds the summary lines alone, not thousands of carriage returns)."""
  _SETTINGS["progress"] = progress


def quiet_logs(verbosity: Optional[int] = None) -> None:
  """verbosity None: WARNING and above only, for absl and the CHATTY_LOGGERS. An int: absl's
  scale (0 INFO, 1 DEBUG, -1 WARNING) for absl and those loggers alike."""
  if verbosity is None:
    logging.set_verbosity(logging.WARNING)
    level = py_logging.WARNING
  else:
    logging.set_verbosity(verbosity)
    level = converter.absl_to_standard(verbosity)
  for name in CHATTY_LOGGERS:
    py_logging.getLogger(name).setLevel(level)


def _bars_on() -> bool:
  if not is_printer():
    return False
  if _SETTINGS["progress"] is not None:
    return _SETTINGS["progress"]
  return sys.stderr.isatty()


def bar(desc: str, total: int, unit: str = "it"):
  """A progress bar on stderr that clears itself when closed (the summary line replaces it)."""
  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
              dynamic_ncols=True, disable=not _bars_on())


def say(line: str) -> None:
  """One line on stdout from process 0, without tearing an open bar."""
  if is_printer():
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _format(value) -> str:
  if isinstance(value, float):
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k}: {_format(v)}" for k, v in value.items()) + "}"
  return str(value)


def stage_line(name: str, iteration: int, seconds: Optional[float], values: dict) -> str:
  """iteration -1 is the warm-start; seconds None: loaded from its cached artifact."""
  where = "warm-start" if iteration < 0 else f"iter {iteration}"
  took = "cached" if seconds is None else f"{seconds:6.1f} s"
  details = ", ".join(f"{k} {_format(v)}" for k, v in values.items())
  return f"{where:<10} {name:<18} {took:>8}  {details}".rstrip()


class Stage:
  """Times one stage. On a clean exit prints its summary line and logs a metrics row of kind
  "stage" (`seconds`, `cached` and the noted values; step = the iteration, -1 the warm-start)."""

  def __init__(self, metrics, name: str, iteration: int):
    self.metrics, self.name, self.iteration = metrics, name, iteration
    self.computed = False
    self.values: dict = {}

  def compute(self, fn: Callable) -> Callable:
    """fn, marking the stage as computed when it runs (a cached artifact skips it)."""
    def run(*args, **kwargs):
      self.computed = True
      return fn(*args, **kwargs)
    return run

  def note(self, **values) -> None:
    self.values.update(values)

  def __enter__(self) -> "Stage":
    self._start = time.perf_counter()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      return
    seconds = time.perf_counter() - self._start
    self.metrics.log("stage", self.iteration, stage=self.name, seconds=round(seconds, 3),
                     cached=not self.computed, **self.values)
    say(stage_line(self.name, self.iteration, seconds if self.computed else None, self.values))
