r"""The eva authors' ablations on the embedded default (issues 8 and 16), each over seeds.

  python experiments/ablations.py --names=eva_vs_static,metric,selection,subset \
      --workdir_root=/tmp/eva_ablations

runs every sweep below (sequentially, on the local devices) and writes the table and plot;
one sweep alone:
  python experiments/sweep.py --config=configs/ablations.py:metric --workdir_root=/tmp/eva_abl
and one of its runs by hand:
  python -m eva_jax.main --config=configs/ablations.py:metric \
      --workdir=/tmp/eva_abl/metric-var_seed-1 --config.creator.metric=var --config.seed=1

The base is configs/default.py under the paper's protocol (`protocol` "paper", 2 iterations):
both arms train θ0 → θ1 on the first chunk of base prompts without the creator; then eva evolves
that chunk and trains θ1 → θ1̃ while the static baseline trains θ1 → θ2 on a new chunk.

Sweeps (`get_sweep(NAME)`, dotted overrides of `get_config(NAME)`):
  eva_vs_static  creator.enabled True / False: evolved prompts vs fresh base prompts.
  metric         creator.metric, every informativeness of eva_jax.creator: gap (eva's), var,
                 mean, maxmean, loo, dts, gap_inv, mean_inv: which prompts selection favours.
  selection      creator.selection, every method: weighted (eva's), greedy, uniform, stratified,
                 topic_weighted (the authors' iw_topic, creator.topic_coef 0.25; the synthetic
                 topics are the task names): how the prompts to evolve are picked.
  subset         creator.evolve False with creator.selection weighted / greedy (the authors'
                 subset-iw / subset-greedy): select the informative prompts without evolving
                 them and train on their own pairs, to tell the selection's share of eva's gain
                 from the evolution's.

Budget: every variant but subset trains on the same budget, the fields of `train` (pairs per
iteration, epochs, batch size, so the same number of update steps), `iterations`, `sft` and the
sampling settings from configs/default.py unchanged. subset trains only on the selected
prompts' pairs, about creator.fraction of a base chunk's, so on fewer pairs and update steps,
as the authors' subset runs did; the table's pairs and update-step columns show it. The variant
that equals the base (eva, gap, weighted) is written as a seed-only override, so its runs are
shared by every sweep that uses the same workdir root.
"""
import ml_collections

from configs import default

SEEDS = (0, 1, 2, 3, 4)

# Sweep name -> (the dotted field it varies, its values; the base's value first).
ABLATIONS = {
    "eva_vs_static": ("creator.enabled", (True, False)),
    "metric": ("creator.metric", ("gap", "var", "mean", "maxmean", "loo", "dts", "gap_inv",
                                  "mean_inv")),
    "selection": ("creator.selection", ("weighted", "greedy", "uniform", "stratified",
                                        "topic_weighted")),
    "subset": ("creator.selection", ("weighted", "greedy")),
}
# Overrides that every run of a sweep carries besides its varied field and seed.
FIXED = {"subset": {"creator.evolve": False}}


def _check(arg: str) -> None:
  if arg not in ABLATIONS:
    raise ValueError(f"configs/ablations.py: unknown arg {arg!r} (expected one of "
                     f"{', '.join(map(repr, ABLATIONS))})")


def get_config(arg: str = "eva_vs_static") -> ml_collections.ConfigDict:
  """The shared base of a sweep, identical for every sweep so runs can be shared."""
  _check(arg)
  c = default.get_config()
  c.protocol = "paper"
  c.iterations = 2  # The paper's main table: θ0 → θ1, then eva θ1 → θ1̃ vs static θ1 → θ2.
  c.creator.top_up = True  # Equal budget: eva trains as many pairs as static (stages.mix).
  return c


def get_sweep(arg: str = "eva_vs_static") -> list[dict]:
  """Dotted overrides, one dict per run: every value of the varied field × SEEDS.

  A value equal to the base config's is left out of its dict, so e.g. the `gap` runs of
  `metric` and the `weighted` runs of `selection` are the same runs, in the same folders; a
  sweep's FIXED overrides are in every dict, so its runs are never shared with another sweep's.
  """
  _check(arg)
  field, values = ABLATIONS[arg]
  base = get_config(arg)
  section, key = field.split(".")
  runs = []
  for value in values:
    for seed in SEEDS:
      varied = {} if base[section][key] == value else {field: value}
      runs.append({**FIXED.get(arg, {}), **varied, "seed": seed})
  return runs
