r"""Expands a config's sweep into runs; runs them one after another here, or prints TPU commands.

  python experiments/sweep.py --config=configs/ablations.py:metric --workdir_root=/tmp/eva_abl
  python experiments/sweep.py --config=configs/ablations.py:metric --workdir_root=/mnt/eva/abl \
      --print_tpu_commands --tpu=my-v4-32 --zone=us-central2-b

A config file may define `get_sweep(arg) -> list[dict]`, one dict of dotted overrides per run
(e.g. [{"seed": 0, "creator.metric": "gap"}, ...]), beside its `get_config(arg)`. Each run gets
the folder `<workdir_root>/<run name>` (the name spells its overrides, e.g. `metric-var_seed-1`)
and is the command `python -m eva_jax.main --config=FILE:ARG --workdir=... --config.key=value`,
so a sweep run is exactly what one would type by hand. Runs resume: rerunning a sweep skips the
finished stages of every run (the runner's own resume).

Locally the runs share a persistent XLA compilation cache (`<workdir_root>/.jax_cache`), so only
the first run pays the compiles. On TPU the printed commands run on all workers of the slice
(experiments/launch_tpu.sh installs the repo there first); paste them one by one or as a script:
each waits for its run to end.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Optional, Sequence

import ml_collections

# Config files import `configs.default` as they do under `python -m eva_jax.main` started from
# the repo root; a script's own folder is what Python puts on sys.path, so add the root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

REMOTE_DIR = "~/eva_jax"  # Where experiments/launch_tpu.sh puts the repo on every TPU worker.


@dataclasses.dataclass(frozen=True)
class SweepRun:
  name: str  # Folder name under the workdir root.
  overrides: dict  # Dotted key -> value, as returned by get_sweep.
  config: ml_collections.ConfigDict  # get_config(arg) with the overrides applied.


def split_spec(spec: str) -> tuple[str, Optional[str]]:
  """'configs/x.py:arg' -> ('configs/x.py', 'arg'); no ':' -> (path, None)."""
  path, sep, arg = spec.partition(":")
  if not path.endswith(".py"):
    raise ValueError(f"--config must name a .py config file (optionally :arg), got {spec!r}")
  return path, (arg if sep else None)


def load_config_module(path: str):
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  name = "sweep_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted overrides set; an unknown key is a ValueError."""
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    *parents, key = dotted.split(".")
    node = config
    for part in parents:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ValueError(f"sweep override {dotted!r}: the config has no section {part!r}")
      node = node[part]
    if key not in node:
      raise ValueError(f"sweep override {dotted!r}: the config has no field {key!r}")
    node[key] = value  # ConfigDict raises TypeError on a value of the wrong type.
  return config


def run_name(overrides: dict[str, Any]) -> str:
  """`{"creator.metric": "var", "seed": 1}` -> 'metric-var_seed-1' (seed last, else sorted)."""
  keys = sorted(overrides, key=lambda k: (k == "seed", k))
  leaves = [k.rsplit(".", 1)[-1] for k in keys]
  if len(set(leaves)) < len(leaves):  # Two sections share a field name: spell the full keys.
    leaves = keys
  parts = [f"{leaf}-{overrides[k]}" for leaf, k in zip(leaves, keys)]
  return re.sub(r"[^A-Za-z0-9._=-]", "-", "_".join(parts)) or "base"


def expand(spec: str) -> list[SweepRun]:
  """The runs of `FILE[:ARG]`: one per get_sweep(ARG) entry (one run if there is no sweep)."""
  path, arg = split_spec(spec)
  module = load_config_module(path)
  args = () if arg is None else (arg,)
  base = module.get_config(*args)
  entries = module.get_sweep(*args) if hasattr(module, "get_sweep") else [{}]
  if not entries:
    raise ValueError(f"{spec}: get_sweep returned no runs")
  runs = []
  for overrides in entries:
    if not isinstance(overrides, dict):
      raise TypeError(f"{spec}: get_sweep must return dicts of dotted overrides, got "
                      f"{type(overrides).__name__}")
    for value in overrides.values():
      _format(value)
    runs.append(SweepRun(run_name(overrides), dict(overrides), apply_overrides(base, overrides)))
  names = [r.name for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"{spec}: several sweep entries map to the run {duplicates[0]!r}")
  return runs


def _format(value: Any) -> str:
  """A scalar as ml_collections' --config.key=value parser reads it back."""
  if not isinstance(value, (bool, int, float, str)):
    raise TypeError(f"sweep values must be bool, int, float or str, got {value!r}")
  return str(value)


def main_args(spec: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
  """The flags of `python -m eva_jax.main` for one run."""
  return [f"--config={spec}", f"--workdir={workdir}",
          *(f"--config.{k}={_format(v)}" for k, v in overrides.items())]


def tpu_command(spec: str, workdir: str, overrides: dict[str, Any], *, tpu: str, zone: str,
                project: str = "", remote_dir: str = REMOTE_DIR) -> str:
  """One gcloud command that starts the run on every worker of a TPU VM slice and waits."""
  path, arg = split_spec(spec)
  relative = os.path.relpath(os.path.abspath(path), ROOT)
  if relative.startswith(".."):
    raise ValueError(f"config {path!r} lies outside the repo {ROOT}: the TPU workers only "
                     "have the repo's copy")
  remote_spec = relative if arg is None else f"{relative}:{arg}"
  # EVA_DISTRIBUTED=1: every worker joins the pod-wide jax.distributed run.
  remote = " ".join(["cd", remote_dir, "&&", "EVA_DISTRIBUTED=1", "python3", "-m", "eva_jax.main",
                     *map(shlex.quote, main_args(remote_spec, workdir, overrides))])
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}",
            *([f"--project={project}"] if project else []), "--worker=all",
            f"--command={remote}"]
  return " ".join(map(shlex.quote, gcloud))


def local_env(workdir_root: str) -> dict[str, str]:
  """The environment of local runs: a compilation cache shared by the sweep's runs."""
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir_root, ".jax_cache"))
  return env


def run_local(spec: str, runs: Sequence[SweepRun], workdir_root: str, *,
              dry_run: bool = False) -> list[str]:
  """Runs each run in its folder, one after another; stops at the first that fails.

  Returns the run folders. The config path is made absolute because the runs start in the repo
  root (where `configs` imports). `dry_run` prints the commands and runs nothing.
  """
  path, arg = split_spec(spec)
  abs_spec = os.path.abspath(path) + ("" if arg is None else f":{arg}")
  workdir_root = os.path.abspath(workdir_root)
  env = local_env(workdir_root)
  folders = []
  for i, run in enumerate(runs):
    folder = os.path.join(workdir_root, run.name)
    cmd = [sys.executable, "-m", "eva_jax.main", *main_args(abs_spec, folder, run.overrides)]
    print(f"[sweep {i + 1}/{len(runs)}] {run.name}: {shlex.join(cmd)}", flush=True)
    folders.append(folder)
    if dry_run:
      continue
    result = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    if result.returncode:
      raise RuntimeError(f"sweep run {run.name!r} failed (exit {result.returncode}); rerun the "
                         "sweep to resume it")
  return folders


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir_root", required=True,
                      help="Each run writes to <workdir_root>/<run name>.")
  parser.add_argument("--dry_run", action="store_true",
                      help="Print the local commands without running them.")
  parser.add_argument("--print_tpu_commands", action="store_true",
                      help="Print one gcloud command per run instead of running them here.")
  parser.add_argument("--tpu", default=os.environ.get("TPU_NAME", ""),
                      help="TPU VM name (default: $TPU_NAME).")
  parser.add_argument("--zone", default=os.environ.get("ZONE", ""),
                      help="TPU zone (default: $ZONE).")
  parser.add_argument("--project", default=os.environ.get("PROJECT_ID", ""),
                      help="GCP project (default: $PROJECT_ID, else gcloud's default).")
  parser.add_argument("--remote_dir", default=REMOTE_DIR,
                      help="The repo's folder on the TPU workers.")


def print_tpu_commands(spec: str, runs: Sequence[SweepRun], args) -> list[str]:
  if not args.tpu or not args.zone:
    raise ValueError("--print_tpu_commands needs --tpu and --zone (or $TPU_NAME and $ZONE)")
  lines = [tpu_command(spec, f"{args.workdir_root.rstrip('/')}/{run.name}", run.overrides,
                       tpu=args.tpu, zone=args.zone, project=args.project,
                       remote_dir=args.remote_dir) for run in runs]
  print("\n".join(lines))
  return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="Config file with get_sweep: FILE.py[:ARG].")
  add_flags(parser)
  args = parser.parse_args(argv)
  runs = expand(args.config)
  if args.print_tpu_commands:
    print_tpu_commands(args.config, runs, args)
  else:
    run_local(args.config, runs, args.workdir_root, dry_run=args.dry_run)


if __name__ == "__main__":
  main()
