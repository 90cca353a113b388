"""The embedded default: eva on synthetic verifiable tasks with a tiny model, on a laptop CPU.

  python -m eva_jax.main --config=configs/default.py --workdir=/tmp/eva_default

A sentencepiece tokenizer is trained on the fly, a tiny Llama-style decoder is warm-started by SFT
on easy levels, then eva iterations (generate → score → create → pairs → reference → train →
evaluate) run on a programmatic reward with graded credit. `:arg` variants:
  configs/default.py:static   the same budget on fresh base prompts (no creator)
  configs/default.py:smoke    a seconds-long run for tests and the notebook
Every field is commented; experiments import this and override fields.
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Every random draw derives from (seed, iteration, stage).
  c.iterations = 3  # eva iterations after the warm-start.
  c.overwrite = False  # Start over in a workdir holding an incompatible run.
  # Which prompts each iteration draws (eva_jax/protocol.py): "fresh" (a new chunk every
  # iteration, the creator in each) or "paper" (both arms train θ0 → θ1 on X1 without the
  # creator; then eva evolves X1 again while static takes a new X2).
  c.protocol = "fresh"

  # Devices: one mesh (data, fsdp, tensor); -1 = the rest of the devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Where each logical axis the models name goes on the mesh: comma-joined mesh axes, "" for
  # replicated (eva_jax.sharding.rules_from_config reads it; its DEFAULT_RULES are these).
  # Parameters: fsdp along `embed`, tensor along heads / mlp (Megatron-style), the vocabulary
  # over fsdp and tensor (a vocabulary-parallel LM head; the untied head's D is `embed_head`);
  # activations: the batch over data+fsdp. E.g. --config.mesh.rules.embed="" replicates it.
  c.mesh.rules = ml_collections.ConfigDict(dict(
      act_batch="data,fsdp", act_len="", act_embed="", act_heads="tensor",
      act_kv_heads="tensor", act_mlp="tensor", act_vocab="fsdp,tensor", layers="",
      vocab="fsdp,tensor", embed="fsdp", embed_head="", heads="tensor", kv_heads="tensor",
      head_dim="", mlp="tensor", norm=""))

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "sentencepiece"  # "sentencepiece" (trained on the fly) or "hf" (a folder).
  c.tokenizer.path = ""  # The HF folder when kind == "hf".
  c.tokenizer.vocab_size = 96  # Trained vocab size (sentencepiece only).

  c.model = ml_collections.ConfigDict()
  c.model.source = "tiny"  # "tiny" (random init, sizes below) or "hf" (load model.path).
  c.model.path = ""  # HF folder of the policy when source == "hf".
  c.model.family = "llama"  # Tiny model family: llama, gemma2 or qwen2.
  c.model.hidden_size = 128
  c.model.intermediate_size = 384
  c.model.num_layers = 3
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"  # Compute dtype (bfloat16 on accelerators).
  c.model.remat = "none"  # "none", "full" or "dots".
  # Training / scoring attention: "auto" (splash kernels when compiling for TPU at a length that
  # is a multiple of 128, else dense), "dense" or "splash" (ModelConfig.attention_impl).
  c.model.attention_impl = "auto"

  c.data = ml_collections.ConfigDict()
  # A name of eva_jax.sources.SOURCES: "synthetic", "jsonl" (a prompt file: data.path) or "tfds"
  # (a prepared prompt set: data.path "prompt_set/<config>" in data.data_dir).
  c.data.source = "synthetic"
  c.data.path = ""
  # The prompt field that names each prompt's topic for creator.selection "topic_weighted"
  # (jsonl / tfds: "source", e.g. UltraFeedback's; or "category"); "" = none. Synthetic
  # prompts always carry their task name.
  c.data.topic_field = ""
  c.data.data_dir = ""  # tfds data folder ("": tfds' default).
  # Base prompts drawn per iteration. Thousands, not hundreds: with a few hundred pairs per
  # iteration the tiny policy learns the pairs' own prompts and the held-out reward does not
  # move (measured over 3 seeds, 3 iterations: 512 prompts, mean gain -0.003; 2048: +0.058).
  c.data.num_prompts = 2048
  c.data.max_level = 3  # Synthetic difficulty of the base prompts.
  # Held-out prompts per difficulty level (synthetic: levels 1..6; jsonl/tfds: the held-out count).
  c.data.heldout_per_level = 16

  c.reward = ml_collections.ConfigDict()
  c.reward.kind = "synthetic"  # "synthetic" (programmatic checker) or "neural" (reward.path).
  c.reward.path = ""
  c.reward.batch_size = 32
  c.reward.max_length = 1024
  # Subtracted when a response hit the length limit without EOS: without it the tiny model
  # learns that long, unfinished answers collect partial credit.
  c.reward.truncated_penalty = 0.5

  c.sampling = ml_collections.ConfigDict()
  c.sampling.num_samples = 6  # N responses per prompt (the paper's default).
  c.sampling.temperature = 0.7
  c.sampling.top_p = 0.9
  c.sampling.top_k = 0  # 0 = off.
  c.sampling.max_new_tokens = 24
  c.sampling.max_prompt_length = 40
  c.sampling.batch_size = 64  # Prompts per sampling call (x num_samples rows of KV cache).
  # True: continuous batching (eva_jax/continuous.py): batch_size x num_samples KV-cache slots,
  # each refilled with the next (prompt, sample) as its row ends, instead of fixed chunks that
  # decode until their longest row ends. Draws then key on (prompt, sample), not on the chunk.
  c.sampling.continuous = False

  c.creator = ml_collections.ConfigDict()
  c.creator.enabled = True  # False: the static baseline (fresh base prompts each iteration).
  c.creator.metric = "gap"  # gap, var, mean, maxmean, loo, dts, gap_inv, mean_inv.
  c.creator.selection = "weighted"  # weighted, greedy, uniform, stratified, topic_weighted.
  # topic_weighted: each prompt's weight is (1 - topic_coef) x its share of the normalised
  # informativeness + topic_coef x its share of the inverse topic frequency, so rare topics get
  # evolved too (the authors' iw_topic, coefficient 0.25). Topics: synthetic task names, or
  # data.topic_field of a prompt file.
  c.creator.topic_coef = 0.25
  c.creator.fraction = 0.25  # Share of prompts selected for evolution.
  # False: select without evolving (the authors' subset ablation): train on the selected
  # prompts' own pairs only, no evolved prompts (fewer pairs than eva, as in their runs).
  c.creator.evolve = True
  c.creator.evolver = "synthetic"  # "synthetic" or "lm" (rewrite with a language model).
  c.creator.num_evolutions = 4  # Chained evolutions per selected prompt, every step kept.
  c.creator.depth_prob = 0.5  # Synthetic evolver: in-depth vs in-breadth.
  # LM evolver's templates (eva_jax.templates.TEMPLATE_SETS): "eva" (ours: ten, depth_prob between
  # in-depth and in-breadth) or "evolinstruct" (the eva authors' five WizardLM mutations, drawn
  # uniformly; after an unusable reply the chain goes on from its last usable prompt).
  c.creator.template_set = "eva"
  # LM evolver's sampling of each rewrite. The authors rewrote with gpt-4-0125-preview at
  # temperature 0.88 and 666 new tokens; ours default to the solver's sampling settings.
  c.creator.temperature = 0.7  # Sampling temperature of the creator's replies.
  c.creator.top_p = 0.9  # Nucleus sampling of the creator's replies (1.0 = off).
  c.creator.max_new_tokens = 1024  # Reply budget per rewrite, in creator tokens.
  # The LM evolver's model: "" = the policy θ_t itself; else a local HF causal-LM folder
  # (weights, config.json, tokenizer with a chat template), e.g. a larger instruct model, loaded
  # once, placed on the run's mesh by mesh.rules, in the policy's dtypes.
  c.creator.model = ""
  # Share of base-prompt pairs among the training pairs (paper: 0.2). Half here: with 20 % the
  # tiny policy lost reward on the easy levels (measured at 512 prompts: mean gain -0.014 vs
  # +0.004 with half).
  c.creator.base_ratio = 0.5
  # When the evolved pairs are too few for train.num_pairs at base_ratio, fill the budget with
  # more base pairs (the ratio then rises), so eva trains on exactly as many pairs and updates
  # as static. Off by default and in the paper's recipe (the mix is as large as its evolved
  # side allows); on in configs/ablations.py, whose comparisons are at equal budget.
  c.creator.top_up = False
  c.creator.min_tokens = 2  # Filters on evolved prompts (in tokens of the policy tokenizer).
  c.creator.max_tokens = 40
  c.creator.max_similarity = 0.95  # n-gram Jaccard above this counts as a near-duplicate.

  c.train = ml_collections.ConfigDict()
  # Any name in eva_jax.losses.available_losses(). RPO = DPO + an NLL term on the chosen
  # response (the authors' RPO: beta 0.1, NLL weight 1). Plain DPO lowers the chosen log-prob
  # along with the rejected one on this tiny model (measured: -1.5 nats after 8 steps) and the
  # freed mass goes to worse answers; the NLL term keeps the chosen answers up.
  c.train.loss = "rpo"
  c.train.beta = 0.1
  c.train.hparams = ml_collections.ConfigDict()  # Loss-specific (label_smoothing, alpha, ...).
  c.train.optimizer = "adamw"  # "adamw" or "rmsprop" (SPPO).
  c.train.learning_rate = 1e-4
  c.train.warmup_ratio = 0.1
  # The decay after the warm-up: "cosine" (eva's DPO) or "linear" to 0 (the SPPO authors').
  c.train.schedule = "cosine"
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.epochs = 2
  c.train.batch_size = 32
  c.train.grad_accum = 1
  c.train.num_pairs = 1024  # Pairs per iteration (equal budget for eva and static).
  # A prompt gives a pair only when its best response scores at least this (-inf: always, as
  # in the paper). 1.0: the chosen answer is exactly right, so the NLL term teaches no errors.
  c.train.min_chosen_reward = 1.0
  # Soft SPPO's targets: each response's win probability against the policy, the mean over the
  # prompt's N samples of σ(scale · reward difference); our stand-in for PairRM (scale 1 for
  # Bradley-Terry rewards such as Skywork's; other reward scales may want another).
  c.train.win_prob_scale = 1.0
  c.train.max_length = 64
  c.train.max_prompt_length = 40
  c.train.logprob_impl = "auto"  # Log-prob kernel: auto, pallas, chunked, dense, reference.

  # Warm-start on easy levels (synthetic only). Short on purpose: after 300 steps the policy
  # samples right answers on part of the easy prompts (greedy held-out ~0.4, best of 8 ~0.58),
  # which leaves room to learn from its own pairs; 600 steps gives ~0.6 greedy but best of 8
  # barely above greedy, so the pairs have little to teach.
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 300
  c.sft.batch_size = 32
  c.sft.learning_rate = 5e-4  # 3e-3 stalls at SFT loss ~0.66 (600 steps); 5e-4: ~0.46 at 300.
  c.sft.num_examples = 2000
  c.sft.max_level = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.temperature = 0.0  # Greedy held-out answers.
  c.eval.max_new_tokens = 24

  c.checkpoint = ml_collections.ConfigDict(dict(keep=2, use_async=False))

  if arg == "static":
    c.creator.enabled = False
  elif arg == "smoke":
    c.iterations = 1
    c.data.num_prompts = 8
    c.data.heldout_per_level = 2
    c.sampling.num_samples = 2
    c.sampling.max_new_tokens = 8
    c.train.num_pairs = 8
    c.train.batch_size = 4
    c.train.epochs = 1
    c.sft.steps = 40
    c.sft.learning_rate = 3e-3  # 40 steps: the fast rate gives sampled answers with gaps.
    c.sft.batch_size = 8
    c.sft.num_examples = 64
    c.eval.max_new_tokens = 8
    c.creator.num_evolutions = 1
    # The 40-step warm-start is never exactly right: keep every pair so training still runs.
    c.train.min_chosen_reward = float("-inf")
  elif arg:
    raise ValueError(f"configs/default.py: unknown arg {arg!r} (expected '', 'static', 'smoke')")
  return c
