"""configs/paper.py: every grid config builds, validates against real (tiny) local folders, and
carries the published hyperparameters (the numbers below are typed in by hand from DESIGN.md and
the SimPO / SPPO / ORPO authors' recipes, not read from the config module)."""
import itertools
import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import default, paper, real_small
from eva_jax import (config_check, creator, data, losses, models, reward, sources, stages, train,
                     train_state)
from eva_jax.models import hf
from eva_jax.models import tokenizer as tokenizer_lib
from tests import shared_data

GRID = [f"{loss},{prompts}" for loss, prompts in
        itertools.product(("dpo", "sppo_hard", "simpo", "orpo"), ("static", "eva"))]
PAPER_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "paper.py")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """A tiny Gemma 2 policy, a tiny Gemma 2 reward model (both with a tokenizer) and a prompt
  file, in the layouts the paper's configs point at."""
  root = tmp_path_factory.mktemp("paper")
  tok = tokenizer_lib.train_sentencepiece(
      ["Write a poem about the sea.", "Explain gradient descent to a child.",
       "What is 12 times 7?"], str(root), vocab_size=64, name="tok")
  out = {}
  for name, num_labels in (("policy", 0), ("reward", 1)):
    path = str(root / name)
    shutil.copytree(tok.path, path)
    config = models.tiny("gemma2", vocab_size=tok.vocab_size, num_labels=num_labels,
                         pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                         eos_token_ids=tuple(tok.eos_ids))
    hf.save(path, config, models.init_params(config, jax.random.key(num_labels)))
    out[name] = path
  prompts = root / "ultrafeedback_prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt_id": str(i), "prompt": f"Question {i}?"}) + "\n"
                             for i in range(5)))
  out["prompts"] = str(prompts)
  return out


def _with_paths(c, folders):
  c.model.path = c.tokenizer.path = folders["policy"]
  c.reward.path = folders["reward"]
  c.data.path = folders["prompts"]
  return c


@pytest.mark.parametrize("arg", GRID + ["dpo,eva,v5e-32", "simpo,static,v5e-64,skywork8b"])
def test_grid_config_validates(arg, folders):
  c = _with_paths(paper.get_config(arg), folders)
  config_check.validate(c)
  assert c.model.source == "hf" and c.tokenizer.kind == "hf"
  assert c.reward.kind == ("neural" if "skywork" in arg else "armorm")
  assert c.data.source == "jsonl"
  assert c.creator.enabled == arg.split(",")[1].startswith("eva")
  assert c.creator.evolver == "lm"


def test_paths_point_at_what_the_runner_loads(folders):
  """The folders the config names load as the runner loads them: a causal Gemma 2 policy with
  its tokenizer, a sequence-classification reward model (Skywork's kind; ArmoRM's loader is
  tests/test_armorm.py's), and the prompt file."""
  c = _with_paths(paper.get_config("dpo,eva,skywork27b"), folders)
  policy, _ = hf.load(c.model.path, dtype=c.model.param_dtype, compute_dtype=c.model.dtype)
  assert policy.family == "gemma2" and not policy.is_reward_model
  assert policy.param_dtype == "float32" and policy.dtype == "bfloat16"
  rm, _ = hf.load(c.reward.path, dtype=c.model.dtype)
  assert rm.is_reward_model
  tok = tokenizer_lib.load_tokenizer(c.tokenizer.path)
  assert tok.apply_chat_template("hi", add_generation_prompt=True)
  assert [p.text for p in data.load_prompts(c.data.path, process_index=0, process_count=1)] == [
      f"Question {i}?" for i in range(5)]


def test_shared_paper_settings():
  for arg in GRID:
    c = paper.get_config(arg)
    assert c.sampling.num_samples == 6
    assert c.sampling.temperature == 0.7
    assert c.sampling.top_p == 0.9
    assert c.sampling.top_k == 0
    assert c.sampling.max_new_tokens == 2048
    assert c.train.max_length == 2048 and c.train.max_prompt_length == 1024
    assert c.sampling.max_prompt_length == 1024
    assert c.train.warmup_ratio == 0.1
    assert c.creator.metric == "gap" and c.creator.selection == "weighted"
    assert c.creator.fraction == 0.25 and c.creator.num_evolutions == 4
    assert c.creator.base_ratio == 0.2
    assert c.train.min_chosen_reward == float("-inf")  # No floor on the chosen reward.
    assert c.model.param_dtype == "float32" and c.model.dtype == "bfloat16"
    assert c.protocol == "paper" and c.iterations == 2  # θ0 → θ1 on X1, then X̃1 or X2.


def test_split_by_3_runs_three_iterations_of_the_paper_protocol():
  c = paper.get_config("dpo,eva,split3")
  assert c.protocol == "paper" and c.iterations == 3
  assert paper.get_config("dpo,static,v5e-64,split3").iterations == 3


# (beta, hparams, optimizer, learning rate, epochs, pairs per update), typed in by hand.
EXPECTED = {
    "dpo": (0.05, {}, "adamw", 5e-7, 2, 64),
    "sppo_hard": (0.001, {}, "rmsprop", 5e-7, 2, 64),
    "simpo": (10.0, {"gamma_beta_ratio": 0.5}, "adamw", 8e-7, 1, 128),
    "orpo": (0.1, {}, "adamw", 5e-7, 2, 64),
}


@pytest.mark.parametrize("loss", sorted(EXPECTED))
def test_loss_hyperparameters(loss):
  beta, hparams, optimizer, lr, epochs, batch = EXPECTED[loss]
  for prompts in ("static", "eva"):
    c = paper.get_config(f"{loss},{prompts}")
    assert c.train.loss == loss
    assert c.train.beta == beta
    assert dict(c.train.hparams) == hparams
    assert c.train.optimizer == optimizer
    assert c.train.learning_rate == lr
    assert c.train.epochs == epochs
    assert c.train.batch_size == batch
    assert c.train.weight_decay == 0.0


@pytest.mark.parametrize("arg", GRID)
def test_loss_and_optimizer_settings_build(arg):
  """The runner's own builders accept the config: the preference loss with its beta and hparams
  gives a finite loss, and the optimizer (schedule included) initialises."""
  c = paper.get_config(arg)
  loss_cfg = train.LossConfig(c.train.loss, beta=c.train.beta, hparams=dict(c.train.hparams),
                              accum_steps=c.train.grad_accum)
  ones = jnp.ones(2)
  loss, _ = losses.preference_loss(loss_cfg.objective, -2.0 * ones, -3.0 * ones, -2.5 * ones,
                                   -2.5 * ones, beta=loss_cfg.beta, chosen_lengths=4 * ones,
                                   rejected_lengths=5 * ones, **loss_cfg.hparams)
  assert jnp.isfinite(loss)
  opt_cfg = stages.optimizer_config(c.train, 100)
  assert opt_cfg.name == c.train.optimizer and opt_cfg.max_grad_norm == 1.0
  schedule = train_state.make_schedule(opt_cfg)
  assert float(schedule(10)) == pytest.approx(c.train.learning_rate)  # warm-up ends at 10 %
  train_state.make_optimizer(opt_cfg).init({"w": jnp.zeros(3)})


@pytest.mark.parametrize("arg,mesh,accum,prompts", [
    ("dpo,eva", (1, 4, 1), 16, 16),           # v5p-8: 64 pairs = 16 micro-batches x 4 chips x 1
    ("simpo,static", (1, 4, 1), 32, 16),      # 128 pairs = 32 x 4 x 1
    ("dpo,eva,v5e-32", (1, 32, 1), 2, 32),    # 64 pairs = 2 x 32 chips x 1
    ("simpo,eva,v5e-64", (1, 64, 1), 2, 32),  # 128 pairs = 2 x 64 chips x 1
])
def test_slice_mesh_and_accumulation(arg, mesh, accum, prompts):
  c = paper.get_config(arg)
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == mesh
  assert c.train.grad_accum == accum
  assert c.sampling.batch_size == prompts  # Prompts per sampling call, sized per slice.
  # stages.train_batch_size keeps the configured batch: it is a multiple of data*fsdp*accum.
  assert c.train.batch_size % (mesh[0] * mesh[1] * accum) == 0


def test_reward_model_choice():
  """ArmoRM by default (the paper's), Skywork as the reward-scaling option; no truncation
  penalty, as in the eva authors' reward step."""
  for arg, kind, folder in (("dpo,eva", "armorm", "ArmoRM-Llama3-8B-v0.1"),
                            ("dpo,eva,skywork27b", "neural", "Skywork-Reward-Gemma-2-27B-v0.2"),
                            ("dpo,eva,skywork8b", "neural", "Skywork-Reward-Llama-3.1-8B-v0.2")):
    c = paper.get_config(arg)
    assert c.reward.kind == kind and c.reward.path.endswith(folder)
    assert c.reward.truncated_penalty == 0.0


@pytest.mark.parametrize("arg", ["dpo", "kto,eva", "dpo,evolved", "dpo,eva,v4-8", ""])
def test_bad_arg_raises(arg):
  with pytest.raises(ValueError, match="configs/paper.py"):
    paper.get_config(arg)


def test_loads_through_config_flags():
  """The launch command's --config=configs/paper.py:<arg> form, with overrides, as main.py
  parses it."""
  argv = [__file__, f"--config={PAPER_FILE}:sppo_hard,eva,v5p-8",
          "--config.data.num_prompts=128"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  c = values.config
  assert (c.train.loss, c.train.optimizer, c.creator.enabled) == ("sppo_hard", "rmsprop", True)
  assert (c.mesh.fsdp, c.data.num_prompts) == (4, 128)


@pytest.mark.parametrize("field,names", [
    ("creator.metric", creator.INFORMATIVENESS.names()),
    ("creator.selection", creator.SELECTORS.names()),
    ("creator.evolver", creator.EVOLVERS.names()),
    ("reward.kind", reward.SCORERS.names()),
    ("data.source", sources.SOURCES.names()),
])
def test_names_are_checked_against_their_registry(field, names):
  """Validation lists exactly what the registry holds (no copied list to fall out of date)."""
  assert len(names) >= 2
  c = default.get_config("smoke")
  section, key = field.split(".")
  c[section][key] = "no_such_name"
  with pytest.raises(ValueError, match=re.escape(
      f"config field {field}: 'no_such_name' is not one of {', '.join(map(repr, names))}")):
    config_check.validate(c)


def test_real_small_config_validates_on_disjoint_arena_hard_prompts(smollm2_path, monkeypatch):
  """configs/real_small.py (not run here: it takes minutes) points policy, creator, judge and
  tokenizer at the one SmolLM2 folder and draws 16 training prompts and 8 held-out ones, none
  shared, from the Arena-Hard file."""
  monkeypatch.setenv("EVA_SHARED_DATA", str(shared_data.arena_path().parent))
  c = real_small.get_config()
  config_check.validate(c)
  assert c.model.path == c.tokenizer.path == c.reward.path == smollm2_path
  assert (c.model.source, c.tokenizer.kind, c.reward.kind, c.creator.evolver, c.data.source) == (
      "hf", "hf", "judge", "lm", "jsonl")
  assert c.iterations == 1
  source = sources.make(c)
  train_ids = {p.id for p in source.base_prompts(0)}
  heldout_ids = {p.id for p in source.heldout()}
  assert (len(train_ids), len(heldout_ids)) == (16, 8) and not train_ids & heldout_ids


# The eva authors' recipes for the losses they ran beyond the grid above, typed in by hand:
# (beta, hparams, optimizer, learning rate, epochs, pairs per update, schedule).
AUTHORS_EXPECTED = {
    "sppo": (0.001, {}, "rmsprop", 5e-7, 2, 64, "linear"),
    "rpo": (0.1, {"alpha": 1.0, "penalize_length_nll": True}, "adamw", 5e-7, 1, 64, "cosine"),
    "ipo": (0.6, {}, "adamw", 5e-7, 2, 64, "cosine"),
}


@pytest.mark.parametrize("loss", sorted(AUTHORS_EXPECTED))
def test_authors_loss_recipes(loss, folders):
  """sppo (soft targets), rpo and ipo validate, carry the authors' settings, build a finite loss
  and their optimizer: linear decays to 0.8 of the peak at step 28 of 100 (10 warm-up steps),
  cosine to 0.5 · (1 + cos(π · 18 / 90))."""
  beta, hparams, optimizer, lr, epochs, batch, schedule = AUTHORS_EXPECTED[loss]
  for prompts in ("static", "eva"):
    c = _with_paths(paper.get_config(f"{loss},{prompts}"), folders)
    config_check.validate(c)
    assert (c.train.loss, c.train.beta, dict(c.train.hparams), c.train.optimizer,
            c.train.learning_rate, c.train.epochs, c.train.batch_size, c.train.schedule,
            c.train.warmup_ratio, c.train.win_prob_scale) == (
                loss, beta, hparams, optimizer, lr, epochs, batch, schedule, 0.1, 1.0)
  ones = jnp.ones(2)
  value, _ = losses.preference_loss(
      loss, -2.0 * ones, -3.0 * ones, -2.5 * ones, -2.5 * ones, beta=beta,
      chosen_lengths=4 * ones, rejected_lengths=5 * ones, chosen_win_prob=0.7 * ones,
      rejected_win_prob=0.3 * ones, **dict(c.train.hparams))
  assert jnp.isfinite(value)
  opt_cfg = stages.optimizer_config(c.train, 100)
  assert (opt_cfg.name, opt_cfg.schedule) == (optimizer, schedule)
  rate = train_state.make_schedule(opt_cfg)
  assert float(rate(10)) == pytest.approx(lr)
  decayed = 0.8 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * 18 / 90))
  assert float(rate(28)) == pytest.approx(decayed * lr, rel=1e-5)
  train_state.make_optimizer(opt_cfg).init({"w": jnp.zeros(3)})


def test_sppo_loads_through_config_flags_and_bad_schedules_are_refused():
  argv = [__file__, f"--config={PAPER_FILE}:sppo,static,v5e-64"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  c = values.config
  assert (c.train.loss, c.train.optimizer, c.train.schedule, c.mesh.fsdp) == (
      "sppo", "rmsprop", "linear", 64)
  c = default.get_config("smoke")
  assert c.train.schedule == "cosine" and c.train.win_prob_scale == 1.0
  c.train.schedule = "constant"
  with pytest.raises(ValueError, match="config field train.schedule: 'constant' is not one of"):
    config_check.validate(c)
  c = default.get_config("smoke")
  c.train.win_prob_scale = 0.0
  with pytest.raises(ValueError, match="config field train.win_prob_scale: must be a positive"):
    config_check.validate(c)


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.1, "creator.temperature: must be >= 0"),
    ("top_p", 0.0, "creator.top_p: must lie in"),
    ("max_new_tokens", 0, "creator.max_new_tokens: must be a positive number"),
])
def test_creator_sampling_fields_are_checked(field, value, match):
  c = default.get_config("smoke")
  c.creator[field] = value
  with pytest.raises(ValueError, match=match):
    config_check.validate(c)


def test_template_set_is_checked_and_the_paper_runs_evolinstruct():
  c = default.get_config("smoke")
  assert c.creator.template_set == "eva"  # The default keeps today's ten templates.
  c.creator.template_set = "wizardlm"
  with pytest.raises(ValueError, match=re.escape(
      "config field creator.template_set: 'wizardlm' is not one of 'eva', 'evolinstruct'")):
    config_check.validate(c)
  for arg in GRID:
    c = paper.get_config(arg)
    assert (c.creator.template_set, c.creator.num_evolutions) == ("evolinstruct", 4)


# The eva authors' Llama-3.1-8B-Instruct and Mistral-7B-Instruct-v0.2 recipes, typed in by hand
# from their scripts/llama-8b/, scripts/mistral-7b/ and recipes/default/*-evol-1-mixed-0.2-0.8-
# pair.yaml (the same for both models).
RECIPE_FOLDERS = {"llama31_8b": ("/mnt/models/Meta-Llama-3.1-8B-Instruct", "llama"),
                  "mistral_7b": ("/mnt/models/Mistral-7B-Instruct-v0.2", "mistral")}


@pytest.mark.parametrize("model", sorted(RECIPE_FOLDERS))
def test_authors_model_recipes(model, folders):
  path, family = RECIPE_FOLDERS[model]
  for prompts in ("static", "eva"):
    c = paper.get_config(f"sppo,{prompts},{model}")
    assert (c.model.path, c.tokenizer.path, c.model.family) == (path, path, family)
    assert (c.train.loss, c.train.beta, c.train.optimizer, c.train.learning_rate,
            c.train.schedule, c.train.warmup_ratio, c.train.epochs, c.train.batch_size) == (
                "sppo", 0.001, "rmsprop", 5e-7, "linear", 0.1, 9, 64)
    assert (c.train.max_length, c.train.max_prompt_length, c.creator.max_tokens) == (
        1024, 512, 512)
    assert (c.sampling.num_samples, c.sampling.temperature, c.sampling.top_p,
            c.sampling.max_new_tokens) == (6, 1.0, 1.0, 2048)
    assert (c.creator.template_set, c.creator.num_evolutions, c.creator.temperature,
            c.creator.top_p, c.creator.max_new_tokens) == ("evolinstruct", 4, 1.0, 1.0, 512)
    assert (c.creator.metric, c.creator.selection, c.creator.fraction, c.creator.base_ratio) == (
        "gap", "weighted", 0.25, 0.2)
    assert c.creator.enabled == (prompts == "eva")
    config_check.validate(_with_paths(c, folders))
  # The slice and reward model still combine with it, in any order.
  c = paper.get_config(f"sppo,eva,{model},v5e-64,skywork8b")
  assert (c.mesh.fsdp, c.reward.kind, c.model.path) == (64, "neural", path)
  # The grid's policy is unchanged by default and by name.
  assert paper.get_config("sppo,eva").to_dict() == paper.get_config("sppo,eva,gemma2_9b").to_dict()


@pytest.mark.parametrize("arg,match", [
    ("dpo,eva,llama31_8b", "llama31_8b recipe runs 'sppo', not 'dpo'"),
    ("sppo_hard,static,mistral_7b", "mistral_7b recipe runs 'sppo', not 'sppo_hard'"),
    ("sppo,eva,llama4", "nor a model"),
])
def test_model_recipe_bad_args_raise(arg, match):
  with pytest.raises(ValueError, match=match):
    paper.get_config(arg)


@pytest.mark.parametrize("field,value,match", [
    ("creator.topic_coef", 1.5, r"creator.topic_coef: must lie in \[0, 1\], got 1.5"),
    ("creator.topic_coef", -0.1, r"creator.topic_coef: must lie in \[0, 1\], got -0.1"),
    ("data.topic_field", "topic",
     "data.topic_field: 'topic' is not one of '', 'source', 'category', 'cluster'"),
])
def test_topic_fields_are_checked(field, value, match):
  c = default.get_config("smoke")
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ValueError, match=match):
    config_check.validate(c)


def test_topic_weighted_on_a_prompt_file_needs_a_topic_field(tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_text(json.dumps({"prompt": "hi", "source": "s"}) + "\n")
  c = default.get_config("smoke")
  c.data.source, c.data.path, c.reward.kind = "jsonl", str(path), "judge"
  c.reward.path, c.creator.evolver = str(tmp_path), "lm"
  c.creator.selection = "topic_weighted"
  with pytest.raises(ValueError, match="creator.selection: 'topic_weighted' needs each prompt's "
                     "topic: set data.topic_field"):
    config_check.validate(c)
  c.data.topic_field = "source"
  config_check.validate(c)
  c = default.get_config("smoke")
  c.creator.selection = "topic_weighted"  # Synthetic prompts carry their task names.
  config_check.validate(c)
