"""Online eva on the embedded default's synthetic tasks: RLOO with the creator in the loop.

  python -m eva_jax.main --config=configs/online.py --workdir=/tmp/eva_online

The embedded default (configs/default.py) up to its SFT warm-start, the same checkpoint θ_0
and held-out evaluation; then `online.steps` RLOO steps instead of offline iterations
(eva_jax/online_loop.py; the buffer and schedule in eva_jax/online_buffer.py). `:arg` variants:
  configs/online.py:static   the same schedule with fresh base prompts in the evolved slots
  configs/online.py:smoke    a seconds-long run for tests
The creator's own choices (informativeness metric, selection, evolver, filters, and
creator.enabled, the eva / static switch) are configs/default.py's `creator` fields; the
offline-only fields (iterations, train.num_pairs, train.loss, ...) are not read.
"""
import ml_collections

from configs import default


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "static", "smoke"):
    raise ValueError(f"configs/online.py: unknown arg {arg!r} (expected '', 'static', 'smoke')")
  c = default.get_config("smoke" if arg == "smoke" else "")
  o = c.online = ml_collections.ConfigDict()
  # Learner. RLOO steps of P prompts x K samples; every step samples from the current params at
  # temperature 1 without top-p / top-k (not fields: the estimator needs on-policy samples).
  o.steps = 120  # Online steps (one batch each); the whole run's budget.
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
  # The creator evolves 25 % of the visited active prompts each round (creator.fraction), one
  # rewrite each: a chain of 4 would bring ~4x the prompts the evolved slots can visit.
  c.creator.num_evolutions = 1

  if arg == "static":
    c.creator.enabled = False
  elif arg == "smoke":
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
