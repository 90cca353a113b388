"""The paper's grid: gemma-2-9b-it, {dpo, sppo, simpo, orpo, rpo, ipo} x {static, eva}, on TPU.

arg = "<loss>,<prompts>[,<slice>][,<reward model>]":
  loss          dpo | sppo | sppo_hard | simpo | orpo | rpo | ipo
  prompts       eva (the creator evolves prompts) | static (fresh UltraFeedback prompts instead)
  slice         v5p-8 (default) | v5e-64 | v5e-32: mesh and micro-batch sized by
                experiments/memory_plan.py (v5e-32 does not fit yet: see SLICES)
  reward model  armorm (default, ArmoRM-Llama3-8B-v0.1, the paper's, scored by its gated head:
                reward.kind "armorm") | skywork27b (Skywork-Reward-Gemma-2-27B-v0.2, the paper's
                reward-scaling option) | skywork8b (-Llama-3.1-8B); the Skywork ones are plain
                sequence classifiers (reward.kind "neural")

Launch on a TPU VM slice (every worker runs the same command; the workdir must be one folder
that every host sees, e.g. a gcsfuse or Filestore mount: process 0 writes the stage artifacts
and the others read them, and the workdir code uses plain file I/O, so no gs:// URLs):

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd eva_jax && \
    python -m eva_jax.main --config=configs/paper.py:dpo,eva,v5p-8 \
    --workdir=/mnt/runs/paper_dpo_eva"

Weights and prompts are local folders on every worker (nothing is downloaded): the paths below
are defaults, override them with --config.model.path=..., --config.tokenizer.path=...,
--config.reward.path=..., --config.data.path=... (an UltraFeedback JSONL with a `prompt` field,
or HuggingFaceH4/ultrafeedback_binarized's parquet).

Settings and where they come from:
  all   N = 6 samples, temperature 0.7, top-p 0.9, 2048 new tokens (DESIGN.md); prompts cut to
        1024 tokens, pairs to 2048 (eva's DPO); creator: gap informativeness, weighted
        selection of 25 %, 4 chained LM rewrites by the policy itself, 20 % base pairs.
  dpo   beta 0.05, AdamW lr 5e-7, cosine with 10 % warm-up, 2 epochs, batch 64 (eva authors).
  sppo  beta 0.001, RMSprop, lr 5e-7, linear schedule (10 % warm-up, then linear decay to 0),
        2 epochs (the eva authors' iterative-sppo recipe; their Llama / Mistral evol recipes
        run 6), batch 64. Soft targets: each response's win probability against the policy,
        from its prompt's 6 samples (train.win_prob_scale; σ of reward differences stands in
        for their PairRM).
  sppo_hard  SPPO with win probabilities 1 / 0 (TRL's form): beta 0.001, RMSprop, lr 5e-7
        (SPPO authors' scripts/pipeline.sh); the rest as dpo.
  simpo beta 10, gamma/beta 0.5, AdamW lr 8e-7, cosine 10 % warm-up, 1 epoch, batch 128 (SimPO
        authors' training_configs/gemma-2-9b-it-simpo.yaml).
  orpo  lambda (train.beta) 0.1 (ORPO authors' scripts and TRL's default). Neither the eva nor
        the ORPO authors publish a gemma-2-9b-it ORPO recipe; the ORPO authors' lr 5e-6 is for
        training a base model from scratch, so this uses the eva DPO schedule (lr 5e-7,
        2 epochs, batch 64). An assumption: sweep it.
  rpo   beta 0.1, NLL weight alpha 1 on the length-normalised chosen NLL
        (penalize_length_nll), cosine with 10 % warm-up, 1 epoch (eva authors); lr 5e-7 and
        batch 64 as dpo.
  ipo   beta 0.6, cosine with 10 % warm-up, 2 epochs (eva authors); lr 5e-7 and batch 64 as
        dpo.
Policy weights are float32 master weights with bfloat16 compute: at lr 5e-7 a bfloat16 weight
of magnitude 0.02 (spacing 1.2e-4) would round every update away.

Where this departs from the paper (the runner has no field for these yet): the paper's creator
defaults to gemini-1.5-pro (here gemma-2-9b-it, the policy); its table starts both arms from
θ1 = one DPO iteration on a first UltraFeedback chunk, then eva evolves that same chunk while
static takes a new one, whereas here eva evolves a fresh chunk in every iteration. 10,000 base
prompts per iteration is our choice (the paper's per-iteration count was not found).
"""
import ml_collections

from configs import default

LOSSES = ("dpo", "sppo", "sppo_hard", "simpo", "orpo", "rpo", "ipo")
PROMPTS = ("eva", "static")
MODEL_PATH = "/mnt/models/gemma-2-9b-it"
PROMPTS_PATH = "/mnt/data/ultrafeedback_prompts.jsonl"
# Reward model -> (reward.kind, local folder: weights, config.json and the model's tokenizer).
REWARD_MODELS = {
    "armorm": ("armorm", "/mnt/models/ArmoRM-Llama3-8B-v0.1"),
    "skywork27b": ("neural", "/mnt/models/Skywork-Reward-Gemma-2-27B-v0.2"),
    "skywork8b": ("neural", "/mnt/models/Skywork-Reward-Llama-3.1-8B-v0.2"),
}
# Per TPU slice: mesh (data, fsdp, tensor), pairs per batch shard (data x fsdp; per chip when
# tensor is 1) in one micro-batch, and the reward
# scoring batch, sized by experiments/memory_plan.py for the 9B policy (TPU compiler figures,
# GiB per chip). JAX devices are chips: v5e-32/-64 are 32/64 chips of 16 GiB; v5p-8 is
# 8 TensorCores = 4 chips of 95 GiB.
#   v5p-8   update 91.8 of 95 with 1 pair per chip (2 pairs: 96.9, too much).
#   v5e-32  update 18.3 of 16 with 1 pair per 2 chips on fsdp 16 x tensor 2 (fsdp 32: 20.5):
#           does NOT fit until the LM head stops being gathered whole and Run.params is freed
#           (see the memory plan); kept for then. (bfloat16 master weights would fit, 13.5,
#           but lose every update at these learning rates.)
#   v5e-64  update 10.8 of 16 with 1 pair per chip on fsdp 64.
# Sampling (N = 6, 1024 + 2048 tokens) holds a 336 KiB-per-token KV cache (twice, in the decode
# loop): sampling.batch_size prompts per call (set to 16 below) must be 16 or fewer on v5p-8 and
# 32 or fewer on v5e-32.
SLICES = {
    "v5p-8": dict(mesh=(1, 4, 1), pairs_per_device=1, reward_batch=16),
    "v5e-32": dict(mesh=(1, 16, 2), pairs_per_device=1, reward_batch=32),
    "v5e-64": dict(mesh=(1, 64, 1), pairs_per_device=1, reward_batch=64),
}
# (train.beta, hparams, optimizer, learning rate, epochs, batch size, schedule) per loss.
LOSS_SETTINGS = {
    "dpo": (0.05, {}, "adamw", 5e-7, 2, 64, "cosine"),
    "sppo": (0.001, {}, "rmsprop", 5e-7, 2, 64, "linear"),
    "sppo_hard": (0.001, {}, "rmsprop", 5e-7, 2, 64, "cosine"),
    "simpo": (10.0, {"gamma_beta_ratio": 0.5}, "adamw", 8e-7, 1, 128, "cosine"),
    "orpo": (0.1, {}, "adamw", 5e-7, 2, 64, "cosine"),
    "rpo": (0.1, {"alpha": 1.0, "penalize_length_nll": True}, "adamw", 5e-7, 1, 64, "cosine"),
    "ipo": (0.6, {}, "adamw", 5e-7, 2, 64, "cosine"),
}


def _parse(arg: str) -> tuple[str, str, str, str]:
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  if len(parts) < 2:
    raise ValueError(f"configs/paper.py: arg {arg!r} needs '<loss>,<prompts>' (e.g. 'dpo,eva')")
  loss, prompts, *rest = parts
  if loss not in LOSSES:
    raise ValueError(f"configs/paper.py: loss {loss!r} is not one of {LOSSES}")
  if prompts not in PROMPTS:
    raise ValueError(f"configs/paper.py: prompts {prompts!r} is not one of {PROMPTS}")
  slice_name, reward = "v5p-8", "armorm"
  for part in rest:
    if part in SLICES:
      slice_name = part
    elif part in REWARD_MODELS:
      reward = part
    else:
      raise ValueError(f"configs/paper.py: {part!r} is neither a slice {tuple(SLICES)} nor a "
                       f"reward model {tuple(REWARD_MODELS)}")
  return loss, prompts, slice_name, reward


def get_config(arg: str = "dpo,eva") -> ml_collections.ConfigDict:
  loss, prompts, slice_name, reward = _parse(arg)
  c = default.get_config()
  c.iterations = 2  # θ0 → θ1 → θ2: the static arm's second iteration is "new human prompts".

  hw = SLICES[slice_name]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = hw["mesh"]

  c.tokenizer.kind = "hf"
  c.tokenizer.path = MODEL_PATH  # gemma-2-9b-it's own tokenizer and chat template.
  c.model.source = "hf"
  c.model.path = MODEL_PATH
  c.model.family = "gemma2"  # Informational: an HF checkpoint brings its own shape.
  c.model.param_dtype = "float32"  # Master weights (see the module docstring).
  c.model.dtype = "bfloat16"
  c.model.remat = "full"

  c.data.source = "jsonl"
  c.data.path = PROMPTS_PATH
  c.data.num_prompts = 10_000  # Base prompts per iteration.
  c.data.heldout_per_level = 500  # Held-out UltraFeedback prompts for the win rate.

  c.reward.kind, c.reward.path = REWARD_MODELS[reward]
  # The eva authors' reward step (src/reward_hf.py) scores truncated responses like any other.
  c.reward.truncated_penalty = 0.0
  c.reward.batch_size = hw["reward_batch"]
  c.reward.max_length = 4096  # A 1024-token prompt + 2048-token response + template fit.

  c.sampling.num_samples = 6
  c.sampling.temperature = 0.7
  c.sampling.top_p = 0.9
  c.sampling.top_k = 0
  c.sampling.max_new_tokens = 2048
  c.sampling.max_prompt_length = 1024

  c.creator.enabled = prompts == "eva"
  c.creator.evolver = "lm"
  c.creator.metric = "gap"
  c.creator.selection = "weighted"
  c.creator.fraction = 0.25
  c.creator.num_evolutions = 4
  c.creator.base_ratio = 0.2
  c.creator.min_tokens = 4
  c.creator.max_tokens = 1024  # An evolved prompt must still fit train.max_prompt_length.

  beta, hparams, optimizer, lr, epochs, batch, schedule = LOSS_SETTINGS[loss]
  c.train.loss = loss
  c.train.beta = beta
  c.train.hparams = ml_collections.ConfigDict(hparams)
  c.train.optimizer = optimizer
  c.train.learning_rate = lr
  c.train.warmup_ratio = 0.1
  c.train.schedule = schedule
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.epochs = epochs
  c.train.batch_size = batch
  data, fsdp, tensor = hw["mesh"]
  c.train.grad_accum = batch // (data * fsdp * hw["pairs_per_device"])
  c.train.num_pairs = c.data.num_prompts  # The same pair budget for eva and static.
  c.train.min_chosen_reward = float("-inf")  # Every untied prompt gives a pair, as published.
  c.train.max_length = 2048
  c.train.max_prompt_length = 1024
  c.train.logprob_impl = "auto"  # The Pallas kernel on TPU.

  # The memory plan (experiments/memory_plan.py): at most 16 prompts x 6 samples of 2048-token
  # KV cache per call fit beside the 9B weights on v5p-8 and v5e-32.
  c.sampling.batch_size = 16
  c.sft.steps = 0  # gemma-2-9b-it is already instruction-tuned: no warm-start.
  c.eval.temperature = 0.0
  c.eval.max_new_tokens = 2048
  return c
