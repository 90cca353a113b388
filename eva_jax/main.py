"""Entry point: python -m eva_jax.main --config=configs/<file>.py[:arg] --workdir=DIR.

Overrides: --config.key=value (ml_collections config_flags).
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for artifacts, checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  from eva_jax import context, runner
  context.init_distributed()
  logging.info("JAX %s: process %d/%d, devices %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  runner.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
