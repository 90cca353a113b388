"""Entry point: python -m eva_jax.main --config=configs/<file>.py[:arg] --workdir=DIR.

Overrides: --config.key=value (ml_collections config_flags).

Console: a progress bar for each long stage on stderr (when it is a terminal; --progress=on/off
forces them), one summary line per stage on stdout ("iter 0  generate  12.3 s  prompts 2048,
...", "cached" for a stage loaded from its artifact on resume), and last the report's path.
Only process 0 prints. Warnings are always shown; the INFO logs of absl, Orbax and JAX (per-save
throughput, threads, backend probing) are off unless asked for with absl's verbosity flag:
--verbosity=0 (or -v 0) shows INFO, --verbosity=1 DEBUG.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for artifacts, checkpoints and metrics.")
_PROGRESS = flags.DEFINE_enum("progress", "auto", ["auto", "on", "off"],
                              "Progress bars on stderr: auto = only when it is a terminal.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from eva_jax import console
  verbosity = flags.FLAGS["verbosity"]
  console.quiet_logs(verbosity.value if verbosity.present else None)
  console.configure(progress={"auto": None, "on": True, "off": False}[_PROGRESS.value])
  import jax
  from eva_jax import context, fileio, online_loop, runner
  context.init_distributed()
  logging.info("JAX %s: process %d/%d, devices %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  console.say(f"eva: workdir {_WORKDIR.value}; {jax.device_count()} {jax.default_backend()} "
              f"device(s), {jax.process_count()} process(es)")
  # A config with an `online` section (configs/online.py) runs the online RLOO loop.
  loop = online_loop if "online" in _CONFIG.value else runner
  summary = loop.run(_CONFIG.value, _WORKDIR.value)
  win = summary.get("win_rate")
  console.say(f"done: held-out reward {summary['heldout_reward']:.4f}"
              + ("" if win is None else f", win rate vs warm-start {win:.3f}"))
  report = fileio.join(_WORKDIR.value, "report.md")
  if fileio.exists(report):
    console.say(f"report: {report}")


if __name__ == "__main__":
  app.run(main)
