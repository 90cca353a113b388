"""Continuous batching: a fixed pool of S decode slots, refilled from a host-side queue.

`sampling.sample` decodes a batch until its longest row ends, so rows that finished early sit
idle. Here each slot holds one (prompt, sample) row; when it ends (an eos id or
max_new_tokens), the next queued row takes the slot. Two jitted programs, both donating the
KV cache and the slot state so they update in place:

1. `_refill`: prefills up to G prompts ([G, W], W their width bucket) and copies each prompt's
   cache into the slots of its queued samples (M slots; with M = N, the default, a refill is
   one prompt's N rows, so each prompt is prefilled once as in the fixed batches), draws each
   new row's first token, and hands back what the replaced slots held (their finished rows).
   Each slot keeps its own copy of its prompt's cache: N times the fixed batches' prompt
   cache for the same rows (the generated-token cache is the same size).
2. `_decode`: a `lax.while_loop` of one-token steps over all S slots (`models.sample_step` on
   a `models.SplitCache` whose generated-token count is per slot). It returns to the host once
   `refill_at` slots are free (the host passes min(M, rows still queued)), or when every slot
   is done.

The host loop alternates the two; the compiles are one `_decode` and one `_refill` per prompt
width bucket. Keys: row (p, n) draws token j with fold_in(fold_in(fold_in(rng, p), n), j), so
the output does not depend on the slot count, the refill size or the order prompts are served.

Axis letters: S slots, P prompt width (bucket of the longest prompt), W a refill's prompt
width, G prompts per refill, M slots per refill, T new tokens, V vocabulary.
"""
from __future__ import annotations

import collections
import contextlib
import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eva_jax import models, sharding, token_select
from eva_jax.models.config import ModelConfig
from eva_jax.sampling import (MAX_EOS, MIN_PROMPT_BUCKET, SampleOutput, cache_sharding,
                              on_batch, raise_if_non_finite, round_up_bucket)

# Traces of each jitted program; a test reads it to check the compile count.
TRACE_COUNTS: collections.Counter = collections.Counter()


class Slots(NamedTuple):
  """Per-slot decode state (leading axis S) and the row it is writing."""
  prev_S: jax.Array  # int32, the last token drawn: it goes in at the next step.
  count_S: jax.Array  # int32, tokens drawn so far.
  done_S: jax.Array  # bool, no live row (ended, stopped, or never filled).
  finished_S: jax.Array  # bool, the row ended with an eos id.
  bad_S: jax.Array  # int32, the step of non-finite logits, else -1.
  key_data_S: jax.Array  # uint32, the row's PRNG key data.
  prompt_len_S: jax.Array  # int32
  prompt_positions_SxP: jax.Array  # int32
  prompt_valid_SxP: jax.Array  # bool
  tokens_SxT: jax.Array  # int32, pad after the end.
  logprobs_SxT: jax.Array  # float32, 0 after the end.


def _empty_slots(slots: int, width: int, max_new_tokens: int, key_shape, pad_id: int) -> Slots:
  s, t = slots, max_new_tokens
  return Slots(jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.int32), jnp.ones((s,), bool),
               jnp.zeros((s,), bool), jnp.full((s,), -1, jnp.int32),
               jnp.zeros((s, *key_shape), jnp.uint32), jnp.ones((s,), jnp.int32),
               jnp.zeros((s, width), jnp.int32), jnp.zeros((s, width), bool),
               jnp.full((s, t), pad_id, jnp.int32), jnp.zeros((s, t), jnp.float32))


def _place(cache: dict, slots: Slots, mesh, rules):
  if mesh is None:
    return cache, slots
  cache = jax.tree.map(
      lambda c: jax.lax.with_sharding_constraint(c, cache_sharding(c.shape, mesh, rules)), cache)
  return cache, Slots(*(on_batch(x, mesh) for x in slots))


def _selector(temperature, top_p, top_k, greedy, nucleus):
  return functools.partial(token_select.select, temperature=temperature, top_p=top_p,
                           top_k=top_k, greedy=greedy, nucleus=nucleus)


def _step_keys(key_data_S, count_S, impl):
  return jax.vmap(lambda k, j: jax.random.fold_in(jax.random.wrap_key_data(k, impl=impl), j))(
      key_data_S, count_S)


@functools.partial(jax.jit, donate_argnames=("cache", "slots"), static_argnames=(
    "config", "impl", "pad_id", "top_k", "greedy", "nucleus", "mesh", "rules"))
def _refill(config: ModelConfig, params: dict, cache: dict, slots: Slots, prompts_GxW, mask_GxW,
            slot_M, group_M, prompt_M, sample_M, rng_data, eos_E, temperature, top_p, *,
            impl: str, pad_id: int, top_k: int, greedy: bool, nucleus: bool, mesh,
            rules=sharding.DEFAULT_RULES):
  """Prefills G prompts into M slots (slot id S = unused entry) -> (cache, slots, what the M
  slots held before: (tokens [M, T], logprobs [M, T], lengths [M], finished [M], bad [M]))."""
  TRACE_COUNTS["refill"] += 1
  s, p = slots.prompt_valid_SxP.shape
  t = slots.tokens_SxT.shape[1]
  g, w = prompts_GxW.shape
  old = jnp.minimum(slot_M, s - 1)
  evicted = (slots.tokens_SxT[old], slots.logprobs_SxT[old], slots.count_S[old],
             slots.finished_S[old] & (slots.bad_S[old] < 0), slots.bad_S[old])

  valid_GxW = mask_GxW.astype(bool)
  positions_GxW = models.positions_from_mask(mask_GxW)
  prompt_cache = models.init_cache(config, g, w, cache["prompt"]["k"].dtype)
  hidden_GxWxD, prompt_cache = models.decode_step(config, params, prompts_GxW, positions_GxW,
                                                  prompt_cache, 0, positions_GxW, valid_GxW)
  last_G = w - 1 - jnp.argmax(valid_GxW[:, ::-1], axis=-1)
  hidden_GxD = jnp.take_along_axis(hidden_GxWxD, last_G[:, None, None], axis=1)[:, 0]
  logits_MxV = models.logits_from_hidden(config, params, hidden_GxD)[group_M]
  # [L, G, W, K, E] -> the slot layout [L, M, K, P, E], then into the M slots.
  put = lambda c, new: c.at[:, slot_M].set(jnp.pad(
      jnp.swapaxes(new, 2, 3)[:, group_M], ((0, 0),) * 3 + ((0, p - w), (0, 0))), mode="drop")
  # The generated slots are masked until written, but a masked NaN left by a stopped row would
  # still reach the output (0 x NaN): start each row from zeros, as the fixed batches do.
  cache = {"prompt": jax.tree.map(put, cache["prompt"], prompt_cache), "generated": jax.tree.map(
      lambda c: c.at[:, slot_M].set(0, mode="drop"), cache["generated"])}

  rng = jax.random.wrap_key_data(rng_data, impl=impl)
  key_data_M = jax.vmap(lambda i, n: jax.random.key_data(
      jax.random.fold_in(jax.random.fold_in(rng, i), n)))(prompt_M, sample_M)
  select = _selector(temperature, top_p, top_k, greedy, nucleus)
  token_M, logprob_M = select(logits_MxV, _step_keys(key_data_M, jnp.zeros_like(slot_M), impl))
  bad_M = token_M < 0
  eos_M = ~bad_M & (token_M[:, None] == eos_E[None, :]).any(-1)
  token_M = jnp.where(bad_M, pad_id, token_M)
  row_MxT = jnp.full((slot_M.shape[0], t), pad_id, jnp.int32).at[:, 0].set(token_M)
  lp_MxT = jnp.zeros((slot_M.shape[0], t), jnp.float32).at[:, 0].set(
      jnp.where(bad_M, 0.0, logprob_M))
  pad_cols = ((0, 0), (0, p - w))
  new = Slots(token_M, (~bad_M).astype(jnp.int32), bad_M | eos_M | (t == 1), eos_M,
              jnp.where(bad_M, 0, -1), key_data_M, valid_GxW.sum(-1)[group_M],
              jnp.pad(positions_GxW, pad_cols)[group_M], jnp.pad(valid_GxW, pad_cols)[group_M],
              row_MxT, lp_MxT)
  slots = Slots(*(x.at[slot_M].set(y.astype(x.dtype), mode="drop") for x, y in zip(slots, new)))
  cache, slots = _place(cache, slots, mesh, rules)
  return cache, slots, evicted


@functools.partial(jax.jit, donate_argnames=("cache", "slots"), static_argnames=(
    "config", "impl", "pad_id", "top_k", "greedy", "nucleus", "mesh", "rules"))
def _decode(config: ModelConfig, params: dict, cache: dict, slots: Slots, refill_at, eos_E,
            temperature, top_p, *, impl: str, pad_id: int, top_k: int, greedy: bool,
            nucleus: bool, mesh, rules=sharding.DEFAULT_RULES):
  """One-token steps over every slot until `refill_at` slots are done or all are ->
  (cache, slots)."""
  TRACE_COUNTS["decode"] += 1
  s, t = slots.tokens_SxT.shape
  gen_len = cache["generated"]["k"].shape[3]
  slot_ids = jnp.arange(s)
  select = _selector(temperature, top_p, top_k, greedy, nucleus)

  def body(state):
    cache, st = state
    # Token count - 1 goes in; its keys/values land in generated slot count - 1.
    written_S = st.count_S - 1
    split = models.SplitCache(cache["prompt"]["k"], cache["prompt"]["v"],
                              cache["generated"]["k"], cache["generated"]["v"],
                              st.prompt_positions_SxP, st.prompt_valid_SxP, written_S)
    hidden_SxD, new_kv = models.sample_step(config, params, st.prev_S,
                                            st.prompt_len_S + written_S, split)
    column_S = jnp.clip(written_S, 0, gen_len - 1)  # Done slots write harmlessly in range.
    cache = dict(cache, generated=jax.tree.map(
        lambda c, kv: c.at[:, slot_ids, :, column_S].set(jnp.swapaxes(kv, 0, 1)),
        cache["generated"], new_kv))
    logits_SxV = models.logits_from_hidden(config, params, hidden_SxD)
    token_S, logprob_S = select(logits_SxV, _step_keys(st.key_data_S, st.count_S, impl))
    live_S = ~st.done_S
    bad_S = live_S & (token_S < 0)
    keep_S = live_S & ~bad_S
    at_S = jnp.where(keep_S, st.count_S, t)  # Column t: dropped.
    eos_S = keep_S & (token_S[:, None] == eos_E[None, :]).any(-1)
    count_S = st.count_S + keep_S
    st = st._replace(
        prev_S=jnp.where(keep_S, token_S, st.prev_S), count_S=count_S,
        done_S=st.done_S | bad_S | eos_S | (count_S >= t), finished_S=st.finished_S | eos_S,
        bad_S=jnp.where(bad_S, st.count_S, st.bad_S),
        tokens_SxT=st.tokens_SxT.at[slot_ids, at_S].set(token_S, mode="drop"),
        logprobs_SxT=st.logprobs_SxT.at[slot_ids, at_S].set(logprob_S, mode="drop"))
    return _place(cache, st, mesh, rules)

  def cond(state):
    done_S = state[1].done_S
    return ~done_S.all() & (done_S.sum() < refill_at)

  return jax.lax.while_loop(cond, body, (cache, slots))


def _check(config: ModelConfig, prompt_ids, num_samples, max_new_tokens, slots, refill,
           order) -> list[np.ndarray]:
  for name, value in [("num_samples", num_samples), ("max_new_tokens", max_new_tokens),
                      ("slots", slots), ("refill", refill)]:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"sample_continuous: {name} must be an int >= 1, got {value!r}")
  if not len(prompt_ids):
    raise ValueError("sample_continuous: no prompts")
  seqs = [np.asarray(seq, np.int64).reshape(-1) for seq in prompt_ids]
  for i, seq in enumerate(seqs):
    if not seq.size:
      raise ValueError(f"sample_continuous: prompt {i} is empty")
    if seq.min() < 0 or seq.max() >= config.vocab_size:
      raise ValueError(f"sample_continuous: prompt {i} has token ids outside [0, "
                       f"{config.vocab_size})")
    if seq.size + max_new_tokens > config.max_position_embeddings:
      raise ValueError(
          f"sample_continuous: prompt {i} has {seq.size} tokens; with max_new_tokens="
          f"{max_new_tokens} it needs {seq.size + max_new_tokens} positions but the model has "
          f"max_position_embeddings={config.max_position_embeddings}")
  if order is not None and sorted(int(i) for i in order) != list(range(len(seqs))):
    raise ValueError(f"sample_continuous: order must be a permutation of range({len(seqs)})")
  return seqs


def sample_continuous(config: ModelConfig, params: dict, prompt_ids: Sequence[Sequence[int]],
                      *, rng: jax.Array, num_samples: int, max_new_tokens: int, slots: int,
                      refill: Optional[int] = None, order: Optional[Sequence[int]] = None,
                      pad_id: int = 0, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, eos_ids: Optional[Sequence[int]] = None,
                      greedy: bool = False, cache_dtype=None, mesh=None,
                      rules=sharding.DEFAULT_RULES,
                      on_prompt: Optional[Callable[[int], None]] = None) -> SampleOutput:
  """`num_samples` responses per token-id prompt through `slots` KV-cache rows; see the module
  docstring. Returns a SampleOutput of NumPy arrays ([P, N, T] tokens, ...) in prompt order,
  as `sampling.sample_batched` does; the sampling arguments are `sampling.sample`'s.

  refill: slots refilled per `_refill` call, and the free slots that end a decode run (default
    num_samples: each refill is one prompt's N rows, so each prompt is prefilled once; rows
    are queued prompt-major and refilled in full groups, so a multiple of num_samples keeps
    that true).
  order: the order prompts are served (a permutation of their indices; default as given). It
    changes no output: serve long prompts first, say.
  on_prompt(1) is called as each prompt's last row ends (a progress bar's `update`).
  """
  if config.is_reward_model:
    raise ValueError("sample_continuous: config is a reward model; it has no LM head")
  refill = num_samples if refill is None else refill
  seqs = _check(config, prompt_ids, num_samples, max_new_tokens, slots, refill, order)
  token_select.check_args(temperature, top_p, top_k)
  eos = tuple(int(i) for i in (config.eos_token_ids if eos_ids is None else eos_ids))
  if len(eos) > MAX_EOS or any(not 0 <= i < config.vocab_size for i in eos):
    raise ValueError(f"sample_continuous: eos_ids must be at most {MAX_EOS} ids in [0, "
                     f"{config.vocab_size}), got {eos}")
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # A raw uint32 key (jax.random.PRNGKey).
  n, t = num_samples, max_new_tokens
  multiple = 1 if mesh is None else sharding.batch_multiple(mesh)
  num_slots = round_up_bucket(slots, 1, multiple) if slots % multiple else slots
  m = min(-(-refill // multiple) * multiple, num_slots)
  # Prompts that M consecutive queued rows can span (M full groups from an aligned start).
  groups = m // n if m % n == 0 else -(-(m - 1) // n) + 1
  groups = -(-groups // multiple) * multiple
  width = round_up_bucket(max(map(len, seqs)), MIN_PROMPT_BUCKET)

  eos_E = np.full((MAX_EOS,), -1, np.int32)
  eos_E[:len(eos)] = eos
  flags = token_select.static_flags(config.vocab_size, temperature, top_p, top_k, greedy)
  static = dict(impl=str(jax.random.key_impl(rng)), pad_id=pad_id, mesh=mesh, rules=rules,
                **flags)
  sel = (jnp.float32(temperature if temperature > 0 else 1.0), jnp.float32(top_p))
  dtype = jnp.dtype(cache_dtype or config.dtype)
  # Each slot holds its own copy of its prompt's cache, in the generated cache's layout.
  cache = {"prompt": models.init_generated_cache(config, num_slots, width, dtype),
           "generated": models.init_generated_cache(config, num_slots, max(t - 1, 1), dtype)}
  state = _empty_slots(num_slots, width, t, jax.random.key_data(rng).shape, pad_id)
  ctx = (sharding.activation_rules(mesh, rules) if mesh is not None
         else contextlib.nullcontext())
  if mesh is not None:
    cache = jax.tree.map(
        lambda c: sharding.put_global(c, cache_sharding(c.shape, mesh, rules)), cache)
    state = sharding.shard_batch(state, mesh)

  out_tokens = np.full((len(seqs) * n, t), pad_id, np.int32)
  out_logprobs = np.zeros((len(seqs) * n, t), np.float32)
  out_lengths = np.zeros((len(seqs) * n,), np.int32)
  out_finished = np.zeros((len(seqs) * n,), bool)
  out_bad = np.full((len(seqs) * n,), -1, np.int32)
  rows_left = [n] * len(seqs)

  def store(rows, held):
    held = [sharding.to_host(x) for x in held]
    for i, row in enumerate(rows):
      if row is not None:
        out_tokens[row], out_logprobs[row], out_lengths[row], out_finished[row], \
            out_bad[row] = (x[i] for x in held)
        rows_left[row // n] -= 1
        if on_prompt is not None and not rows_left[row // n]:
          on_prompt(1)

  def index(values, fill):  # M entries, the unused ones `fill`.
    return np.array(values + [fill] * (m - len(values)), np.int32)

  queue = collections.deque((int(p), j) for p in (range(len(seqs)) if order is None else order)
                            for j in range(n))
  occupant = [None] * num_slots
  done = np.ones(num_slots, bool)
  pending = []
  with ctx:
    while True:
      free = [i for i in range(num_slots) if done[i]]
      # Full groups of M while the queue lasts, so a multiple of N stays aligned to prompts.
      while queue and len(free) >= min(m, len(queue)):
        rows = [queue.popleft() for _ in range(min(m, len(free), len(queue)))]
        take, free = free[:len(rows)], free[len(rows):]
        prompts = list(dict.fromkeys(p for p, _ in rows))
        w = min(round_up_bucket(max(len(seqs[p]) for p in prompts), MIN_PROMPT_BUCKET), width)
        tokens_GxW = np.zeros((groups, w), np.int32)
        mask_GxW = np.zeros((groups, w), np.int32)
        mask_GxW[:, 0] = 1  # Unused groups: one-token prompts nobody reads.
        for g, p in enumerate(prompts):
          tokens_GxW[g, :len(seqs[p])], mask_GxW[g, :len(seqs[p])] = seqs[p], 1
        cache, state, held = _refill(
            config, params, cache, state, tokens_GxW, mask_GxW, index(take, num_slots),
            index([prompts.index(p) for p, _ in rows], 0), index([p for p, _ in rows], 0),
            index([j for _, j in rows], 0), jax.random.key_data(rng), eos_E, *sel, **static)
        pending.append(([occupant[i] for i in take], held))
        for i, (p, j) in zip(take, rows):
          occupant[i], done[i] = p * n + j, False
      if not queue and done.all():
        break
      refill_at = min(m, len(queue)) if queue else num_slots + 1
      cache, state = _decode(config, params, cache, state, np.int32(refill_at), eos_E, *sel,
                             **static)
      for rows, held in pending:  # Ready by now: the decode run was queued after them.
        store(rows, held)
      pending = []
      done = np.array(sharding.to_host(state.done_S))
  held = (state.tokens_SxT, state.logprobs_SxT, state.count_S,
          state.finished_S & (state.bad_S < 0), state.bad_S)
  store(occupant, held)

  raise_if_non_finite("sample_continuous", out_bad, n, temperature)
  b = len(seqs)
  return SampleOutput(tokens=out_tokens.reshape(b, n, t), lengths=out_lengths.reshape(b, n),
                      logprobs=out_logprobs.reshape(b, n, t),
                      finished=out_finished.reshape(b, n))
