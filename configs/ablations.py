r"""Ablations on the embedded default (issue 8), each over seeds at equal budget.

  python experiments/ablations.py --names=eva_vs_static,metric,selection \
      --workdir_root=/tmp/eva_ablations

runs every sweep below (sequentially, on the local devices) and writes the table and plot;
one sweep alone:
  python experiments/sweep.py --config=configs/ablations.py:metric --workdir_root=/tmp/eva_abl
and one of its runs by hand:
  python -m eva_jax.main --config=configs/ablations.py:metric \
      --workdir=/tmp/eva_abl/metric-var_seed-1 --config.creator.metric=var --config.seed=1

Sweeps (`get_sweep(NAME)`, dotted overrides of `get_config(NAME)`):
  eva_vs_static  creator.enabled True / False: evolved prompts vs fresh base prompts
  metric         creator.metric gap / var / mean: the informativeness that guides selection
  selection      creator.selection weighted / greedy / uniform: how prompts are picked to evolve

Every variant trains on the same budget: the fields of `train` (pairs per iteration, epochs,
batch size, so the same number of update steps), `iterations`, `sft` and the sampling settings
come from configs/default.py unchanged. The variant that equals the default (eva, gap,
weighted) is written as a seed-only override, so its runs are shared by all three sweeps when
they use the same workdir root.
"""
import ml_collections

from configs import default

SEEDS = (0, 1, 2)

# Sweep name -> (the dotted field it varies, its values; the default's value first).
ABLATIONS = {
    "eva_vs_static": ("creator.enabled", (True, False)),
    "metric": ("creator.metric", ("gap", "var", "mean")),
    "selection": ("creator.selection", ("weighted", "greedy", "uniform")),
}


def _check(arg: str) -> None:
  if arg not in ABLATIONS:
    raise ValueError(f"configs/ablations.py: unknown arg {arg!r} (expected one of "
                     f"{', '.join(map(repr, ABLATIONS))})")


def get_config(arg: str = "eva_vs_static") -> ml_collections.ConfigDict:
  """The shared base of a sweep: the default, identical for every sweep so runs can be shared."""
  _check(arg)
  return default.get_config()


def get_sweep(arg: str = "eva_vs_static") -> list[dict]:
  """Dotted overrides, one dict per run: every value of the varied field × SEEDS.

  A value equal to the base config's is left out of its dict, so e.g. the `gap` runs of
  `metric` and the `weighted` runs of `selection` are the same runs, in the same folders.
  """
  _check(arg)
  field, values = ABLATIONS[arg]
  base = get_config(arg)
  section, key = field.split(".")
  runs = []
  for value in values:
    for seed in SEEDS:
      runs.append({"seed": seed} if base[section][key] == value else {field: value, "seed": seed})
  return runs
