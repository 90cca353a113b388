"""The sweep runner, the ablation configs and summarizer, and the TPU launch script.

Nothing here trains: sweeps are expanded and their commands checked (against ml_collections'
own flag parser), the local runner only in dry-run mode, and the summarizer reads fake run
folders whose numbers are written by hand.
"""
import json
import os
import shlex
import subprocess

import pytest
from absl import flags
from ml_collections import config_flags

from configs import ablations as ablation_configs
from configs import default as default_config
from eva_jax import creator
from experiments import ablations, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "experiments", "launch_tpu.sh")
ABL = os.path.join(ROOT, "configs", "ablations.py")


# --- expansion ---


def test_ablation_sweeps_cover_values_times_seeds():
  assert ablation_configs.SEEDS == (0, 1, 2, 3, 4)
  for name, (field, values) in ablation_configs.ABLATIONS.items():
    runs = sweep.expand(f"{ABL}:{name}")
    section, key = field.split(".")
    got = sorted((str(r.config[section][key]), r.config.seed) for r in runs)
    assert got == sorted((str(v), s) for v in values for s in ablation_configs.SEEDS)
    assert len({r.name for r in runs}) == len(runs)
    assert all((r.config.protocol, r.config.iterations) == ("paper", 2) for r in runs)
  # subset: the authors' subset-iw / subset-greedy, selection without evolution.
  subset = sweep.expand(f"{ABL}:subset")
  assert all(r.config.creator.evolve is False and r.config.creator.enabled for r in subset)
  assert {r.name for r in subset if r.config.seed == 0} == {
      "evolve-False_seed-0", "evolve-False_selection-greedy_seed-0"}


def test_ablation_sweeps_cover_every_registered_metric_and_selection():
  """The metric and selection sweeps run every name the creator's registries hold."""
  assert ablation_configs.ABLATIONS["metric"][1] == creator.INFORMATIVENESS.names()
  assert ablation_configs.ABLATIONS["selection"][1] == creator.SELECTORS.names()
  assert ablations.NAMES == tuple(ablation_configs.ABLATIONS)


def test_ablation_runs_share_one_budget_and_the_default_runs():
  runs = [r for name in ablation_configs.ABLATIONS
          for r in sweep.expand(f"{ABL}:{name}")]
  budget = {(r.config.iterations, r.config.train.num_pairs, r.config.train.epochs,
             r.config.train.batch_size, r.config.train.grad_accum, r.config.sft.steps,
             r.config.data.num_prompts, r.config.sampling.num_samples) for r in runs}
  assert len(budget) == 1
  # The default variant (eva, gap, weighted) is the same runs in every sweep but subset, whose
  # runs never evolve.
  base = ablation_configs.get_config().to_dict()
  for name in ablation_configs.ABLATIONS:
    defaults = [r for r in sweep.expand(f"{ABL}:{name}")
                if {k: v for k, v in r.config.to_dict().items() if k != "seed"}
                == {k: v for k, v in base.items() if k != "seed"}]
    expected = [] if name == "subset" else [f"seed-{s}" for s in ablation_configs.SEEDS]
    assert sorted(r.name for r in defaults) == expected


def test_run_names():
  assert sweep.run_name({"seed": 1, "creator.metric": "var"}) == "metric-var_seed-1"
  assert sweep.run_name({"creator.enabled": False, "seed": 0}) == "enabled-False_seed-0"
  assert (sweep.run_name({"train.max_length": 64, "eval.max_length": 32})
          == "eval.max_length-32_train.max_length-64")
  assert sweep.run_name({}) == "base"


def test_bad_sweeps_raise_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown arg 'bogus'"):
    sweep.expand(f"{ABL}:bogus")
  with pytest.raises(ValueError, match="does not exist"):
    sweep.expand(str(tmp_path / "missing.py"))
  config = default_config.get_config()
  with pytest.raises(ValueError, match="'creator.metrc'.*no field 'metrc'"):
    sweep.apply_overrides(config, {"creator.metrc": "gap"})
  with pytest.raises(ValueError, match="no section 'craetor'"):
    sweep.apply_overrides(config, {"craetor.metric": "gap"})
  with pytest.raises(TypeError):
    sweep.apply_overrides(config, {"train.epochs": "two"})
  path = tmp_path / "dup.py"
  path.write_text("from configs import default\nget_config = default.get_config\n"
                  "def get_sweep():\n  return [{'seed': 1}, {'seed': 1}]\n")
  with pytest.raises(ValueError, match="several sweep entries map to the run 'seed-1'"):
    sweep.expand(str(path))


def _parse_like_main(argv):
  """The config eva_jax.main would build from these flags (ml_collections' own parser)."""
  values = flags.FlagValues()
  # config_flags reads the config path from argv when it defines the flag, to know the fields.
  holder = config_flags.DEFINE_config_file("config", None, flag_values=values,
                                           sys_argv=["main", *argv])
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(["main", *argv])
  return holder.value, values.workdir


def test_command_flags_rebuild_the_sweep_config(tmp_path):
  for name in ablation_configs.ABLATIONS:
    for run in sweep.expand(f"{ABL}:{name}"):
      folder = str(tmp_path / run.name)
      config, workdir = _parse_like_main(sweep.main_args(f"{ABL}:{name}", folder, run.overrides))
      assert workdir == folder
      assert config.to_dict() == run.config.to_dict()


# --- commands ---


def test_print_tpu_commands(capsys):
  sweep.main([f"--config={ABL}:metric", "--workdir_root=/mnt/eva/abl/",
              "--print_tpu_commands", "--tpu=pod-1", "--zone=us-central2-b"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 8 * len(ablation_configs.SEEDS)  # 8 metrics
  runs = {r.name: r for r in sweep.expand(f"{ABL}:metric")}
  seen = set()
  for line in lines:
    argv = shlex.split(line)
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1",
                        "--zone=us-central2-b", "--worker=all", argv[8]]
    assert argv[8].startswith("--command=") and len(argv) == 9
    remote = shlex.split(argv[8][len("--command="):])
    assert remote[:7] == ["cd", "~/eva_jax", "&&", "EVA_DISTRIBUTED=1", "python3", "-m",
                          "eva_jax.main"]
    config, workdir = _parse_like_main(remote[7:])
    name = os.path.basename(workdir)
    assert workdir == f"/mnt/eva/abl/{name}"
    assert config.to_dict() == runs[name].config.to_dict()
    seen.add(name)
  assert seen == set(runs)
  with pytest.raises(ValueError, match="needs --tpu and --zone"):
    sweep.main([f"--config={ABL}:metric", "--workdir_root=/x",
                "--print_tpu_commands", "--tpu=", "--zone="])


def test_local_dry_run_prints_and_runs_nothing(tmp_path, capsys):
  runs = sweep.expand(f"{ABL}:selection")
  folders = sweep.run_local(f"{ABL}:selection", runs, str(tmp_path / "root"),
                            dry_run=True)
  assert folders == [str(tmp_path / "root" / r.name) for r in runs]
  assert not (tmp_path / "root").exists()
  out = capsys.readouterr().out
  assert out.count("-m eva_jax.main") == 5 * len(ablation_configs.SEEDS)  # 5 methods
  assert f"--config={ROOT}/configs/ablations.py:selection" in out


def test_ablations_dry_run_runs_the_shared_default_once(tmp_path, capsys):
  ablations.main([f"--workdir_root={tmp_path / 'root'}", "--dry_run"])
  out = capsys.readouterr().out
  names = [line.split(": ")[0].split("] ")[1] for line in out.splitlines()
           if line.startswith("[sweep")]
  # The default runs once: eva_vs_static's 2 variants, then 7, 4 and 2 more.
  assert len(names) == len(set(names)) == len(ablation_configs.SEEDS) * (2 + 7 + 4 + 2)
  assert not (tmp_path / "root").exists()


def _launch(*args, **env):
  full = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "WORKDIR")}
  full.update(env)
  return subprocess.run(["bash", LAUNCH, *args], env=full, capture_output=True, text=True,
                        timeout=60)


def test_launch_script_dry_run():
  assert subprocess.run(["bash", "-n", LAUNCH]).returncode == 0
  proc = _launch("--dry-run", "--create", "--config=configs/ablations.py:metric",
                 "--workdir=/mnt/eva/run 1", "--", "--config.seed=2",
                 "--config.creator.metric=var", TPU_NAME="pod-1", ZONE="us-central2-b")
  assert proc.returncode == 0, proc.stderr
  commands = [shlex.split(line) for line in proc.stdout.strip().splitlines()]
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert [c[:5] for c in commands] == [gcloud + ["create"], commands[1][:5], gcloud + ["scp"],
                                       gcloud + ["ssh"], gcloud + ["ssh"]]
  assert commands[1][:2] == ["tar", "-czf"] and commands[1][-3:] == ["-C", ROOT, "."]
  assert "--accelerator-type=v4-32" in commands[0] and "--worker=all" in commands[2]
  setup, start = commands[3], commands[4]
  assert setup[5:8] == ["pod-1", "--zone=us-central2-b", "--worker=all"]
  assert "pip install -q -e ." in setup[8]
  assert start[5:8] == ["pod-1", "--zone=us-central2-b", "--worker=all"]
  remote = shlex.split(start[8][len("--command="):])
  assert remote == ["cd", "~/eva_jax", "&&", "EVA_DISTRIBUTED=1", "python3", "-m",
                    "eva_jax.main", "--config=configs/ablations.py:metric",
                    "--workdir=/mnt/eva/run 1", "--config.seed=2", "--config.creator.metric=var"]
  config, _ = _parse_like_main(remote[7:])
  assert config.seed == 2 and config.creator.metric == "var"


def test_launch_script_refuses_missing_settings():
  proc = _launch("--dry-run", "--workdir=/w", ZONE="z")
  assert proc.returncode == 2 and "set TPU_NAME" in proc.stderr
  proc = _launch("--dry-run", "--tpu=t", "--zone=z", "--workdir=/w", "--config=configs/no.py")
  assert proc.returncode == 2 and "is not a file" in proc.stderr


# --- the summarizer, on fake run folders ---


def _fake_run(folder, heldout, win_rate, pairs, train_steps):
  """A finished run as the runner lays it out: held-out rewards [warm-start, iter 1..T]."""
  os.makedirs(folder / "iter_000")
  (folder / "iter_000" / "evaluate_warmstart.json").write_text(
      json.dumps({"heldout_reward": heldout[0]}))
  for t, reward in enumerate(heldout[1:]):
    it = folder / f"iter_{t:03d}"
    it.mkdir(exist_ok=True)
    (it / "evaluate.json").write_text(json.dumps({"heldout_reward": reward,
                                                  "win_rate": win_rate}))
    (it / "pairs.json").write_text(json.dumps([{}] * pairs[t]))
  rows = [{"kind": "train", "step": s} for s in train_steps] + [{"kind": "eval", "step": 1}]
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summarizer_on_fake_runs(tmp_path):
  assert ablation_configs.get_config().iterations == 2  # The fake runs below have 2 iterations.
  # eva: gains 0.2, 0.3, 0.1 -> mean 0.2, sample std 0.1; finals 0.3, 0.5, 0.4 -> 0.4 ± 0.1.
  # Seeds 3 and 4 never ran.
  _fake_run(tmp_path / "seed-0", [0.1, 0.25, 0.3], 0.6, [48, 40], range(12))
  _fake_run(tmp_path / "seed-1", [0.2, 0.4, 0.5], 0.7, [48, 40], range(12))
  # A resumed run: steps 0..5 logged twice still count as 12 updates.
  _fake_run(tmp_path / "seed-2", [0.3, 0.35, 0.4], 0.8, [48, 40],
            list(range(6)) + list(range(12)))
  # static: gains 0.05 and 0.15 -> 0.1 ± 0.0707; its seed 2 stopped after 1 iteration.
  _fake_run(tmp_path / "enabled-False_seed-0", [0.1, 0.1, 0.15], 0.5, [48] * 2, range(12))
  _fake_run(tmp_path / "enabled-False_seed-1", [0.2, 0.3, 0.35], 0.4, [48] * 2, range(12))
  _fake_run(tmp_path / "enabled-False_seed-2", [0.2, 0.3], 0.4, [48], range(6))

  ablations.main(["--summarize_only", f"--workdir_root={tmp_path}", "--names=eva_vs_static"])
  table = (tmp_path / "ablations.md").read_text()
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
          if line.startswith("| True") or line.startswith("| False")}
  assert rows["True"][1:] == ["3/5", "0.400 ± 0.100", "0.200 ± 0.100", "0.700 ± 0.100",
                              "44.0 ± 0.0", "12.0 ± 0.0 |"]
  assert rows["False"][1:] == ["2/5", "0.250 ± 0.141", "0.100 ± 0.071", "0.450 ± 0.071",
                               "48.0 ± 0.0", "12.0 ± 0.0 |"]
  assert (tmp_path / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "ablations.json").read_text())
  assert saved["eva_vs_static"]["field"] == "creator.enabled"
  assert saved["eva_vs_static"]["variants"][1]["runs"]["enabled-False_seed-2"] is None


def test_summarizer_with_no_finished_runs_and_bad_names(tmp_path):
  summary = ablations.summarize(str(tmp_path), ["metric"])
  assert [v["value"] for v in summary["metric"]["variants"]] == [
      "gap", "var", "mean", "maxmean", "loo", "dts", "gap_inv", "mean_inv"]
  assert "| gap | 0/5 | – | – | – |" in ablations.markdown_table(summary)
  # subset varies the selection; its fixed creator.evolve False is not a variant.
  summary = ablations.summarize(str(tmp_path), ["subset"])
  assert summary["subset"]["field"] == "creator.selection"
  assert [v["value"] for v in summary["subset"]["variants"]] == ["weighted", "greedy"]
  with pytest.raises(ValueError, match="unknown sweep 'metrics'"):
    ablations.main(["--summarize_only", f"--workdir_root={tmp_path}", "--names=metrics"])
