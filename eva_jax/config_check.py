"""Validation of a run's config before any compute: one clear error naming the field.

Also the workdir lock: the resolved config is saved in the workdir, and a later start with a
config that would change the results is refused unless `overwrite` is set.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

from eva_jax import context, creator, fileio, losses, protocol, reward, sharding, sources
from eva_jax import templates, train_state
from eva_jax import workdir as wd
from eva_jax.kernels.target_logprobs import IMPLS as LOGPROB_IMPLS
from eva_jax.models.config import ATTENTION_IMPLS, FAMILY_FEATURES

# Fields that may differ between a run and its restart without changing its results. Not
# mesh.*, sampling.batch_size or train.grad_accum: sampling keys fold in each chunk's start, and
# the train batch rounds up to a multiple of the batch shards x accumulation steps. Not
# reward.batch_size either: a reward model's scores differ in the last bits with the batch shape
# (measured on CPU: up to 2e-7 between batch sizes 1 and 16), which can flip a best/worst pick.
RESUMABLE_FIELDS = ("overwrite", "checkpoint.use_async", "iterations")

# What the run resolved at start (the mesh shape: mesh.data = -1 means "all devices"), saved
# beside config.json; a restart that resolves differently is refused.
RUN_INFO = "run_info.json"


def _choices() -> dict[str, tuple]:
  """Each name-picked field and its choices, read from where the names are defined."""
  return {
      "protocol": protocol.PROTOCOLS,
      "tokenizer.kind": context.TOKENIZER_KINDS,
      "model.source": context.MODEL_SOURCES,
      "model.family": tuple(FAMILY_FEATURES),
      "model.remat": ("none", "full", "dots"),  # ModelConfig.remat has no public list yet.
      "model.attention_impl": ATTENTION_IMPLS,
      "data.source": sources.SOURCES.names(),
      "data.topic_field": ("",) + sources.TOPIC_FIELDS,
      "reward.kind": reward.SCORERS.names(),
      "creator.metric": creator.INFORMATIVENESS.names(),
      "creator.selection": creator.SELECTORS.names(),
      "creator.evolver": creator.EVOLVERS.names(),
      "creator.template_set": templates.TEMPLATE_SETS.names(),
      "train.optimizer": train_state.OPTIMIZERS,
      "train.schedule": train_state.SCHEDULES,
      "train.logprob_impl": LOGPROB_IMPLS,
  }


def _get(c, dotted: str):
  for key in dotted.split("."):
    c = c[key]
  return c


def _fail(field: str, why: str):
  raise ValueError(f"config field {field}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field."""
  try:
    sharding.rules_from_config(c.mesh.rules)
  except ValueError as e:
    _fail("mesh.rules", str(e))
  for field, choices in _choices().items():
    value = _get(c, field)
    if value not in choices:
      _fail(field, f"{value!r} is not one of {', '.join(map(repr, choices))}")
  if c.train.loss not in losses.available_losses():
    _fail("train.loss", f"{c.train.loss!r} is not one of {', '.join(losses.available_losses())}")

  positive = ("iterations", "data.num_prompts", "sampling.max_new_tokens",
              "sampling.max_prompt_length", "sampling.batch_size", "train.epochs",
              "train.batch_size", "train.grad_accum", "train.num_pairs", "train.max_length",
              "train.max_prompt_length", "train.beta", "train.learning_rate",
              "train.win_prob_scale", "reward.batch_size", "reward.max_length",
              "eval.max_new_tokens", "checkpoint.keep", "model.hidden_size",
              "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.head_dim",
              "model.intermediate_size", "creator.num_evolutions", "creator.max_new_tokens")
  for field in positive:
    value = _get(c, field)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
      _fail(field, f"must be a positive number, got {value!r}")
  if c.sampling.num_samples < 2:
    _fail("sampling.num_samples", f"must be >= 2 (a reward gap needs two responses), got "
          f"{c.sampling.num_samples}")
  for field in ("creator.fraction",):
    value = _get(c, field)
    if not 0 < value <= 1:
      _fail(field, f"must lie in (0, 1], got {value}")
  for field in ("creator.base_ratio", "train.warmup_ratio", "creator.depth_prob",
                "creator.max_similarity", "creator.topic_coef"):
    value = _get(c, field)
    if not 0 <= value <= 1:
      _fail(field, f"must lie in [0, 1], got {value}")
  # -inf (keep every pair) is valid; NaN would silently drop every pair.
  if math.isnan(c.train.min_chosen_reward):
    _fail("train.min_chosen_reward", "must be a number (-inf keeps every pair), got nan")
  if c.sampling.temperature < 0:
    _fail("sampling.temperature", f"must be >= 0, got {c.sampling.temperature}")
  if not 0 < c.sampling.top_p <= 1:
    _fail("sampling.top_p", f"must lie in (0, 1], got {c.sampling.top_p}")
  if c.creator.temperature < 0:
    _fail("creator.temperature", f"must be >= 0, got {c.creator.temperature}")
  if not 0 < c.creator.top_p <= 1:
    _fail("creator.top_p", f"must lie in (0, 1], got {c.creator.top_p}")
  if c.train.max_prompt_length >= c.train.max_length:
    _fail("train.max_prompt_length", f"({c.train.max_prompt_length}) must be below "
          f"train.max_length ({c.train.max_length})")
  if c.model.num_heads % c.model.num_kv_heads:
    _fail("model.num_heads", f"({c.model.num_heads}) must be a multiple of model.num_kv_heads "
          f"({c.model.num_kv_heads})")
  if c.creator.min_tokens > c.creator.max_tokens:
    _fail("creator.min_tokens", "must not exceed creator.max_tokens")
  for kind, field in (("hf", "model.path"), ("hf", "tokenizer.path")):
    source = c.model.source if field == "model.path" else c.tokenizer.kind
    path = _get(c, field)
    if source == kind and not os.path.isdir(path):
      _fail(field, f"checkpoint folder {path!r} does not exist")
  if c.reward.kind in ("neural", "armorm", "judge") and not os.path.isdir(c.reward.path):
    _fail("reward.path", f"checkpoint folder {c.reward.path!r} does not exist")
  if c.data.source == "jsonl":
    if not os.path.isfile(c.data.path):
      _fail("data.path", f"prompt file {c.data.path!r} does not exist")
    if os.path.getsize(c.data.path) == 0:
      _fail("data.path", f"prompt file {c.data.path!r} is empty")
  if c.data.source == "tfds" and not c.data.path:
    _fail("data.path", "a tfds source needs a prepared prompt set 'prompt_set/<config>'")
  if c.data.source == "synthetic" and c.reward.kind != "synthetic":
    _fail("reward.kind", "synthetic prompts are scored by the synthetic checker")
  if c.reward.kind == "synthetic" and c.data.source != "synthetic":
    _fail("reward.kind", "the synthetic checker only scores synthetic prompts")
  if c.creator.model and c.creator.evolver != "lm":
    _fail("creator.model", "only the LM evolver (creator.evolver 'lm') uses a creator model")
  if c.creator.model and not os.path.isdir(c.creator.model):
    _fail("creator.model", f"checkpoint folder {c.creator.model!r} does not exist")
  if (c.creator.selection in creator.TOPIC_METHODS and c.data.source != "synthetic"
      and not c.data.topic_field):
    _fail("creator.selection", f"{c.creator.selection!r} needs each prompt's topic: set "
          "data.topic_field")
  if c.creator.evolver == "synthetic" and c.data.source != "synthetic":
    _fail("creator.evolver", "the synthetic evolver only rewrites synthetic prompts")
  if "online" in c:
    _validate_online(c)


def _validate_online(c: ml_collections.ConfigDict) -> None:
  """The `online` section (configs/online.py; eva_jax/online_loop.py)."""
  o = c.online
  # The online loop draws its own prompt batches: the offline loop's protocol and its
  # select-without-evolving / topic options do not apply there, so refuse them, not ignore them.
  for field, offline_only, why in (
      ("protocol", c.protocol != "fresh", "the paper's protocol is an offline-loop schedule"),
      ("creator.evolve", not c.creator.evolve, "the online loop always evolves"),
      ("creator.selection", c.creator.selection in creator.TOPIC_METHODS,
       "the online buffer selects by informativeness only")):
    if offline_only:
      _fail(field, f"{_get(c, field)!r} is not supported with an `online` section: {why}")
  for key in ("steps", "prompts_per_step", "max_new_tokens", "updates_per_step", "grad_accum",
              "base_pool", "evolved_pool", "evolve_every", "eval_every", "checkpoint_every",
              "log_every", "max_visits", "max_zero_visits", "warmup_steps", "num_samples",
              "token_budget"):
    value = o[key]
    lowest = {"num_samples": 2, "warmup_steps": 0, "evolved_pool": 0, "token_budget": 0}.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
      _fail(f"online.{key}", f"must be an int >= {lowest}, got {value!r}")
  for key in ("learning_rate", "info_floor"):
    if isinstance(o[key], bool) or not 0 < o[key] < math.inf:
      _fail(f"online.{key}", f"must be a positive number, got {o[key]!r}")
  if not 0 <= o.beta < math.inf:
    _fail("online.beta", f"must be a finite number >= 0, got {o.beta!r}")
  if not 0 < o.clip_eps < 1:
    _fail("online.clip_eps", f"must lie in (0, 1), got {o.clip_eps!r}")
  if not 0 <= o.base_ratio <= 1:
    _fail("online.base_ratio", f"must lie in [0, 1], got {o.base_ratio!r}")
  if math.isnan(o.solved_reward):
    _fail("online.solved_reward", "must be a number (inf: never solved), got nan")
  if o.base_pool < o.prompts_per_step:
    _fail("online.base_pool", f"({o.base_pool}) must hold at least online.prompts_per_step "
          f"({o.prompts_per_step}) prompts: a batch may be all base prompts")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def check_workdir_config(c: ml_collections.ConfigDict, saved_path: str) -> None:
  """Refuses a workdir whose saved config differs in a field that changes the results."""
  if not fileio.exists(saved_path) or c.overwrite:
    return
  saved = _flatten(json.loads(fileio.read_text(saved_path)))
  now = _flatten(json.loads(c.to_json()))
  changed = sorted(k for k in set(saved) | set(now)
                   if k not in RESUMABLE_FIELDS and saved.get(k) != now.get(k))
  if changed:
    k = changed[0]
    more = f"; and {len(changed) - 1} more" if len(changed) > 1 else ""
    raise ValueError(
        f"workdir holds a run with a different config ({k}: {saved.get(k)!r} there, "
        f"{now.get(k)!r} now{more}); use a new --workdir or pass --config.overwrite=True")


def check_workdir_run_info(c: ml_collections.ConfigDict, run_info: dict, saved_path: str) -> None:
  """Refuses a restart that resolves the mesh differently (another device count) from the run
  saved in the workdir (`RUN_INFO`, written at its start)."""
  if not fileio.exists(saved_path) or c.overwrite:
    return
  saved = json.loads(fileio.read_text(saved_path))
  if saved.get("mesh") != run_info["mesh"]:
    shape = lambda m: " x ".join(f"{k} {v}" for k, v in (m or {}).items())  # noqa: E731
    raise ValueError(
        f"workdir holds a run on mesh {shape(saved.get('mesh'))}, but this start resolves "
        f"mesh.data/fsdp/tensor to {shape(run_info['mesh'])}; a different mesh changes the "
        "results: restart on the same devices, use a new --workdir or pass "
        "--config.overwrite=True")


_RUN_FILES = ("metrics.jsonl", "report.md", "config.json", RUN_INFO)


def prepare_run(c: ml_collections.ConfigDict, workdir: str):
  """Everything refused before any compute -> (prompt source, mesh): a bad config, a prompt set
  too small for the run, an unwritable workdir, a workdir holding another run (another config,
  or another resolved mesh). Then, with --config.overwrite, clears the old run's files, and
  records this run's config and resolved mesh in the workdir."""
  validate(c)
  source = sources.make(c)  # Before any writing.
  wd.check_writable(workdir)
  check_workdir_config(c, fileio.join(workdir, "config.json"))
  mesh = context.make_mesh(c.mesh)
  run_info = {"mesh": context.mesh_shape(mesh)}
  check_workdir_run_info(c, run_info, fileio.join(workdir, RUN_INFO))
  if c.overwrite and wd.is_writer():
    for name in fileio.listdir(workdir):  # Only what a run writes.
      if name.startswith("iter_") or name in ("checkpoints", "tb", "plots") + _RUN_FILES:
        fileio.remove(fileio.join(workdir, name))
  wd.write_json(fileio.join(workdir, "config.json"), json.loads(c.to_json()))
  wd.write_json(fileio.join(workdir, RUN_INFO), run_info)
  return source, mesh
