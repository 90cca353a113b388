"""A run's context: everything set up once before the loop, and θ_t restored from checkpoints.

    init_distributed()                      before any other JAX use (main.py); it first
                                            skips an installed libtpu on a machine without TPUs
    ctx = setup(config, workdir, source, mesh)
    policy_t = ctx.policy_at(t)             the `stages.Policy` of checkpoint t

Setup: the tokenizer (sentencepiece trained on the fly, or an HF folder), the policy's model
config and initial params, the scorer and the evolver (by name, from `reward.SCORERS` and
`creator.EVOLVERS`), metrics and checkpoints. The prompt source and the mesh are made by the
caller first, because they refuse bad input before anything is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import jax
import ml_collections

from eva_jax import (console, creator, fileio, models, reward, sharding, stages, synthetic,
                     train_state)
from eva_jax import workdir as wd
from eva_jax.models import hf
from eva_jax.models import tokenizer as tokenizer_lib
from eva_jax import judge, lm_evolver  # noqa: F401  (register the "judge" scorer, "lm" evolver)

TOKENIZER_KINDS = ("sentencepiece", "hf")  # Trained on the fly, or a local HF folder.
MODEL_SOURCES = ("tiny", "hf")  # Random init with the config's sizes, or a local HF folder.


def platforms_without_absent_tpu(environ, tpu_chips: int, nvidia_gpu: bool, amd_gpus: int,
                                 libtpu_installed: bool):
  """The `jax_platforms` value that keeps JAX from probing an absent TPU, or None to leave it.

  With the `tpu` extra installed, JAX tries libtpu's backend on every machine; where no TPU chip
  is attached, libtpu writes a dozen lines of worker-hostname errors to stderr before JAX falls
  back. A CPU-only machine (no TPU chip, no GPU) gets "cpu"; a choice the user made
  (JAX_PLATFORMS) and machines with an accelerator are left to JAX.
  """
  if environ.get("JAX_PLATFORMS") or environ.get("JAX_FORCE_TPU_INIT") or not libtpu_installed:
    return None
  if tpu_chips or nvidia_gpu or amd_gpus:
    return None
  return "cpu"


def skip_absent_tpu() -> None:
  """Applies `platforms_without_absent_tpu` to this process (before JAX's backends start)."""
  import importlib.util
  try:  # JAX's own probe (PCI ids under /sys, no backend started); private, so it may move.
    from jax._src import hardware_utils
    choice = platforms_without_absent_tpu(
        os.environ, hardware_utils.num_available_tpu_chips_and_device_id()[0],
        hardware_utils.has_visible_nvidia_gpu(),
        hardware_utils.num_available_amd_gpus(stop_at=1),
        importlib.util.find_spec("libtpu") is not None)
  except (ImportError, AttributeError):  # Only the chatter is at stake: leave JAX to choose.
    return
  if choice is not None and not jax.config.jax_platforms:
    jax.config.update("jax_platforms", choice)


def init_distributed() -> None:
  """Joins a multi-process run before any other JAX use (after `skip_absent_tpu`).

  On a TPU pod slice (EVA_DISTRIBUTED=1, or several TPU_WORKER_HOSTNAMES)
  `jax.distributed.initialize()` finds its peers itself. For CPU processes on one machine (the
  tests' stand-in for a pod), set EVA_COORDINATOR=host:port, EVA_NUM_PROCESSES and
  EVA_PROCESS_ID.
  """
  skip_absent_tpu()
  if os.environ.get("EVA_COORDINATOR"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["EVA_COORDINATOR"],
                               num_processes=int(os.environ["EVA_NUM_PROCESSES"]),
                               process_id=int(os.environ["EVA_PROCESS_ID"]))
  elif os.environ.get("EVA_DISTRIBUTED") or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
    jax.distributed.initialize()


def make_mesh(mesh_cfg) -> jax.sharding.Mesh:
  return sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def mesh_shape(mesh) -> dict[str, int]:
  """The resolved mesh, e.g. {"data": 8, "fsdp": 1, "tensor": 1} for mesh.data = -1."""
  return {name: int(size) for name, size in mesh.shape.items()}


@dataclasses.dataclass
class Context:
  """The set-up run. `policy` holds the initial params until the warm-start checkpoint exists."""
  config: ml_collections.ConfigDict
  workdir: str
  policy: stages.Policy
  source: Any
  scorer: reward.Scorer
  metrics: wd.Metrics
  checkpoints: wd.Checkpoints

  def path(self, iteration: int, name: str) -> str:
    return fileio.join(self.workdir, f"iter_{iteration:03d}", name)

  def policy_at(self, step: int) -> stages.Policy:
    """The policy of checkpoint `step` (0: after the warm-start, t + 1: after iteration t)."""
    c, policy = self.config, self.policy
    # Only the optimizer's kind shapes its state: the warm-start's is AdamW.
    opt_cfg = (stages.sft_optimizer_config(c.train, c.sft, 1) if step == 0
               else stages.optimizer_config(c.train, 1))
    optimizer = train_state.make_optimizer(opt_cfg)
    return policy.with_params(restore_state(self.checkpoints, policy, optimizer, step).params)

  def evolver(self, policy: stages.Policy) -> creator.Evolver:
    return creator.EVOLVERS.get(self.config.creator.evolver)(
        self.config.creator, source=self.source, policy=policy, progress=console.bar)

  def close(self) -> None:
    self.checkpoints.close()
    self.metrics.close()


def restore_state(checkpoints: wd.Checkpoints, policy: stages.Policy, optimizer,
                  step: int) -> train_state.TrainState:
  """The train state of checkpoint `step`, placed as `policy`'s mesh and rules place it (the
  optimizer's kind shapes the state)."""
  shardings = train_state.state_shardings(policy.model_config, optimizer, policy.mesh,
                                          policy.rules)

  def init():
    params = models.init_params(policy.model_config, jax.random.key(0))
    return train_state.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                  opt_state=optimizer.init(params))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init), shardings)
  return checkpoints.restore(step, abstract)


def _tokenizer_corpus(seed: int) -> list[str]:
  texts = [t for p, a in synthetic.sft_examples(2000, seed, max_level=synthetic.MAX_LEVEL)
           for t in (p, a)]
  return texts + [p for p, _, _ in synthetic.heldout_set(seed, 4)]


def _tokenizer(c, workdir: str):
  if c.tokenizer.kind == "hf":
    return tokenizer_lib.load_tokenizer(c.tokenizer.path)

  def load_or_train():
    corpus = _tokenizer_corpus(c.seed)
    if fileio.is_local(workdir):
      return tokenizer_lib.train_sentencepiece(corpus, fileio.join(workdir, "cache"),
                                               vocab_size=c.tokenizer.vocab_size,
                                               name="tokenizer")
    return _remote_tokenizer(corpus, fileio.join(workdir, "cache", "tokenizer"),
                             c.tokenizer.vocab_size)
  if jax.process_count() == 1:
    return load_or_train()
  # Process 0 trains and caches it; the others then load the cached folder.
  from jax.experimental import multihost_utils
  tok = load_or_train() if wd.is_writer() else None
  multihost_utils.sync_global_devices("eva_tokenizer")
  return tok or load_or_train()


def _remote_tokenizer(corpus: list[str], remote: str, vocab_size: int):
  """The tokenizer cached at `remote` (an object-store folder), trained and uploaded when it is
  missing or was trained on other settings or texts. sentencepiece and transformers write with
  plain `os`, so the folder is downloaded (or trained) into a local temp folder, which goes once
  the tokenizer is loaded into memory."""
  # train_sentencepiece keys its folder by this hash file. It is uploaded last: a folder whose
  # upload was killed half-way has none, and is trained and uploaded again.
  hash_name = tokenizer_lib.HASH_FILE
  with tempfile.TemporaryDirectory(prefix="eva_tokenizer.") as local:
    folder = os.path.join(local, "tokenizer")
    os.makedirs(folder)
    remote_names = fileio.listdir(remote)
    if hash_name in remote_names:
      for name in remote_names:
        with open(os.path.join(folder, name), "wb") as f:
          f.write(fileio.read_bytes(fileio.join(remote, name)))
    tok = tokenizer_lib.train_sentencepiece(corpus, local, vocab_size=vocab_size,
                                            name="tokenizer")
    with open(os.path.join(folder, hash_name), "rb") as f:
      trained = f.read()
    cached = hash_name in remote_names and fileio.read_bytes(fileio.join(remote, hash_name))
    if wd.is_writer() and cached != trained:
      for name in sorted(os.listdir(folder), key=lambda name: name == hash_name):
        with open(os.path.join(folder, name), "rb") as f:
          fileio.atomic_write(fileio.join(remote, name), f.read())
  return tok


def _model_config(c, tok) -> models.ModelConfig:
  """The policy's model config alone: the HF folder's config.json, or the config's tiny sizes."""
  if c.model.source == "hf":
    path = os.path.join(c.model.path, "config.json")
    with open(path) as f:
      config = hf.config_from_hf(json.load(f), where=path, dtype=c.model.param_dtype,
                                 compute_dtype=c.model.dtype)
    return config.replace(remat=c.model.remat, attention_impl=c.model.attention_impl)
  m = c.model
  return models.tiny(
      m.family, vocab_size=tok.vocab_size, hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, pad_token_id=tok.pad_id,
      bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids), param_dtype=m.param_dtype,
      dtype=m.dtype, remat=m.remat, attention_impl=m.attention_impl, max_position_embeddings=1024)


def _policy(c, tok, mesh, rules) -> stages.Policy:
  if c.model.source == "hf":
    config, params = hf.load(c.model.path, dtype=c.model.param_dtype, compute_dtype=c.model.dtype,
                             shardings=sharding.param_shardings_for(mesh, rules))
    config = config.replace(remat=c.model.remat, attention_impl=c.model.attention_impl)
    return stages.Policy(config, params, tok, mesh, rules)
  config = _model_config(c, tok)
  params = jax.jit(lambda k: models.init_params(config, k),
                   out_shardings=sharding.param_shardings(config, mesh, rules))(
                       stages.stage_key(c.seed, -1, "init"))
  return stages.Policy(config, params, tok, mesh, rules)


def load_policy(c: ml_collections.ConfigDict, workdir: str, mesh) -> stages.Policy:
  """The run's policy without params (a checkpoint's come from `restore_state`) and nothing
  else: no scorer, source or metrics (`eva_jax.answer` needs none)."""
  tok = _tokenizer(c, workdir)
  return stages.Policy(_model_config(c, tok), None, tok, mesh,
                       sharding.rules_from_config(c.mesh.rules))


def setup(c: ml_collections.ConfigDict, workdir: str, source, mesh) -> Context:
  """Tokenizer, policy, scorer, metrics and checkpoints of the run in `workdir`."""
  rules = sharding.rules_from_config(c.mesh.rules)
  policy = _policy(c, _tokenizer(c, workdir), mesh, rules)
  scorer = reward.SCORERS.get(c.reward.kind)(c.reward, source=source, dtype=c.model.dtype,
                                             mesh=mesh, rules=rules)
  return Context(c, workdir, policy, source, scorer, wd.Metrics(workdir),
                 wd.Checkpoints(workdir, keep=max(2, c.checkpoint.keep),
                                use_async=c.checkpoint.use_async))
