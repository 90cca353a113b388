"""Solver sampling: a jitted prefill, then a `lax.while_loop` decode over a donated KV cache.

`sample` draws N responses for each of B prompts:
1. prefill (one jit): the B prompts run once through `models.decode_step`, filling the prompt
   KV cache; only the last real token of each prompt goes through the LM head.
2. decode (a second jit; the cache is donated, so the loop updates it in place and never copies
   it): the first token of every row comes from the prefill logits, then a `lax.while_loop`
   feeds one token per step (`models.sample_step`: the model's own layers over a
   `models.SplitCache`) until `max_new_tokens`, or until every row has emitted one of
   `eos_ids`. Rows are prompt-major (row b * N + n). The N samples of a prompt read its prompt
   cache without repeating it; their own tokens go to a per-row cache.

Under a mesh, `sample` decodes on `sharding.decode_mesh`: the params are cast once to the
compute dtype and placed tensor parallel, whole along the model width (`prepare_params`), so a
step reads each chip's resident share of the weights instead of all-gathering every layer's FSDP
shards; prompts split over its data axis, the KV cache over prompts and KV heads.

`eva_jax.continuous` decodes the same way through a fixed pool of slots that are refilled as
their rows end (continuous batching), reusing this module's helpers.

Prompts may be right- or left-padded (or both): positions come from the mask, the last real
token is each row's rightmost masked token, and padded slots are never attended. Prompt widths
and batch sizes are bucketed to powers of two so a run compiles a bounded number of times.

Token selection (`eva_jax.token_select`) is exact: the token is drawn from the softmax of
logits / temperature restricted to the top-k and then to the top-p nucleus, renormalised,
without sorting the vocabulary. Returned log-probs are of the *unmodified* model distribution
(temperature 1, no truncation): `log_softmax(forward(prompt + response))` read at each sampled
token.

Sampling never hangs: a row whose logits are not finite (NaN or +inf from the model, or
logits / temperature overflowing float32) is stopped where it happens and `sample` raises one
ValueError naming the prompt row, the sample and the step. Temperatures in
(0, token_select.MIN_TEMPERATURE) are refused up front (logits / temperature stays finite for
|logits| < 3e32 at the bound); the nucleus loop is capped at V rounds, with the argmax as the
fallback.

Axis letters: B prompts (or rows of a selection), P prompt width, N samples per prompt,
R = B * N decode rows, T new tokens, V vocabulary.
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
from eva_jax.models import attention
from eva_jax.models.config import ModelConfig

# Traces of each jitted stage, and "prepare": params cast and placed by `prepare_params`. Tests
# read it to check that the bucketing bounds recompiles and sample_batched prepares once.
TRACE_COUNTS: collections.Counter = collections.Counter()

MAX_EOS = 8  # eos ids are padded to this many so their number does not recompile.
MIN_PROMPT_BUCKET = 8


class SampleOutput(NamedTuple):
  """N responses per prompt. B prompts, N samples, T = max_new_tokens.

  tokens: int32 [B, N, T], generated tokens only; after an eos (which is kept) the pad id.
  lengths: int32 [B, N], generated tokens including the eos.
  logprobs: float32 [B, N, T], log-prob (nats) of each token under the model at temperature 1,
    without top-k/top-p; 0 at padded positions.
  finished: bool [B, N], True where the response ended with an eos id.
  """
  tokens: jax.Array
  lengths: jax.Array
  logprobs: jax.Array
  finished: jax.Array


# ---------------------------------------------------------------------------------------------
# Prefill and decode


# The prompt cache [L, B, K, P, E] and the generated one [L, B, N, K, T', E] (`models.SplitCache`).
_CACHE_AXES = {5: ("layers", "act_batch", "act_kv_heads", "act_len", "head_dim"),
               6: ("layers", "act_batch", None, "act_kv_heads", "act_len", "head_dim")}


def cache_sharding(shape, mesh, rules):
  """A KV cache's placement: prompts over data+fsdp, KV heads by the rules."""
  return sharding.logical_to_sharding(shape, _CACHE_AXES[len(shape)], mesh, rules)


def generated_slots(max_new_tokens: int, platform: Optional[str] = None) -> int:
  """Generated-cache slots: the last token needs none. On TPU a multiple of 128, so the cache
  keeps its default tiled layout (an odd count makes it relayout, a whole-cache copy per call);
  elsewhere a multiple of 8, since every decode step attends over all the slots (128 for 24 new
  tokens made the embedded default's sampling 2.5x slower on CPU). `platform`: the one the
  sampler compiles for (`mesh_platform`); None = the default backend."""
  multiple = 128 if (platform or jax.default_backend()) == "tpu" else 8
  return -(-max(max_new_tokens - 1, 1) // multiple) * multiple


def mesh_platform(mesh) -> str:
  """The platform a sampler with this mesh compiles for: its devices' (a TPU topology's for the
  memory plan's ahead-of-time compiles), or the default backend's without a mesh."""
  return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def gen_layers(config: ModelConfig, cache: dict, mesh):
  """`SplitCache.gen_layer` for a decode over `cache`: the layer indices where the step walks
  the generated cache block by block (`attention.walks_generated_blocks`), else None."""
  gen_len = cache["generated"]["k"].shape[4]
  if not attention.walks_generated_blocks(mesh_platform(mesh), gen_len):
    return None
  return jnp.arange(config.num_layers, dtype=jnp.int32)


def inference_config(config: ModelConfig) -> ModelConfig:
  """`config` without rematerialisation: nothing is differentiated while sampling."""
  return config.replace(remat="none")


def on_batch(x: jax.Array, mesh) -> jax.Array:
  """`x` constrained to the batch sharding (leading axis over the batch shards) on `mesh`."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))


def prompt_prefill(config: ModelConfig, params: dict, prompts_BxP: jax.Array,
                   mask_BxP: jax.Array, cache_dtype) -> tuple[dict, jax.Array]:
  """The prompts through the decoder once, inside a jitted sampler -> (their KV cache {"k", "v"}
  [L, B, K, P, E] in `models.SplitCache`'s prompt layout, the last prompt token's logits
  [B, V]). `config` is the sampler's (`inference_config`)."""
  b, p = prompts_BxP.shape
  valid_BxP = mask_BxP.astype(bool)
  positions_BxP = models.positions_from_mask(mask_BxP)
  cache = models.init_cache(config, b, p, cache_dtype)
  hidden_BxPxD, cache = models.decode_step(config, params, prompts_BxP, positions_BxP, cache,
                                           0, positions_BxP, valid_BxP)
  last_B = p - 1 - jnp.argmax(valid_BxP[:, ::-1], axis=-1)
  hidden_BxD = jnp.take_along_axis(hidden_BxPxD, last_B[:, None, None], axis=1)[:, 0]
  # [L, B, P, K, E] -> [L, B, K, P, E]
  return ({name: jnp.swapaxes(x, 2, 3) for name, x in cache.items()},
          models.logits_from_hidden(config, params, hidden_BxD))


@functools.partial(jax.jit, static_argnames=("config", "num_samples", "max_new_tokens",
                                             "cache_dtype", "mesh", "rules"))
def _prefill(config: ModelConfig, params: dict, prompts_BxP: jax.Array, mask_BxP: jax.Array, *,
             num_samples: int, max_new_tokens: int, cache_dtype, mesh,
             rules=sharding.DEFAULT_RULES):
  """Runs the prompts once -> (cache, last-token logits [B, V]).

  cache: {"prompt": [L, B, K, P, E] filled, "generated": [L, B, N, K, generated_slots(T), E]
  empty} (see `models.SplitCache`). `rules` (static) are the logical-axis rules active while
  tracing: the models' activation constraints read them from the caller's
  `sharding.activation_rules` context, so a change of rules must retrace.
  """
  TRACE_COUNTS["prefill"] += 1
  config = inference_config(config)
  prompt_cache, logits_BxV = prompt_prefill(config, params, prompts_BxP, mask_BxP, cache_dtype)
  b = prompts_BxP.shape[0]
  cache = {"prompt": prompt_cache, "generated": models.init_generated_cache(
      config, b, num_samples, generated_slots(max_new_tokens, mesh_platform(mesh)), cache_dtype)}
  if mesh is not None:
    cache = jax.tree.map(
        lambda c: jax.lax.with_sharding_constraint(c, cache_sharding(c.shape, mesh, rules)),
        cache)
  return cache, on_batch(logits_BxV, mesh)


@functools.partial(jax.jit, donate_argnames=("cache",), static_argnames=(
    "config", "num_samples", "max_new_tokens", "pad_id", "top_k", "greedy", "nucleus", "mesh",
    "rules"))
def _decode(config: ModelConfig, params: dict, cache: dict, logits_BxV: jax.Array,
            mask_BxP: jax.Array, active_B: jax.Array, eos_E: jax.Array, rng: jax.Array,
            temperature: jax.Array, top_p: jax.Array, *, num_samples: int, max_new_tokens: int,
            pad_id: int, top_k: int, greedy: bool, nucleus: bool, mesh,
            rules=sharding.DEFAULT_RULES):
  """The decode loop over B * N rows -> (tokens [R, T], logprobs [R, T], lengths [R], finished
  [R], bad_step [R]), R = B * N rows prompt-major, and the final cache. bad_step is the step at
  which a row met non-finite logits (the row stops there), -1 for rows that never did.

  The cache is returned only so that the donated input buffer is aliased to an output: the
  loop then updates it in place instead of copying it into the loop state.
  """
  TRACE_COUNTS["decode"] += 1
  del rules  # Static only, as in `_prefill`: read from the caller's context while tracing.
  config = inference_config(config)
  n, t = num_samples, max_new_tokens
  b = mask_BxP.shape[0]
  r = b * n
  select = functools.partial(token_select.select, temperature=temperature, top_p=top_p,
                             top_k=top_k, greedy=greedy, nucleus=nucleus)
  # One key per (prompt, sample) row, so a row's draws do not depend on the batch padding.
  row_keys_R = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(r))
  step_keys = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys_R)
  prompt_len_R = jnp.repeat(mask_BxP.astype(jnp.int32).sum(-1), n)
  prompt_positions_BxP = models.positions_from_mask(mask_BxP)
  prompt_valid_BxP = mask_BxP.astype(bool)
  eos_E = eos_E.astype(jnp.int32)

  def record(i, token_R, logprob_R, state):
    tokens_RxT, logprobs_RxT, lengths_R, done_R, bad_step_R = state
    # A token of -1 marks non-finite logits: the row stops here, its error reported on the host.
    bad_R = ~done_R & (token_R < 0)
    bad_step_R = jnp.where(bad_R, i, bad_step_R)
    done_R = done_R | bad_R
    token_R = jnp.where(done_R, pad_id, token_R)
    tokens_RxT = jax.lax.dynamic_update_slice(tokens_RxT, token_R[:, None], (0, i))
    logprobs_RxT = jax.lax.dynamic_update_slice(
        logprobs_RxT, jnp.where(done_R, 0.0, logprob_R)[:, None], (0, i))
    lengths_R = lengths_R + (~done_R).astype(jnp.int32)
    done_R = done_R | (token_R[:, None] == eos_E[None, :]).any(-1)
    return tokens_RxT, logprobs_RxT, lengths_R, done_R, bad_step_R

  first_R, first_lp_R = select(jnp.repeat(logits_BxV, n, axis=0), step_keys(0))
  out = (jnp.full((r, t), pad_id, jnp.int32), jnp.zeros((r, t), jnp.float32),
         jnp.zeros((r,), jnp.int32), ~jnp.repeat(active_B, n), jnp.full((r,), -1, jnp.int32))
  out = record(0, on_batch(first_R, mesh), first_lp_R, out)

  gen_layer = gen_layers(config, cache, mesh)

  def body(state):
    i, cache, prev_R, out = state
    # Token i - 1 goes in; its keys/values land in generated slot i - 1.
    split = models.SplitCache(cache["prompt"]["k"], cache["prompt"]["v"],
                              cache["generated"]["k"], cache["generated"]["v"],
                              prompt_positions_BxP, prompt_valid_BxP, i - 1, gen_layer)
    hidden_RxD, new_kv = models.sample_step(config, params, prev_R, prompt_len_R + i - 1, split)
    # [L, R, K, E] -> [L, B, N, K, 1, E]: written in the cache's own layout, in place.
    cache = dict(cache, generated=jax.tree.map(
        lambda c, kv: jax.lax.dynamic_update_slice(
            c, kv.reshape(c.shape[:4] + (1,) + c.shape[5:]), (0, 0, 0, 0, i - 1, 0)),
        cache["generated"], new_kv))
    logits_RxV = models.logits_from_hidden(config, params, hidden_RxD)
    token_R, logprob_R = select(logits_RxV, step_keys(i))
    return i + 1, cache, token_R, record(i, token_R, logprob_R, out)

  def cond(state):
    return (state[0] < t) & ~state[3][3].all()

  _, cache, _, (tokens_RxT, logprobs_RxT, lengths_R, done_R, bad_step_R) = jax.lax.while_loop(
      cond, body, (1, cache, out[0][:, 0], out))
  finished_R = done_R & jnp.repeat(active_B, n) & (bad_step_R < 0)
  return (tokens_RxT, logprobs_RxT, lengths_R, finished_R, bad_step_R), cache


# ---------------------------------------------------------------------------------------------
# Host side: validation, bucketing, placement


@functools.lru_cache(maxsize=16)
def _decode_shardings(config: ModelConfig, mesh, rules):
  return sharding.param_shardings(config, sharding.decode_mesh(mesh, config),
                                  sharding.decode_rules(rules))


def prepare_params(config: ModelConfig, params: dict, mesh=None,
                   rules=sharding.DEFAULT_RULES) -> dict:
  """`params` as the sampler reads them: cast to the compute dtype (`models.inference_params`)
  and, with a mesh, placed on `sharding.decode_mesh(mesh)` by `sharding.decode_rules(rules)`.

  Params it has already prepared come back unchanged, so `sample_batched` prepares once for all
  its chunks. The copy lives while the caller holds it (`sample` drops it on return)."""
  want = jax.eval_shape(functools.partial(models.inference_params, config), params)
  places = (jax.tree.map(lambda _: None, want) if mesh is None
            else _decode_shardings(config, mesh, rules))
  ready = lambda x, w, s: x.dtype == w.dtype and (s is None or getattr(x, "sharding", 0) == s)
  if all(jax.tree.leaves(jax.tree.map(ready, params, want, places))):
    return params
  TRACE_COUNTS["prepare"] += 1
  params = models.inference_params(config, params)
  return params if mesh is None else jax.device_put(params, places)


def raise_if_non_finite(caller: str, bad_step_R: np.ndarray, num_samples: int,
                        temperature: float) -> None:
  """One error naming the first (prompt, sample) row whose logits were not finite, if any.

  bad_step_R: per row (prompt-major, num_samples rows a prompt) the decode step at which its
  logits were NaN or inf, -1 for rows that never had any."""
  bad_R = bad_step_R >= 0
  if bad_R.any():
    row = int(np.argmax(bad_R))
    raise ValueError(
        f"{caller}: non-finite logits in prompt row {row // num_samples} (sample "
        f"{row % num_samples}) at step {int(bad_step_R[row])} ({int(bad_R.sum())} row(s) in "
        f"all): the model produced NaN or inf, or logits / temperature ({temperature}) "
        "overflowed float32")


def round_up_bucket(n: int, minimum: int = 1, multiple: int = 1) -> int:
  """The next power of two >= n (and >= minimum), rounded up to a multiple of `multiple`."""
  size = max(minimum, 1 << max(n - 1, 0).bit_length())
  return -(-size // multiple) * multiple


def _host_prompts(config: ModelConfig, prompts, prompt_mask, max_new_tokens: int):
  """Validated int32 prompts and mask, trimmed to the columns that hold real tokens."""
  tokens_BxP = np.asarray(prompts)
  mask_BxP = np.asarray(prompt_mask)
  if tokens_BxP.ndim != 2 or not np.issubdtype(tokens_BxP.dtype, np.integer):
    raise ValueError(f"sample: prompts must be an integer array [B, T], got shape "
                     f"{tokens_BxP.shape} dtype {tokens_BxP.dtype}")
  if mask_BxP.shape != tokens_BxP.shape:
    raise ValueError(f"sample: prompt_mask shape {mask_BxP.shape} != prompts shape "
                     f"{tokens_BxP.shape}")
  if tokens_BxP.shape[0] == 0:
    raise ValueError("sample: no prompts (batch size 0)")
  mask_BxP = mask_BxP.astype(bool)
  lengths_B = mask_BxP.sum(-1)
  if (lengths_B == 0).any():
    raise ValueError(f"sample: prompt row {int(np.argmin(lengths_B))} is empty (its mask is "
                     "all 0)")
  real = tokens_BxP[mask_BxP]
  if real.min() < 0 or real.max() >= config.vocab_size:
    raise ValueError(f"sample: prompt token ids must lie in [0, {config.vocab_size}), got "
                     f"{real.min()}..{real.max()}")
  longest = int(lengths_B.max())
  if longest + max_new_tokens > config.max_position_embeddings:
    raise ValueError(
        f"sample: prompt row {int(np.argmax(lengths_B))} has {longest} tokens; with "
        f"max_new_tokens={max_new_tokens} it needs {longest + max_new_tokens} positions but "
        f"the model has max_position_embeddings={config.max_position_embeddings}")
  # Left, right or mixed padding: keep only columns where some row has a real token.
  columns = np.flatnonzero(mask_BxP.any(0))
  keep = slice(columns[0], columns[-1] + 1)
  return tokens_BxP[:, keep].astype(np.int32), mask_BxP[:, keep]


def sample(config: ModelConfig, params: dict, prompts, prompt_mask, *, rng: jax.Array,
           num_samples: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0, eos_ids: Optional[Sequence[int]] = None, greedy: bool = False,
           cache_dtype=None, mesh=None, rules=sharding.DEFAULT_RULES) -> SampleOutput:
  """Draws `num_samples` responses per prompt; see the module docstring and `SampleOutput`.

  prompts: int [B, P] token ids, padded on either side; prompt_mask: [B, P], 1 on real tokens
  (host arrays: they are validated and bucketed on the host).
  rng: a PRNG key; the same key gives the same output.
  eos_ids: ids that end a response (default: config.eos_token_ids; () never stops early).
  greedy, or temperature 0: argmax decoding; other temperatures must be >=
    token_select.MIN_TEMPERATURE.
  top_k=0 / top_p=1 switch those filters off.
  Raises ValueError naming the prompt row, sample and step if the model's logits are not finite.
  cache_dtype: the KV cache dtype (default: the model's compute dtype).
  mesh: decode on its devices, through `sharding.decode_mesh` (params placed anywhere, e.g. by
    `hf.load(..., shardings=sharding.param_shardings_for(mesh))`, go through `prepare_params`).
  rules: the run's logical-axis rules (`sharding.rules_from_config(c.mesh.rules)`); decoding
    maps the weights and activations through `sharding.decode_rules(rules)`.

  Compiles once per (prompt-width bucket, batch bucket, num_samples, max_new_tokens, top_k,
  greedy, top_p < 1) combination; temperature and top_p values do not recompile.
  """
  if config.is_reward_model:
    raise ValueError("sample: config is a reward model (num_labels > 0); it has no LM head")
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
      or num_samples < 1:
    raise ValueError(f"sample: num_samples must be an int >= 1, got {num_samples!r}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise ValueError(f"sample: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  token_select.check_args(temperature, top_p, top_k)
  eos = tuple(int(i) for i in (config.eos_token_ids if eos_ids is None else eos_ids))
  if len(eos) > MAX_EOS or any(not 0 <= i < config.vocab_size for i in eos):
    raise ValueError(f"sample: eos_ids must be at most {MAX_EOS} ids in [0, "
                     f"{config.vocab_size}), got {eos}")
  tokens_BxP, mask_BxP = _host_prompts(config, prompts, prompt_mask, max_new_tokens)
  params = prepare_params(config, params, mesh, rules)
  if mesh is not None:
    mesh, rules = sharding.decode_mesh(mesh, config), sharding.decode_rules(rules)

  b, p = tokens_BxP.shape
  multiple = 1 if mesh is None else sharding.batch_multiple(mesh)
  bb, pb = round_up_bucket(b, 1, multiple), round_up_bucket(p, MIN_PROMPT_BUCKET)
  # Padding rows are one-token prompts marked inactive (done from the start).
  tokens = np.zeros((bb, pb), np.int32)
  mask = np.zeros((bb, pb), np.int32)
  tokens[:b, :p], mask[:b, :p], mask[b:, 0] = tokens_BxP, mask_BxP, 1
  active = np.arange(bb) < b
  eos_E = np.full((MAX_EOS,), -1, np.int32)
  eos_E[:len(eos)] = eos
  if mesh is not None:
    tokens, mask, active = sharding.shard_batch((tokens, mask, active), mesh)
  flags = token_select.static_flags(config.vocab_size, temperature, top_p, top_k, greedy)
  pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  ctx = (sharding.activation_rules(mesh, rules) if mesh is not None
         else contextlib.nullcontext())
  with ctx:
    cache, logits_BxV = _prefill(config, params, tokens, mask, num_samples=num_samples,
                                 max_new_tokens=max_new_tokens,
                                 cache_dtype=jnp.dtype(cache_dtype or config.dtype).name,
                                 mesh=mesh, rules=rules)
    out, _ = _decode(config, params, cache, logits_BxV, mask, active, eos_E, rng,
                  jnp.float32(temperature if temperature > 0 else 1.0), jnp.float32(top_p),
                  num_samples=num_samples, max_new_tokens=max_new_tokens, pad_id=pad_id,
                  mesh=mesh, rules=rules, **flags)
  tokens_RxT, logprobs_RxT, lengths_R, finished_R, bad_step_R = (x[:b * num_samples] for x in out)
  n, t = num_samples, max_new_tokens
  raise_if_non_finite("sample", sharding.to_host(bad_step_R), n, temperature)
  return SampleOutput(tokens=tokens_RxT.reshape(b, n, t), lengths=lengths_R.reshape(b, n),
                      logprobs=logprobs_RxT.reshape(b, n, t), finished=finished_R.reshape(b, n))


def sample_batched(config: ModelConfig, params: dict, prompt_ids: Sequence[Sequence[int]], *,
                   rng: jax.Array, batch_size: int, num_samples: int, max_new_tokens: int,
                   pad_id: int, on_chunk: Optional[Callable[[int], None]] = None,
                   **kwargs) -> SampleOutput:
  """`sample` over a list of token-id prompts in chunks of `batch_size`, gathered on the host.

  The one loop every text-level caller (the generate stage, the LM evolver, the judge) uses.
  Chunk starting at prompt `start` samples with `fold_in(rng, start)`. Returns a SampleOutput of
  NumPy arrays ([P, N, T] tokens, ...) in prompt order. Other keyword arguments go to `sample`;
  the params are prepared (`prepare_params`) once for every chunk.
  on_chunk(number of prompts) is called after each chunk (a progress bar's `update`).
  """
  if not len(prompt_ids):
    raise ValueError("sample_batched: no prompts")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"sample_batched: batch_size must be an int >= 1, got {batch_size!r}")
  params = prepare_params(config, params, kwargs.get("mesh"),
                          kwargs.get("rules", sharding.DEFAULT_RULES))
  parts = []
  for start in range(0, len(prompt_ids), batch_size):
    chunk = prompt_ids[start:start + batch_size]
    tokens_BxP = np.full((len(chunk), max(map(len, chunk))), pad_id, np.int32)
    mask_BxP = np.zeros_like(tokens_BxP)
    for row, seq in enumerate(chunk):
      tokens_BxP[row, :len(seq)], mask_BxP[row, :len(seq)] = seq, 1
    out = sample(config, params, tokens_BxP, mask_BxP, rng=jax.random.fold_in(rng, start),
                 num_samples=num_samples, max_new_tokens=max_new_tokens, **kwargs)
    parts.append(SampleOutput(*(sharding.to_host(x) for x in out)))
    if on_chunk is not None:
      on_chunk(len(chunk))
  return SampleOutput(*(np.concatenate(xs) for xs in zip(*parts)))


def sample_texts(config: ModelConfig, params: dict, tokenizer, prompts: Sequence[str], *,
                 rng: jax.Array, num_samples: int, max_new_tokens: int,
                 batch_size: Optional[int] = None, **kwargs) -> list[list[str]]:
  """Chat-templated text prompts -> `num_samples` decoded responses per prompt.

  tokenizer: anything with `apply_chat_template(text, add_generation_prompt=True) -> ids`,
  `decode(ids) -> str`, `eos_ids` and `pad_id` (e.g. `eva_jax.models.tokenizer.Tokenizer`).
  The stop token is not part of the returned text. Other keyword arguments go to `sample`
  (temperature, top_p, top_k, greedy, mesh, eos_ids, ...); batch_size defaults to all prompts.
  """
  if isinstance(prompts, str) or not len(prompts):
    raise ValueError("sample_texts: prompts must be a non-empty list of strings")
  ids = []
  for index, text in enumerate(prompts):
    if not isinstance(text, str) or not text:
      raise ValueError(f"sample_texts: prompt {index} is empty or not a string: {text!r}")
    ids.append(list(tokenizer.apply_chat_template(text, add_generation_prompt=True)))
  kwargs.setdefault("eos_ids", tokenizer.eos_ids)
  out = sample_batched(config, params, ids, rng=rng, batch_size=batch_size or len(ids),
                       num_samples=num_samples, max_new_tokens=max_new_tokens,
                       pad_id=tokenizer.pad_id, **kwargs)
  text_ends = out.lengths - out.finished  # Drop the eos token itself.
  return [[tokenizer.decode(out.tokens[b, n, :text_ends[b, n]]) for n in range(num_samples)]
          for b in range(len(ids))]
