"""Online eva on the embedded default's synthetic tasks: RLOO with the creator in the loop.

  python -m eva_jax.main --config=configs/online.py --workdir=/tmp/eva_online

The embedded default (configs/default.py) up to its SFT warm-start, the same checkpoint θ_0
and held-out evaluation; then `online.steps` RLOO steps instead of offline iterations
(eva_jax/online_loop.py; the buffer and schedule in eva_jax/online_buffer.py). `:arg` variants:
  configs/online.py:static   the same schedule with fresh base prompts in the evolved slots
  configs/online.py:smoke    a seconds-long run for tests
  configs/online.py:paper[,static][,<slice>]   the paper-scale run on TPU (below)
The creator's own choices (informativeness metric, selection, evolver, filters, and
creator.enabled, the eva / static switch) are configs/default.py's `creator` fields; the
offline-only fields (iterations, train.num_pairs, train.loss, ...) are not read.

Paper scale (`paper`; slice v5p-8, the default, or v5e-64), launched as configs/paper.py's runs:

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd eva_jax && \
    python -m eva_jax.main --config=configs/online.py:paper,v5p-8 --workdir=/mnt/runs/online_eva"

configs/paper.py's gemma-2-9b-it policy (float32 master weights, bfloat16 compute), ArmoRM
reward, UltraFeedback prompts (1024 tokens at most), slice meshes and LM creator (the authors'
EvolInstruct rewrites, by the policy), with the online learner: K = 4 samples per prompt at
temperature 1 without top-p / top-k, 2048 new tokens, P = 32 prompts per step. The paper's RLOO
settings (K, batch, learning rate, KL weight) were not published with code and are not in the
paper text we read: K = 4 is RLOO's usual choice (Ahmadian et al. 2024 report k = 2 and 4), the
rate is the authors' DPO rate, 5e-7; both are assumptions to sweep. 940 steps x 32 prompts x 4
samples = 120,000 responses, about one offline eva iteration's (10,000 base + 10,000 evolved
prompts x 6).
Memory (experiments/memory_plan.py --backend=tpu, deviceless compiles with libtpu; GiB per
chip, program step + what stays resident):
  rloo_v5p8_mb1       the update, 128 rows of 1024 + 2048 tokens, 1 row per chip x 32
                      micro-batches: 57.9 + 17.0 (θ_0 in bfloat16, reward model) = 74.9
                      of 95 (21 % free)
  sample_v5p8_online  16 prompts x 4 samples per call (sampling.batch_size 16), decoded
                      tensor-parallel over the 4 chips: 16.8 + 42.8 (the policy, θ_0, the
                      AdamW moments, reward model) = 59.6 of 95 (37 % free)
  rloo_v5e64_mb1      the update on v5e-64, 1 row per chip x 2 micro-batches:
                      9.2 + 1.1 = 10.3 of 16 (36 % free)
  sample_v5e64_online one call on all 32 prompts, padded to the mesh's 64:
                      5.3 + 2.7 = 8.0 of 16 (50 % free)
(The reward model resident in the plan is the 27B Skywork one, larger than ArmoRM's 8B.)
The two log-prob forwards per step (π_old, θ_0) run the update's forward on the same rows
without gradients or optimizer state, so the update's row bounds them.
"""
import ml_collections

from configs import default, paper

# Slices with a memory plan for the online programs -> (rollout rows per chip in one
# micro-batch, prompts per sampling call).
PAPER_SLICES = {"v5p-8": (1, 16), "v5e-64": (1, 32)}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg.split(",")[0] == "paper":
    return _paper(arg)
  if arg not in ("", "static", "smoke"):
    raise ValueError(f"configs/online.py: unknown arg {arg!r} (expected '', 'static', 'smoke' "
                     "or 'paper[,static][,<slice>]')")
  c = default.get_config("smoke" if arg == "smoke" else "")
  c.online = online_section()
  c.creator.num_evolutions = 1  # online_section says why.
  if arg == "static":
    c.creator.enabled = False
  elif arg == "smoke":
    o = c.online
    o.steps = 6
    o.prompts_per_step = 4
    o.num_samples = 2
    o.max_new_tokens = 8
    o.base_pool = 6
    o.evolved_pool = 4
    o.warmup_steps = 2
    o.evolve_every = 2
    o.max_visits = 3
    o.eval_every = 3
    o.checkpoint_every = 2
    o.log_every = 2
    c.creator.fraction = 0.5
  return c


def online_section() -> ml_collections.ConfigDict:
  """The `online` fields at the embedded default's sizes."""
  o = ml_collections.ConfigDict()
  # Learner. RLOO steps of P prompts x K samples; every step samples from the current params at
  # temperature 1 without top-p / top-k (not fields: the estimator needs on-policy samples).
  o.steps = 120  # Online steps (one batch each); the whole run's budget.
  # Generated tokens (policy samples + creator rewrites) after which the run ends, at the end of
  # the step that reaches them; 0 = off (`steps` alone). The schedule still spans `steps`.
  o.token_budget = 0
  o.prompts_per_step = 16  # P: prompts per batch.
  o.num_samples = 4  # K >= 2 samples per prompt (the leave-one-out baseline needs two).
  o.max_new_tokens = 24  # Sampled tokens per response (the embedded default's).
  # c.train's optimizer and schedule (AdamW, 10 % warm-up, cosine) at this rate. Seed 0,
  # held-out reward after 120 steps (warm-start 0.424): 2e-5 0.434, 5e-5 0.423, 1e-4 0.437 —
  # within seed noise; 1e-4 is the offline default's rate.
  o.learning_rate = 1e-4
  o.beta = 0.05  # KL(π_old ‖ θ_0) weight in the reward, per sequence (θ_0: the warm-start).
  # Updates per batch. 1 = plain REINFORCE with leave-one-out baselines; > 1 reuses the batch
  # with the PPO-clipped ratio to π_old (the trainer's log-probs at sampling time).
  o.updates_per_step = 1
  o.clip_eps = 0.2  # Clip range when updates_per_step > 1.
  o.grad_accum = 1  # Micro-batches per update (P·K rows split evenly).
  # Buffer and schedule (eva_jax/online_buffer.py).
  o.base_ratio = 0.5  # Share of base prompts per batch (evolved slots: the rest, when there).
  o.base_pool = 64  # Active base prompts, refilled from the source in order (>= P).
  o.evolved_pool = 64  # Active evolved prompts at most; the oldest leave first beyond it.
  o.info_floor = 0.05  # Added to a prompt's informativeness as its draw weight: stale prompts
  # stay drawable (so they can leave), informative ones come back more often.
  o.warmup_steps = 20  # Steps on base prompts alone before the creator first runs.
  o.evolve_every = 10  # Steps between creator rounds after the warm-up.
  o.solved_reward = 1.0  # A prompt whose group's mean reward reaches this leaves (solved).
  o.max_visits = 6  # A prompt leaves after this many visits (stale)...
  o.max_zero_visits = 2  # ...or after this many visits in a row without signal (equal rewards).
  # Logs and artifacts.
  o.eval_every = 40  # Held-out evaluation every this many steps, and at the end.
  o.checkpoint_every = 20  # Train state + buffer saved every this many steps (and at evals).
  o.log_every = 10  # A console line every this many steps (metrics.jsonl gets every step).
  # (creator.num_evolutions is 1 in every online config: the creator evolves 25 % of the visited
  # active prompts each round, one rewrite each; a chain of 4 would bring ~4x the prompts the
  # evolved slots can visit.)
  return o


def _paper(arg: str) -> ml_collections.ConfigDict:
  parts = [p.strip() for p in arg.split(",")[1:] if p.strip()]
  unknown = [p for p in parts if p != "static" and p not in PAPER_SLICES]
  if unknown or len(parts) > 2:
    raise ValueError(f"configs/online.py: arg {arg!r}: expected 'paper[,static][,<slice>]' with "
                     f"a slice in {tuple(PAPER_SLICES)} (the slices with an online memory plan)")
  slice_name = next((p for p in parts if p in PAPER_SLICES), "v5p-8")
  c = paper.get_config(f"dpo,{'static' if 'static' in parts else 'eva'},{slice_name}")
  c.protocol = "fresh"  # configs/paper.py sets its offline protocol; the online loop has none.
  c.creator.num_evolutions = 1
  o = c.online = online_section()
  o.steps = 940  # ~120,000 responses (module docstring).
  o.prompts_per_step = 32
  o.num_samples = 4  # K.
  o.max_new_tokens = 2048
  o.learning_rate = 5e-7  # c.train's AdamW, cosine, 10 % warm-up (configs/paper.py's dpo).
  o.beta = 0.05  # KL weight: the synthetic default's, an assumption like the rate.
  rows_per_chip, sampling_chunk = PAPER_SLICES[slice_name]
  rows_per_batch = c.mesh.data * c.mesh.fsdp * rows_per_chip
  o.grad_accum = o.prompts_per_step * o.num_samples // rows_per_batch
  o.base_pool = 256
  o.evolved_pool = 256
  # ArmoRM scores have no "right answer" level and their gaps are small (hundredths, not
  # measured here): no prompt counts as solved, and a floor well under the typical gap keeps
  # the draw weighted by informativeness (watch info_q50 in metrics.jsonl).
  o.solved_reward = float("inf")
  o.info_floor = 0.01
  o.eval_every = 100
  o.checkpoint_every = 50  # A 9B train state is ~100 GiB to write.
  # The memory plan's sampling call (prompts x 4 samples of 3072-token KV cache).
  c.sampling.batch_size = sampling_chunk
  return c
