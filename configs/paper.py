"""The paper's grid: gemma-2-9b-it, {dpo, sppo, simpo, orpo, rpo, ipo} x {static, eva}, on TPU.

arg = "<loss>,<prompts>[,<slice>][,<reward model>][,<model>][,split3]":
  loss          dpo | sppo | sppo_hard | simpo | orpo | rpo | ipo
  prompts       eva (the creator evolves prompts) | static (fresh UltraFeedback prompts instead)
  slice         v5p-8 (default) | v5e-64 | v5e-32: mesh and micro-batch sized by
                experiments/memory_plan.py (see SLICES)
  reward model  armorm (default, ArmoRM-Llama3-8B-v0.1, the paper's, scored by its gated head:
                reward.kind "armorm") | skywork27b (Skywork-Reward-Gemma-2-27B-v0.2, the paper's
                reward-scaling option) | skywork8b (-Llama-3.1-8B); the Skywork ones are plain
                sequence classifiers (reward.kind "neural")
  model         gemma2_9b (default, the grid) | llama31_8b | mistral_7b: the eva authors'
                Llama-3.1-8B-Instruct and Mistral-7B-Instruct-v0.2 recipes (loss sppo only;
                see "Model recipes" below)
  split3        the authors' continual runs over three splits (their *-split-by-3 scripts):
                3 iterations, static X1 → X2 → X3, eva X1 → X̃1 → X̃2 (eva_jax/protocol.py)

The protocol is the paper's (c.protocol "paper"): both arms first train θ0 → θ1 by one DPO
iteration on a first chunk X1 without the creator (the same θ1, seed for seed); then eva
re-samples X1 with θ1, evolves it and trains θ1 → θ1̃ on the 20/80 mix, while static trains
θ1 → θ2 on a new chunk X2.

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
        selection of 25 %, 4 chained LM rewrites by the policy itself at the authors'
        rewriter settings (temperature 0.88, 666 new tokens), 20 % base pairs. The rewrites are
        EvolInstruct as the authors ran it (creator.template_set "evolinstruct"; their
        src/evolve_prompt.py runs distilabel's EvolInstruct with num_evolutions 4 and
        store_evolutions, so all 4 steps are kept): WizardLM's four in-depth mutations (add
        constraints, deepen, concretize, increase reasoning) and its in-breadth one, one drawn
        uniformly per step, each step rewriting the previous one. After an unusable reply (no
        prompt in it, or cut off) the chain goes on from its last usable prompt, where theirs
        rewrites the raw reply (eva_jax/lm_evolver.py says why).
  dpo   beta 0.05, AdamW lr 5e-7, cosine with 10 % warm-up, 2 epochs, batch 64 (eva authors).
  sppo  beta 0.001, RMSprop, lr 5e-7, linear schedule (10 % warm-up, then linear decay to 0),
        2 epochs (the eva authors' iterative-sppo recipe; their Llama / Mistral recipes run 9,
        see "Model recipes"), batch 64. Soft targets: each response's win probability against
        the policy, from its prompt's 6 samples (train.win_prob_scale; σ of reward differences
        stands in for their PairRM).
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
Model recipes (llama31_8b, mistral_7b): the eva authors' scripts/llama-8b/ and
scripts/mistral-7b/ (train.sh, evolve-*-iter-1.sh) with their recipes/default/
config_full_ultrafeedback-{Meta-Llama-3.1-8B-Instruct,Mistral-7B-Instruct-v0.2}-split-1-iter-1-
pair-evol-1-mixed-0.2-0.8-pair.yaml; the two recipes are the same but for the model. SPPO with
soft targets, beta 0.001, RMSprop, lr 5e-7, linear schedule with 10 % warm-up, 9 epochs (the
scripts' --num_train_epochs=9 overrides the yaml's 6), batch 64 (2 per GPU x 4 accumulation x 8
GPUs), pairs cut to 1024 tokens and prompts to 512 (so creator.max_tokens 512). Sampling N = 6 at
temperature 1.0, top-p 1.0, up to 2048 new tokens (their gen.sh and evolve-create-gen-iter-1.sh;
their evolve-gen-iter-1.sh samples the evolved prompts at 0.9 / 0.9, which one sampling setting
here cannot follow). Rewrites: 4 EvolInstruct steps at temperature 1.0, top-p 1.0 and 512 new
tokens (their evolve-create-iter-1.sh; gpt-4-0125-preview there, the policy here). Their pairs
and win probabilities come from PairRM (src/rank.py), the selection from ArmoRM; here both come
from the reward model. The slice meshes are the 9B policy's (a smaller model at half the
sequence length; not measured separately).
Policy weights are float32 master weights with bfloat16 compute: at lr 5e-7 a bfloat16 weight
of magnitude 0.02 (spacing 1.2e-4) would round every update away.

Every remaining departure from the paper and the authors' code:
  1. Creator: the paper's creator defaults to gemini-1.5-pro and the authors' scripts rewrite with
     gpt-4-0125-preview; here the policy rewrites by default, and
     --config.creator.model=/mnt/models/<a larger local instruct model> puts one on the same
     slice (no API model).
  2. After an unusable rewrite (no prompt in the reply, or cut off) the EvolInstruct chain goes
     on from its last usable prompt; distilabel's rewrites the raw reply (eva_jax/lm_evolver.py).
  3. Chunk sizes: 10,000 base prompts per chunk is our choice (the paper's per-iteration count
     was not found). Static's chunks are twice that (sources.prompts_per_iteration: as many
     fresh prompts as eva evolves), of which its θ0 → θ1 iteration keeps the first 10,000, eva's
     X1; the authors' static arm reads equal-size splits.
  4. PairRM: the authors' SPPO pairs and win probabilities come from PairRM (src/rank.py); here
     the reward model gives both (win probability = mean σ of reward differences,
     train.win_prob_scale).
  5. The Llama / Mistral recipes sample evolved prompts at temperature 0.9 / top-p 0.9 (their
     evolve-gen-iter-1.sh) and base prompts at 1.0 / 1.0; one sampling setting here uses 1.0 / 1.0
     for both.
  6. Evaluation: a run reports the reward model's held-out win rate against the warm-start on
     500 held-out prompts; the paper's figures are AlpacaEval 2, Arena-Hard and MT-Bench, judged
     by GPT-4 in those benchmarks' own pipelines. `python -m eva_jax.answer` writes the answer
     files they read (README "Benchmark answers"); the judging needs their API keys.
  7. Numerics: float32 master weights with bfloat16 compute on TPU (module docstring above); the
     authors' recipes train with `bf16: true` (torch_dtype left unset) under their DeepSpeed
     ZeRO-3 accelerate config, on GPUs.
"""
import ml_collections

from configs import default

LOSSES = ("dpo", "sppo", "sppo_hard", "simpo", "orpo", "rpo", "ipo")
PROMPTS = ("eva", "static")
MODEL_PATH = "/mnt/models/gemma-2-9b-it"
# Policy -> (local folder: weights, config.json and its tokenizer; model.family).
MODELS = {
    "gemma2_9b": (MODEL_PATH, "gemma2"),
    "llama31_8b": ("/mnt/models/Meta-Llama-3.1-8B-Instruct", "llama"),
    "mistral_7b": ("/mnt/models/Mistral-7B-Instruct-v0.2", "mistral"),
}
# The eva authors' recipe for each non-grid policy (module docstring, "Model recipes"): the loss
# it runs, then settings that replace the grid's (config field -> value).
_AUTHORS_SPPO_RECIPE = {
    "train.epochs": 9, "train.max_length": 1024, "train.max_prompt_length": 512,
    "creator.max_tokens": 512, "sampling.temperature": 1.0, "sampling.top_p": 1.0,
    "creator.temperature": 1.0, "creator.top_p": 1.0, "creator.max_new_tokens": 512,
}
MODEL_RECIPES = {
    "llama31_8b": ("sppo", _AUTHORS_SPPO_RECIPE),
    "mistral_7b": ("sppo", _AUTHORS_SPPO_RECIPE),
}
PROMPTS_PATH = "/mnt/data/ultrafeedback_prompts.jsonl"
# Reward model -> (reward.kind, local folder: weights, config.json and the model's tokenizer).
REWARD_MODELS = {
    "armorm": ("armorm", "/mnt/models/ArmoRM-Llama3-8B-v0.1"),
    "skywork27b": ("neural", "/mnt/models/Skywork-Reward-Gemma-2-27B-v0.2"),
    "skywork8b": ("neural", "/mnt/models/Skywork-Reward-Llama-3.1-8B-v0.2"),
}
# Per TPU slice: mesh (data, fsdp, tensor), pairs per batch shard (data x fsdp; per chip when
# tensor is 1) in one micro-batch, prompts per sampling call and the reward scoring batch, sized
# by experiments/memory_plan.py for the 9B policy (TPU compiler figures, GiB per chip, program
# + what the runner keeps resident beside it; experiments/results/tpu_plan.json). JAX devices
# are chips: v5e-32/-64 are 32/64 chips of 16 GiB; v5p-8 is 8 TensorCores = 4 chips of 95 GiB.
# The update holds the train state and the reward model (θ_t is donated into the state):
#   v5p-8   72.3 of 95 with 1 pair per chip (24 % free; 2 pairs: 75.4, 21 %).
#   v5e-32  12.4 of 16 with 1 pair per chip on fsdp 32 (22 % free).
#   v5e-64   6.5 of 16 with 1 pair per chip on fsdp 64 (59 % free: the embedding lookup runs
#           vocabulary-parallel, kernels/vocab_parallel_embed.py; it was 13.2, 18 %, before).
# Sampling (N = 6, 1024 + 2048 tokens) decodes tensor-parallel (sharding.decode_mesh: 8-way over
# the KV heads on v5e, 4-way on v5p-8) with a 336 KiB-per-token KV cache, beside θ_t and the
# reward model: 32 prompts per call take 9.2 of 16 on v5e-32 (42 % free; 64 prompts: 13.5,
# 16 %). v5e-64 decodes the same weight shares with half the rows per chip, so 32 prompts take
# less there. 16 prompts x 6 on v5p-8 take 43.3 of 95 (54 % free).
SLICES = {
    "v5p-8": dict(mesh=(1, 4, 1), pairs_per_device=1, sample_batch=16, reward_batch=16),
    "v5e-32": dict(mesh=(1, 32, 1), pairs_per_device=1, sample_batch=32, reward_batch=32),
    "v5e-64": dict(mesh=(1, 64, 1), pairs_per_device=1, sample_batch=32, reward_batch=64),
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


def _parse(arg: str) -> tuple[str, str, str, str, str, int]:
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  if len(parts) < 2:
    raise ValueError(f"configs/paper.py: arg {arg!r} needs '<loss>,<prompts>' (e.g. 'dpo,eva')")
  loss, prompts, *rest = parts
  if loss not in LOSSES:
    raise ValueError(f"configs/paper.py: loss {loss!r} is not one of {LOSSES}")
  if prompts not in PROMPTS:
    raise ValueError(f"configs/paper.py: prompts {prompts!r} is not one of {PROMPTS}")
  slice_name, reward, model, splits = "v5p-8", "armorm", "gemma2_9b", 2
  for part in rest:
    if part == "split3":
      splits = 3
    elif part in SLICES:
      slice_name = part
    elif part in REWARD_MODELS:
      reward = part
    elif part in MODELS:
      model = part
    else:
      raise ValueError(f"configs/paper.py: {part!r} is neither a slice {tuple(SLICES)}, a "
                       f"reward model {tuple(REWARD_MODELS)} nor a model {tuple(MODELS)}")
  if model in MODEL_RECIPES and loss != MODEL_RECIPES[model][0]:
    raise ValueError(f"configs/paper.py: the eva authors' {model} recipe runs "
                     f"{MODEL_RECIPES[model][0]!r}, not {loss!r}")
  return loss, prompts, slice_name, reward, model, splits


def get_config(arg: str = "dpo,eva") -> ml_collections.ConfigDict:
  loss, prompts, slice_name, reward, model, splits = _parse(arg)
  model_path, family = MODELS[model]
  c = default.get_config()
  c.protocol = "paper"  # θ0 → θ1 on X1 in both arms; then eva evolves X1, static takes X2.
  c.iterations = splits

  hw = SLICES[slice_name]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = hw["mesh"]

  c.tokenizer.kind = "hf"
  c.tokenizer.path = model_path  # The policy's own tokenizer and chat template.
  c.model.source = "hf"
  c.model.path = model_path
  c.model.family = family  # Informational: an HF checkpoint brings its own shape.
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
  c.creator.num_evolutions = 4  # Every step kept.
  c.creator.template_set = "evolinstruct"  # The authors' EvolInstruct (module docstring).
  # The authors' rewriter settings (their scripts: gpt-4-0125-preview at temperature 0.88, 666
  # new tokens), applied here to the policy as creator.
  c.creator.temperature = 0.88
  c.creator.max_new_tokens = 666
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

  c.sampling.batch_size = hw["sample_batch"]  # Per slice: see SLICES.
  c.sft.steps = 0  # Every policy here is already instruction-tuned: no warm-start.
  c.eval.temperature = 0.0
  c.eval.max_new_tokens = 2048
  if model in MODEL_RECIPES:
    for field, value in MODEL_RECIPES[model][1].items():
      section, key = field.split(".")
      c[section][key] = value
  return c
