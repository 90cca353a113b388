"""Continuous batching: decode slots in prompt groups, refilled inside one jitted loop.

`sampling.sample` decodes a batch until its longest row ends, so rows that finished early sit
idle. Here S decode slots form G groups of Z slots (Z <= N, default N). A group holds one
prompt's KV cache, which its Z slots read without copies: the fixed batches' `models.SplitCache`
layout (G prompts, Z rows each), so a decode step costs what a fixed batch of S rows costs.
Rows (prompt, sample) are queued prompt-major in serving order; one `lax.while_loop` (`_decode`)
runs, under a `lax.cond` on steps where a slot is free and rows are queued:

- refill: a free slot takes the next queued row when that row is of its group's prompt; a group
  whose slots are all free first takes the next queued row's prompt (its prefilled KV cache is
  copied in from a table, once per group and prompt). New rows draw their first token from their
  prompt's prefill logits.

and then, on every step, one token for every slot (`models.sample_step` with per-slot
generated-token counts), written straight into the output rows. With Z = N a group takes a new
prompt when its prompt's longest sample ends; Z < N refills within a prompt row by row, with more
groups (and prompt caches) for the same slots.

Prompts are prefilled C at a time (`_prefill`, a chunk; default C = G, so the table is the size
of the groups' cache) into that table; the loop returns to the host only when a chunk's queue is
drained and a group wants a prompt (the host prefills the next chunk), or when every row is done.
Compiles: one `_decode`, and one `_prefill` per chunk width bucket.

Keys: row (p, n) draws token j with fold_in(fold_in(fold_in(rng, p), n), j), so the output does
not depend on the slot count, the group size, the chunking or the order prompts are served.

Axis letters: S slots, G groups, Z slots per group, C prompts per chunk (table entries), P prompt
width (bucket of the longest prompt), W a chunk's prompt width, R = prompts x N output rows (in
serving order), T new tokens, V vocabulary.
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
                              gen_layers, generated_slots, inference_config, mesh_platform,
                              on_batch, prepare_params, prompt_prefill, raise_if_non_finite,
                              round_up_bucket)

# Traces of each jitted program; a test reads it to check the compile count.
TRACE_COUNTS: collections.Counter = collections.Counter()


class Table(NamedTuple):
  """C prefilled prompts (a chunk), in the order they are served."""
  k: jax.Array  # [L, C, K, P, E], the prompt cache layout of `models.SplitCache`.
  v: jax.Array
  positions_CxP: jax.Array  # int32
  valid_CxP: jax.Array  # bool
  length_C: jax.Array  # int32, prompt tokens.
  logits_CxV: jax.Array  # float32, the last prompt token's logits.
  prompt_C: jax.Array  # int32, the prompt's index in the caller's list (its key).


class State(NamedTuple):
  """What the decode loop carries between calls: per slot (S), per group (G), per row (R)."""
  prev_S: jax.Array  # int32, the last token drawn: it goes in at the next step.
  count_S: jax.Array  # int32, tokens drawn so far.
  done_S: jax.Array  # bool, no live row (ended, stopped, or never filled).
  bad_S: jax.Array  # bool, the row stopped on non-finite logits (its cache may hold NaN).
  row_S: jax.Array  # int32, the output row (serving order), R for none.
  key_data_S: jax.Array  # uint32, the row's PRNG key data.
  served_G: jax.Array  # int32, the serving index of the group's prompt, -1 for none.
  positions_GxP: jax.Array  # int32
  valid_GxP: jax.Array  # bool
  length_G: jax.Array  # int32
  next_row: jax.Array  # int32 scalar, the first queued row.
  tokens_RxT: jax.Array  # int32, pad after the end.
  logprobs_RxT: jax.Array  # float32, 0 after the end.
  lengths_R: jax.Array  # int32
  finished_R: jax.Array  # bool, ended with an eos id.
  bad_R: jax.Array  # int32, the step of non-finite logits, else -1.


# The fields with a slot or group axis first: on the batch shards under a mesh.
_BATCHED = tuple(f for f in State._fields if f.endswith(("_S", "_G", "_GxP")))


def _init_state(groups: int, size: int, width: int, rows: int, max_new_tokens: int, key_shape,
                pad_id: int) -> State:
  s, g, r, t = groups * size, groups, rows, max_new_tokens
  return State(jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.int32), jnp.ones((s,), bool),
               jnp.zeros((s,), bool), jnp.full((s,), r, jnp.int32),
               jnp.zeros((s, *key_shape), jnp.uint32), jnp.full((g,), -1, jnp.int32),
               jnp.zeros((g, width), jnp.int32), jnp.zeros((g, width), bool),
               jnp.ones((g,), jnp.int32), jnp.zeros((), jnp.int32),
               jnp.full((r, t), pad_id, jnp.int32), jnp.zeros((r, t), jnp.float32),
               jnp.zeros((r,), jnp.int32), jnp.zeros((r,), bool), jnp.full((r,), -1, jnp.int32))


def _place(tree, mesh, rules):
  """The KV caches on their sharding, and the slot/group axes on the batch shards."""
  if mesh is None:
    return tree
  cache, state = tree
  cache = jax.tree.map(
      lambda c: jax.lax.with_sharding_constraint(c, cache_sharding(c.shape, mesh, rules)), cache)
  return cache, state._replace(**{f: on_batch(getattr(state, f), mesh) for f in _BATCHED})


def _selector(temperature, top_p, top_k, greedy, nucleus):
  return functools.partial(token_select.select, temperature=temperature, top_p=top_p,
                           top_k=top_k, greedy=greedy, nucleus=nucleus)


def _step_keys(key_data_S, count_S, impl):
  return jax.vmap(lambda k, j: jax.random.fold_in(jax.random.wrap_key_data(k, impl=impl), j))(
      key_data_S, count_S)


@functools.partial(jax.jit, static_argnames=("config", "width", "cache_dtype"))
def _prefill(config: ModelConfig, params: dict, prompts_CxW, mask_CxW, prompt_C, *,
             width: int, cache_dtype) -> Table:
  """Runs C prompts once -> their Table, padded to `width` slots."""
  TRACE_COUNTS["prefill"] += 1
  config = inference_config(config)
  w = prompts_CxW.shape[1]
  cache, logits_CxV = prompt_prefill(config, params, prompts_CxW, mask_CxW, cache_dtype)
  valid_CxW = mask_CxW.astype(bool)
  positions_CxW = models.positions_from_mask(mask_CxW)
  pad = lambda x, axis: jnp.pad(x, [(0, width - w if i == axis else 0) for i in range(x.ndim)])
  kv = {name: pad(x, 3) for name, x in cache.items()}
  return Table(kv["k"], kv["v"], pad(positions_CxW, 1), pad(valid_CxW, 1),
               valid_CxW.sum(-1).astype(jnp.int32), logits_CxV, prompt_C)


def _refill(cache: dict, st: State, table: Table, first, end_row, rng, eos_E, select, *,
            num_samples: int, impl: str, pad_id: int, max_new_tokens: int):
  """Free slots take queued rows (groups take prompts first where they must) and draw their
  first tokens -> (cache, state). Rows `first * N` on are in the table; `end_row` ends them."""
  n, t = num_samples, max_new_tokens
  g_count = st.served_G.shape[0]
  s = st.done_S.shape[0]
  z = s // g_count

  # Groups in turn, as the queue is: a few scalar ops each, the cache untouched.
  def assign(g, carry):
    next_row, served_G, switch_G, row_S, new_S = carry
    free_Z = jax.lax.dynamic_slice(st.done_S, (g * z,), (z,))
    queued = next_row < end_row
    wanted = next_row // n
    switch = queued & free_Z.all() & (served_G[g] != wanted)
    served_G = served_G.at[g].set(jnp.where(switch, wanted, served_G[g]))
    available = jnp.where(queued & (served_G[g] == wanted), (wanted + 1) * n - next_row, 0)
    rank_Z = jnp.cumsum(free_Z) - 1
    take_Z = free_Z & (rank_Z < available)
    row_S = jax.lax.dynamic_update_slice(row_S, jnp.where(
        take_Z, next_row + rank_Z, jax.lax.dynamic_slice(row_S, (g * z,), (z,))), (g * z,))
    new_S = jax.lax.dynamic_update_slice(new_S, take_Z, (g * z,))
    return (next_row + jnp.minimum(free_Z.sum(), available), served_G, switch_G.at[g].set(switch),
            row_S, new_S)

  next_row, served_G, switch_G, row_S, new_S = jax.lax.fori_loop(
      0, g_count, assign, (st.next_row, st.served_G, jnp.zeros((g_count,), bool), st.row_S,
                           jnp.zeros((s,), bool)))

  # Switched groups copy their prompt in (a while loop over them only: in place).
  switched_G = jnp.argsort(~switch_G, stable=True)
  entry_G = jnp.clip(served_G - first, 0, table.length_C.shape[0] - 1)

  def copy(state):
    i, prompt_cache = state
    g, e = switched_G[i], entry_G[switched_G[i]]
    prompt_cache = {name: jax.lax.dynamic_update_slice(
        c, jax.lax.dynamic_index_in_dim(getattr(table, name), e, 1), (0, g, 0, 0, 0))
        for name, c in prompt_cache.items()}
    return i + 1, prompt_cache

  _, prompt = jax.lax.while_loop(lambda state: state[0] < switch_G.sum(), copy,
                                 (0, cache["prompt"]))
  pick = lambda old, new: jnp.where(switch_G.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
  positions_GxP = pick(st.positions_GxP, table.positions_CxP[entry_G])
  valid_GxP = pick(st.valid_GxP, table.valid_CxP[entry_G])
  length_G = pick(st.length_G, table.length_C[entry_G])

  # A slot whose last row stopped on NaN may hold NaN keys/values: masked, but 0 x NaN = NaN.
  wipe_S = jnp.argsort(~(new_S & st.bad_S), stable=True)

  def wipe(state):
    i, generated = state
    at = (0, wipe_S[i] // z, wipe_S[i] % z, 0, 0, 0)
    generated = {name: jax.lax.dynamic_update_slice(
        c, jnp.zeros((c.shape[0], 1, 1) + c.shape[3:], c.dtype), at)
        for name, c in generated.items()}
    return i + 1, generated

  _, generated = jax.lax.while_loop(lambda state: state[0] < (new_S & st.bad_S).sum(), wipe,
                                    (0, cache["generated"]))

  served_S = jnp.clip(row_S // n, 0, st.tokens_RxT.shape[0] // n - 1)
  entry_S = jnp.clip(served_S - first, 0, table.length_C.shape[0] - 1)
  root = jax.random.wrap_key_data(rng, impl=impl)
  key_data_S = jax.vmap(lambda q, j: jax.random.key_data(jax.random.fold_in(
      jax.random.fold_in(root, q), j)))(table.prompt_C[entry_S], row_S % n)
  key_data_S = jnp.where(new_S.reshape((-1,) + (1,) * (key_data_S.ndim - 1)), key_data_S,
                         st.key_data_S)
  token_S, logprob_S = select(table.logits_CxV[entry_S],
                              _step_keys(key_data_S, jnp.zeros_like(row_S), impl))
  bad_S = new_S & (token_S < 0)
  eos_S = new_S & ~bad_S & (token_S[:, None] == eos_E[None, :]).any(-1)
  keep_S = new_S & ~bad_S
  out_S = jnp.where(new_S, row_S, st.tokens_RxT.shape[0])  # Row R: dropped.
  st = st._replace(
      prev_S=jnp.where(keep_S, token_S, st.prev_S), count_S=jnp.where(new_S, keep_S, st.count_S),
      done_S=jnp.where(new_S, bad_S | eos_S | (t == 1), st.done_S),
      bad_S=jnp.where(new_S, bad_S, st.bad_S), row_S=row_S, key_data_S=key_data_S,
      served_G=served_G, positions_GxP=positions_GxP, valid_GxP=valid_GxP, length_G=length_G,
      next_row=next_row,
      tokens_RxT=st.tokens_RxT.at[out_S, 0].set(jnp.where(keep_S, token_S, pad_id), mode="drop"),
      logprobs_RxT=st.logprobs_RxT.at[out_S, 0].set(jnp.where(keep_S, logprob_S, 0.0),
                                                    mode="drop"),
      lengths_R=st.lengths_R.at[out_S].set(keep_S, mode="drop"),
      finished_R=st.finished_R.at[out_S].set(eos_S, mode="drop"),
      bad_R=st.bad_R.at[out_S].set(jnp.where(bad_S, 0, -1), mode="drop"))
  return {"prompt": prompt, "generated": generated}, st


@functools.partial(jax.jit, donate_argnames=("cache", "state"), static_argnames=(
    "config", "num_samples", "impl", "pad_id", "top_k", "greedy", "nucleus", "mesh", "rules"))
def _decode(config: ModelConfig, params: dict, cache: dict, state: State, table: Table, first,
            end_row, last_chunk, rng, eos_E, temperature, top_p, *, num_samples: int, impl: str,
            pad_id: int, top_k: int, greedy: bool, nucleus: bool, mesh,
            rules=sharding.DEFAULT_RULES):
  """Refills and one-token steps until every row is done, or (unless `last_chunk`) until the
  chunk's rows [first * N, end_row) are all taken and a group wants a prompt -> (cache, state)."""
  TRACE_COUNTS["decode"] += 1
  config = inference_config(config)
  s = state.done_S.shape[0]
  g_count = state.served_G.shape[0]
  r, t = state.tokens_RxT.shape
  gen_len = cache["generated"]["k"].shape[4]
  group_S, member_S = jnp.divmod(jnp.arange(s), s // g_count)
  select = _selector(temperature, top_p, top_k, greedy, nucleus)
  refill = functools.partial(_refill, table=table, first=first, end_row=end_row, rng=rng,
                             eos_E=eos_E, select=select, num_samples=num_samples, impl=impl,
                             pad_id=pad_id, max_new_tokens=t)

  gen_layer = gen_layers(config, cache, mesh)

  def body(carry):
    cache, st = carry
    cache, st = jax.lax.cond(st.done_S.any() & (st.next_row < end_row),
                             lambda c: refill(*c), lambda c: c, (cache, st))
    # Token count - 1 goes in; its keys/values land in generated slot count - 1.
    written_S = st.count_S - 1
    split = models.SplitCache(cache["prompt"]["k"], cache["prompt"]["v"],
                              cache["generated"]["k"], cache["generated"]["v"],
                              st.positions_GxP, st.valid_GxP, written_S, gen_layer)
    length_S = jnp.repeat(st.length_G, s // g_count)
    hidden_SxD, new_kv = models.sample_step(config, params, st.prev_S, length_S + written_S,
                                            split)
    column_S = jnp.clip(written_S, 0, gen_len - 1)  # Done slots write harmlessly in range.
    cache = dict(cache, generated=jax.tree.map(
        lambda c, kv: c.at[:, group_S, member_S, :, column_S].set(jnp.swapaxes(kv, 0, 1)),
        cache["generated"], new_kv))
    logits_SxV = models.logits_from_hidden(config, params, hidden_SxD)
    token_S, logprob_S = select(logits_SxV, _step_keys(st.key_data_S, st.count_S, impl))
    live_S = ~st.done_S
    bad_S = live_S & (token_S < 0)
    keep_S = live_S & ~bad_S
    eos_S = keep_S & (token_S[:, None] == eos_E[None, :]).any(-1)
    count_S = st.count_S + keep_S
    out_S = jnp.where(live_S, st.row_S, r)  # Row R: dropped.
    at_S = jnp.where(keep_S, st.count_S, t)  # Column T: dropped.
    st = st._replace(
        prev_S=jnp.where(keep_S, token_S, st.prev_S), count_S=count_S,
        done_S=st.done_S | bad_S | eos_S | (count_S >= t), bad_S=st.bad_S | bad_S,
        tokens_RxT=st.tokens_RxT.at[out_S, at_S].set(token_S, mode="drop"),
        logprobs_RxT=st.logprobs_RxT.at[out_S, at_S].set(logprob_S, mode="drop"),
        lengths_R=st.lengths_R.at[out_S].set(count_S, mode="drop"),
        finished_R=st.finished_R.at[out_S].set(eos_S, mode="drop"),
        bad_R=st.bad_R.at[jnp.where(bad_S, out_S, r)].set(st.count_S, mode="drop"))
    return _place((cache, st), mesh, rules)

  def cond(carry):
    st = carry[1]
    queued = st.next_row < end_row
    group_free = st.done_S.reshape(g_count, -1).all(-1).any()
    return (queued | ~st.done_S.all()) & (queued | last_chunk | ~group_free)

  return jax.lax.while_loop(cond, body, (cache, state))


def _check(config: ModelConfig, prompt_ids, num_samples, max_new_tokens, slots, group, chunk,
           order) -> list[np.ndarray]:
  for name, value in [("num_samples", num_samples), ("max_new_tokens", max_new_tokens),
                      ("slots", slots), ("group", group), ("chunk", chunk)]:
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
                      group: Optional[int] = None, chunk: Optional[int] = None,
                      order: Optional[Sequence[int]] = None, pad_id: int = 0,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      eos_ids: Optional[Sequence[int]] = None, greedy: bool = False,
                      cache_dtype=None, mesh=None, rules=sharding.DEFAULT_RULES,
                      on_prompt: Optional[Callable[[int], None]] = None) -> SampleOutput:
  """`num_samples` responses per token-id prompt through about `slots` KV-cache rows; see the
  module docstring. Returns a SampleOutput of NumPy arrays ([P, N, T] tokens, ...) in prompt
  order, as `sampling.sample_batched` does; the sampling arguments are `sampling.sample`'s.

  slots: decode rows, rounded up to whole groups (and to the decode mesh's batch multiple of
    groups: `sharding.decode_mesh`).
  group: slots per prompt group, Z (default and at most num_samples).
  chunk: prompts prefilled at a time, C (default: the number of groups).
  order: the order prompts are served (a permutation of their indices; default as given). It
    changes no output: serve long prompts first, say.
  on_prompt(k) is called with the number of prompts whose rows have all ended, each time the
  decode loop returns to the host (a progress bar's `update`).
  """
  if config.is_reward_model:
    raise ValueError("sample_continuous: config is a reward model; it has no LM head")
  n, t = num_samples, max_new_tokens
  group = n if group is None else group
  seqs = _check(config, prompt_ids, n, t, slots, group, 1 if chunk is None else chunk, order)
  token_select.check_args(temperature, top_p, top_k)
  eos = tuple(int(i) for i in (config.eos_token_ids if eos_ids is None else eos_ids))
  if len(eos) > MAX_EOS or any(not 0 <= i < config.vocab_size for i in eos):
    raise ValueError(f"sample_continuous: eos_ids must be at most {MAX_EOS} ids in [0, "
                     f"{config.vocab_size}), got {eos}")
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # A raw uint32 key (jax.random.PRNGKey).
  # Cast and placed once, tensor parallel on the decode mesh, as `sampling.sample` decodes.
  params = prepare_params(config, params, mesh, rules)
  if mesh is not None:
    mesh, rules = sharding.decode_mesh(mesh, config), sharding.decode_rules(rules)
  multiple = 1 if mesh is None else sharding.batch_multiple(mesh)
  z = min(group, n)
  g = -(-slots // z)
  g = -(-g // multiple) * multiple
  c = -(-(chunk or g) // multiple) * multiple
  served = [int(i) for i in (range(len(seqs)) if order is None else order)]
  width = round_up_bucket(max(map(len, seqs)), MIN_PROMPT_BUCKET)
  rows = len(seqs) * n

  eos_E = np.full((MAX_EOS,), -1, np.int32)
  eos_E[:len(eos)] = eos
  flags = token_select.static_flags(config.vocab_size, temperature, top_p, top_k, greedy)
  static = dict(num_samples=n, impl=str(jax.random.key_impl(rng)), pad_id=pad_id, mesh=mesh,
                rules=rules, **flags)
  sel = (jnp.float32(temperature if temperature > 0 else 1.0), jnp.float32(top_p))
  dtype = jnp.dtype(cache_dtype or config.dtype)
  prompt_shape = (config.num_layers, g, config.num_kv_heads, width, config.head_dim)
  cache = {"prompt": {name: jnp.zeros(prompt_shape, dtype) for name in ("k", "v")},
           "generated": models.init_generated_cache(
               config, g, z, generated_slots(t, mesh_platform(mesh)), dtype)}
  state = _init_state(g, z, width, rows, t, jax.random.key_data(rng).shape, pad_id)
  ctx = (sharding.activation_rules(mesh, rules) if mesh is not None
         else contextlib.nullcontext())
  if mesh is not None:
    cache = jax.tree.map(
        lambda x: sharding.put_global(x, cache_sharding(x.shape, mesh, rules)), cache)
    state = state._replace(**sharding.shard_batch({f: getattr(state, f) for f in _BATCHED},
                                                  mesh))

  reported = 0
  with ctx:
    for first in range(0, len(served), c):
      part = served[first:first + c]
      w = min(round_up_bucket(max(len(seqs[p]) for p in part), MIN_PROMPT_BUCKET), width)
      tokens_CxW = np.zeros((c, w), np.int32)
      mask_CxW = np.zeros((c, w), np.int32)
      mask_CxW[:, 0] = 1  # Unused entries: one-token prompts nobody reads.
      for i, p in enumerate(part):
        tokens_CxW[i, :len(seqs[p])], mask_CxW[i, :len(seqs[p])] = seqs[p], 1
      prompt_C = np.array(part + [0] * (c - len(part)), np.int32)
      if mesh is not None:
        tokens_CxW, mask_CxW, prompt_C = sharding.shard_batch((tokens_CxW, mask_CxW, prompt_C),
                                                              mesh)
      table = _prefill(config, params, tokens_CxW, mask_CxW, prompt_C, width=width,
                       cache_dtype=dtype.name)
      end_row = (first + len(part)) * n
      cache, state = _decode(config, params, cache, state, table, np.int32(first),
                             np.int32(end_row), np.bool_(end_row == rows),
                             jax.random.key_data(rng), eos_E, *sel, **static)
      if on_prompt is not None:
        # Rows below the queue that no slot is writing have ended.
        live = sharding.to_host(state.row_S)[~sharding.to_host(state.done_S)]
        first_live = int(live.min()) if live.size else rows
        ended = min(first_live, int(sharding.to_host(state.next_row))) // n
        if ended > reported:
          on_prompt(ended - reported)
          reported = ended

  out = [sharding.to_host(x) for x in (state.tokens_RxT, state.logprobs_RxT, state.lengths_R,
                                       state.finished_R, state.bad_R)]
  # Serving order -> prompt order.
  index_R = (np.argsort(served)[:, None] * n + np.arange(n)).reshape(-1)
  tokens_RxT, logprobs_RxT, lengths_R, finished_R, bad_R = (x[index_R] for x in out)
  raise_if_non_finite("sample_continuous", bad_R, n, temperature)
  b = len(seqs)
  return SampleOutput(tokens=tokens_RxT.reshape(b, n, t), lengths=lengths_R.reshape(b, n),
                      logprobs=logprobs_RxT.reshape(b, n, t),
                      finished=(finished_R & (bad_R < 0)).reshape(b, n))
