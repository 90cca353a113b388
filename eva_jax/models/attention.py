"""The three ways a layer attends, one per kind of cache the Attention module is given.

  NoCache     training and `forward`: the T tokens attend among themselves (densely, or through
              the splash-attention kernels: `ModelConfig.attention_impl`).
  DenseCache  prefill (and any run against a cache): keys/values [B, S, K, E] per layer; the T
              new ones are written at `write_index`, then the T queries read every slot.
  SplitCache  the sampler's one-token decode step: N samples per prompt read one shared,
              unrepeated prompt cache and a cache of their own generated tokens.

Each kind is a NamedTuple whose layer fields (`layer_fields`) carry a leading layers axis (the
decoder scans them, one slice per layer) while the other fields are shared by every layer; its
`attend` takes the new queries/keys/values (RoPE applied) and returns the attention output
[B, T, H, E] and what the layer hands back to the caller (nothing, the re-written cache slice,
or the new token's keys/values).

Why the sampler's split layout is fast: a dense cache scanned over the layers is handed back
re-written, which inside a decode loop costs several full copies of the cache per token. The
split cache is only read; the step returns the new token's keys/values, which the loop writes
with one small dynamic_update_slice, in place. Slots sit next to head_dim ([.., K, slots, E]),
so the einsums read them without a transposed copy, and the query heads of a prompt's N samples
meet its keys in one einsum.

Masking is one rule on positions, not slot indices: a query at position p sees the valid slots
whose position is <= p, and on windowed layers only those with p - position < window. It covers
right- and left-padded batches and caches whose slots hold prompt padding.

Axis letters: B batch (prompts), T new tokens, S slots, P prompt slots, N samples per prompt,
R = B * N rows, K key/value heads, G query heads per key/value head, H = K * G, E head dim.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from eva_jax.kernels.logprob_chunked import apply_softcap
from eva_jax.models.config import ModelConfig
from eva_jax.models.grouped_attention import grouped_attention

Array = jax.Array
# Finite, so a row with no visible slot gives a uniform softmax rather than NaN.
NEG_INF = -0.7 * float(np.finfo(np.float32).max)
# On TPU the decode step walks the generated cache in blocks of this many slots and reads only
# the blocks that hold tokens (`walks_generated_blocks`).
GEN_BLOCK = 128
# The walk's named scope: the memory plan's cost count finds the loop by it (hlo_cost).
GEN_WALK_SCOPE = "generated_block_walk"


def mean_walked_blocks(max_new_tokens: int, gen_len: int) -> float:
  """The walk's mean trip count over a generation of `max_new_tokens`: decode step i (1 to
  max_new_tokens - 1) has written i - 1 slots and reads ceil((i - 1) / GEN_BLOCK) blocks."""
  written = np.minimum(np.arange(max(max_new_tokens - 1, 1)), gen_len)
  return float(np.mean(-(-written // GEN_BLOCK)))


def walks_generated_blocks(platform: str, gen_len: int) -> bool:
  """Whether a decode step compiled for `platform` over `gen_len` generated slots walks them
  block by block (`SplitCache.gen_layer`). On TPU, where the slots are a multiple of 128, step
  t of T' then reads ceil(t / 128) blocks of each layer's generated cache instead of all T'
  slots: about half the cache's bytes over a generation. Elsewhere one einsum reads every slot
  (no loop overhead; the CPU sampler's output stays bit for bit what it was)."""
  return platform == "tpu" and gen_len > GEN_BLOCK and gen_len % GEN_BLOCK == 0


def _query_scale(config: ModelConfig) -> float:
  return (config.query_pre_attn_scalar or config.head_dim) ** -0.5


def _dense_attention(config: ModelConfig, q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, positions_BxT,
                     kv_positions_BxS, kv_valid_BxS, window) -> Array:
  """Softmax attention of T queries over S slots -> [B, T, H, E]."""
  fn = _grouped_dense_attention if compile_platform() == "cpu" else _einsum_dense_attention
  return fn(config, q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, positions_BxT, kv_positions_BxS,
            kv_valid_BxS, window)


def _einsum_dense_attention(config: ModelConfig, q_BxTxHxE, k_BxSxKxE, v_BxSxKxE,
                            positions_BxT, kv_positions_BxS, kv_valid_BxS, window) -> Array:
  """`_dense_attention` as einsums over [B, K, G, T, S] scores, differentiated by autodiff."""
  h, k, e, dt = config.num_heads, config.num_kv_heads, config.head_dim, config.jnp_dtype
  b, t = q_BxTxHxE.shape[:2]
  q_BxTxKxGxE = (q_BxTxHxE * _query_scale(config)).reshape(b, t, k, h // k, e)
  logits_BxKxGxTxS = jnp.einsum("BTKGE,BSKE->BKGTS", q_BxTxKxGxE, k_BxSxKxE.astype(dt),
                                preferred_element_type=jnp.float32)
  logits_BxKxGxTxS = apply_softcap(logits_BxKxGxTxS, config.attn_logit_softcap)
  q_pos = positions_BxT[:, None, None, :, None]
  kv_pos = kv_positions_BxS[:, None, None, None, :]
  mask = kv_valid_BxS[:, None, None, None, :] & (kv_pos <= q_pos)
  mask &= (window <= 0) | (q_pos - kv_pos < window)
  logits_BxKxGxTxS = jnp.where(mask, logits_BxKxGxTxS, NEG_INF)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(dt)
  out_BxTxKxGxE = jnp.einsum("BKGTS,BSKE->BTKGE", probs, v_BxSxKxE.astype(dt))
  return out_BxTxKxGxE.reshape(b, t, h, e)


def _grouped_dense_attention(config: ModelConfig, q_BxTxHxE, k_BxSxKxE, v_BxSxKxE,
                             positions_BxT, kv_positions_BxS, kv_valid_BxS, window) -> Array:
  """`_einsum_dense_attention` through `grouped_attention` (differentiated: the grouped
  layout and a hand-written backward; otherwise the einsums): on CPU a training step's
  attention is ~1.6x faster than autodiff of the einsums (W2). Accelerators keep the einsums,
  which the TPU memory plan compiled."""
  h, k, e, dt = config.num_heads, config.num_kv_heads, config.head_dim, config.jnp_dtype
  b, t = q_BxTxHxE.shape[:2]
  q_BxTxKxGxE = (q_BxTxHxE * _query_scale(config)).astype(dt).reshape(b, t, k, h // k, e)
  q_pos = positions_BxT[:, None, None, :, None]
  kv_pos = kv_positions_BxS[:, None, None, None, :]
  mask = kv_valid_BxS[:, None, None, None, :] & (kv_pos <= q_pos)
  mask &= (window <= 0) | (q_pos - kv_pos < window)
  out_BxTxKxGxE = grouped_attention(q_BxTxKxGxE, k_BxSxKxE.astype(dt), v_BxSxKxE.astype(dt),
                                    mask, config.attn_logit_softcap, NEG_INF)
  return out_BxTxKxGxE.reshape(b, t, h, e)


# The kernels tile T in blocks of a multiple of 128 (the TPU lane width).
_SPLASH_LANES = 128


def compile_platform() -> str:
  """The platform the program being traced is compiled for.

  The mesh in context (`jax.set_mesh`, which `sharding.activation_rules` sets) names it even
  when no such device is attached: the memory plan compiles TPU programs ahead of time from a
  CPU process, where `jax.default_backend()` says "cpu". Without a mesh the program runs on the
  default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def uses_splash(config: ModelConfig, seq_len: int) -> bool:
  """Whether T = seq_len tokens attend among themselves through `splash_attention`."""
  if config.attention_impl == "auto":
    return compile_platform() == "tpu" and seq_len % _SPLASH_LANES == 0
  return config.attention_impl == "splash"


def _mesh_axes(mesh, logical: str, *dims: int):
  """The mesh axes the activation rules give `logical`, if they divide every one of `dims`
  (else None: that dimension is replicated, as `sharding.logical_to_sharding` does)."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
  flat = tuple(a for a in flat if a in mesh.shape)
  size = math.prod(mesh.shape[a] for a in flat)
  if not flat or any(d % size for d in dims):
    return None
  return flat


def splash_attention(config: ModelConfig, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, valid_BxT,
                     block: Optional[int] = None) -> Array:
  """Causal self-attention of T tokens through the splash-attention kernels -> [B, T, H, E].

  Never forms the [B, K, G, T, T] scores, forward or backward (the kernels' own VJP
  recomputes them tile by tile). Padding goes in as segment ids: a real token attends to the
  real tokens at or before it, which is the dense rule (`_dense_attention`: valid slots at
  positions <= the query's) since `positions_from_mask` numbers real tokens in order. Padding
  tokens attend to the padding before them, not to real tokens as in the dense path: their
  rows differ, and no caller reads them. T is padded up to a multiple of 128 with padding.
  Under a mesh the kernels run per shard: rows over the batch axes, heads over the tensor axes
  when they divide both H and K (query head h reads key/value head h // G, as in the dense
  path). block: the kernels' tile (default the largest of 512, 256, 128 dividing T).
  """
  b, t, h, e = q_BxTxHxE.shape
  dt = config.jnp_dtype
  t_pad = -(-t // _SPLASH_LANES) * _SPLASH_LANES
  block = block or next(s for s in (512, 256, _SPLASH_LANES) if t_pad % s == 0)
  interpret = compile_platform() != "tpu"

  def attend_shard(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segments_BxT):
    heads = q_BxTxHxE.shape[2]
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([splash.CausalMask((t_pad, t_pad))] * heads), block_sizes=sizes,
        head_shards=1, q_seq_shards=1, attn_logits_soft_cap=config.attn_logit_softcap,
        interpret=interpret)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, N, E] <-> [B, N, T, E]
    out_BxHxTxE = jax.vmap(kernel)(heads_major(q_BxTxHxE), heads_major(k_BxTxKxE),
                                   heads_major(v_BxTxKxE),
                                   splash.SegmentIds(segments_BxT, segments_BxT))
    return heads_major(out_BxHxTxE)

  pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
  args = (jnp.pad((q_BxTxHxE * _query_scale(config)).astype(dt), pad),
          jnp.pad(k_BxTxKxE.astype(dt), pad), jnp.pad(v_BxTxKxE.astype(dt), pad),
          jnp.pad(valid_BxT.astype(jnp.int32), pad[:2]))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    rows = _mesh_axes(mesh, "act_batch", b)
    heads = _mesh_axes(mesh, "act_heads", h, config.num_kv_heads)
    spec = P(rows, None, heads, None)
    # check_vma off: Pallas kernels carry no varying-mesh-axes types (as jax's own shard_mapped
    # Pallas ops do).
    attend_shard = jax.shard_map(attend_shard, mesh=mesh, in_specs=(spec, spec, spec, P(rows)),
                                 out_specs=spec, check_vma=False)
  return attend_shard(*args)[:, :t].astype(dt)


class NoCache(NamedTuple):
  """The T tokens attend among themselves; kv_valid_BxT is 1 on real tokens.

  Through `splash_attention` where `uses_splash` says so. A layer whose window is shorter than
  T attends densely (lax.cond on the scanned window): the kernels' local mask counts slots,
  which equals positions only when a row's real tokens are contiguous, and callers may pad
  anywhere. Windows >= T (Gemma 2 and Mistral at <= 4096 tokens) are plain causal."""
  kv_valid_BxT: Array
  LAYER_FIELDS = ()

  def attend(self, config, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT, window):
    def dense():
      return _dense_attention(config, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT,
                              positions_BxT, self.kv_valid_BxT, window)

    def causal_splash():
      return splash_attention(config, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, self.kv_valid_BxT)

    t = q_BxTxHxE.shape[1]
    if not uses_splash(config, t):
      return dense(), {}
    if all(w <= 0 or w >= t for w in config.layer_windows):
      return causal_splash(), {}
    return jax.lax.cond((window > 0) & (window < t), dense, causal_splash), {}


class DenseCache(NamedTuple):
  """k, v: [L, B, S, K, E]; the T new keys/values go to slots [write_index, write_index + T).

  The caller keeps, per slot, its position and whether it holds a real token, already updated
  for the new slots."""
  k: Optional[Array]
  v: Optional[Array]
  write_index: Any
  kv_positions_BxS: Array
  kv_valid_BxS: Array
  LAYER_FIELDS = ("k", "v")

  def attend(self, config, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT, window):
    start = (0, self.write_index, 0, 0)
    k_BxSxKxE = jax.lax.dynamic_update_slice(self.k, k_BxTxKxE.astype(self.k.dtype), start)
    v_BxSxKxE = jax.lax.dynamic_update_slice(self.v, v_BxTxKxE.astype(self.v.dtype), start)
    out = _dense_attention(config, q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, positions_BxT,
                           self.kv_positions_BxS, self.kv_valid_BxS, window)
    return out, {"k": k_BxSxKxE, "v": v_BxSxKxE}


class SplitCache(NamedTuple):
  """One new token per row (T = 1, R = B * N rows, prompt-major: row b * N + n).

  prompt_k, prompt_v: [L, B, K, P, E], only read; prompt_positions_BxP / prompt_valid_BxP: per
  prompt slot, its position and whether it holds a real token. gen_k, gen_v: [L, B, N, K, T', E]
  (row b * N + n at [b, n]), generated slot j = the row's j-th generated token, slots
  [0, num_written) written; num_written is one count for every row, or one per row [R] (the
  continuous sampler's slots). The generated cache is stored split by prompt so that a layer's
  slice goes straight into the einsums: a reshape between the two would copy it every step.
  """
  prompt_k: Optional[Array]
  prompt_v: Optional[Array]
  gen_k: Optional[Array]
  gen_v: Optional[Array]
  prompt_positions_BxP: Array
  prompt_valid_BxP: Array
  num_written: Any
  # None: gen_k/gen_v are scanned with the layers and read whole. The layer indices [L] (set by
  # the sampler where `walks_generated_blocks`): gen_k/gen_v stay whole [L, ...] arrays that
  # each layer reads block by block at its own index, so a block nobody has written is never
  # loaded (a scanned slice would be loaded whole before any loop could skip part of it).
  gen_layer: Any = None
  LAYER_FIELDS = ("prompt_k", "prompt_v", "gen_k", "gen_v")

  def layer_fields(self) -> tuple:
    if self.gen_layer is None:
      return self.LAYER_FIELDS
    return ("prompt_k", "prompt_v", "gen_layer")

  def attend(self, config, q_Rx1xHxE, k_Rx1xKxE, v_Rx1xKxE, positions_Rx1, window):
    """-> (output [R, 1, H, E], the new token's {"k", "v"} [R, K, E] in the cache dtype)."""
    h, k, e, dt = config.num_heads, config.num_kv_heads, config.head_dim, config.jnp_dtype
    b = self.prompt_positions_BxP.shape[0]
    q_RxHxE, positions_R = q_Rx1xHxE[:, 0], positions_Rx1[:, 0]
    r = q_RxHxE.shape[0]
    n, g = r // b, h // k
    k_new = k_Rx1xKxE[:, 0].astype(self.gen_k.dtype)
    v_new = v_Rx1xKxE[:, 0].astype(self.gen_v.dtype)

    q_BxNxKxGxE = (q_RxHxE * _query_scale(config)).reshape(b, n, k, g, e)
    f32, cap = jnp.float32, config.attn_logit_softcap
    s_prompt = apply_softcap(jnp.einsum("BNKGE,BKPE->BNKGP", q_BxNxKxGxE,
                                        self.prompt_k.astype(dt), preferred_element_type=f32), cap)
    s_self = apply_softcap(jnp.einsum("BNKGE,BNKE->BNKG", q_BxNxKxGxE,
                                      k_new.astype(dt).reshape(b, n, k, e),
                                      preferred_element_type=f32), cap)
    # Prompt slots are all earlier than the query.
    q_pos_BxN = positions_R.reshape(b, n)
    in_window_BxNxP = (window <= 0) | (q_pos_BxN[:, :, None] - self.prompt_positions_BxP[:, None]
                                       < window)
    prompt_ok = (self.prompt_valid_BxP[:, None] & in_window_BxNxP)[:, :, None, None, :]
    s_prompt = jnp.where(prompt_ok, s_prompt, NEG_INF)
    v_self_BxNxKx1xE = v_new.astype(dt).reshape(b, n, k, 1, e)
    if self.gen_layer is not None:
      out_BxNxKxGxE = self._attend_gen_blocks(config, q_BxNxKxGxE, s_prompt, s_self,
                                              v_self_BxNxKx1xE, window, r)
      return out_BxNxKxGxE.reshape(r, 1, h, e), {"k": k_new, "v": v_new}

    gen_len = self.gen_k.shape[3]
    s_gen = apply_softcap(jnp.einsum("BNKGE,BNKTE->BNKGT", q_BxNxKxGxE, self.gen_k.astype(dt),
                                     preferred_element_type=f32), cap)
    s_gen = jnp.where(self._gen_visible(0, gen_len, window, r, b, n), s_gen, NEG_INF)
    # One softmax over the three parts (the token itself is always visible).
    m = jnp.maximum(jnp.maximum(s_prompt.max(-1), s_gen.max(-1)), s_self)
    w_prompt, w_gen = jnp.exp(s_prompt - m[..., None]), jnp.exp(s_gen - m[..., None])
    w_self = jnp.exp(s_self - m)
    denom = w_prompt.sum(-1) + w_gen.sum(-1) + w_self
    out_BxNxKxGxE = (
        jnp.einsum("BNKGP,BKPE->BNKGE", (w_prompt / denom[..., None]).astype(dt),
                   self.prompt_v.astype(dt))
        + jnp.einsum("BNKGT,BNKTE->BNKGE", (w_gen / denom[..., None]).astype(dt),
                     self.gen_v.astype(dt))
        + (w_self / denom).astype(dt)[..., None] * v_self_BxNxKx1xE)
    return out_BxNxKxGxE.reshape(r, 1, h, e), {"k": k_new, "v": v_new}

  def _gen_visible(self, start, width, window, r, b, n):
    """[B, N, 1, 1, width]: generated slot j (from `start`) sits num_written - j tokens before
    the query and holds a token once j < num_written."""
    back = jnp.asarray(self.num_written)[..., None] - (start + jnp.arange(width))
    ok = (back > 0) & ((window <= 0) | (back < window))
    return jnp.broadcast_to(ok, (r, width)).reshape(b, n, 1, 1, width)

  def _attend_gen_blocks(self, config, q_BxNxKxGxE, s_prompt, s_self, v_self_BxNxKx1xE, window,
                         r):
    """The softmax over prompt, generated and own slots with the generated cache read one
    GEN_BLOCK of slots at a time (an online softmax), only up to the last written block."""
    dt, f32, cap = config.jnp_dtype, jnp.float32, config.attn_logit_softcap
    b, n, k, _, e = q_BxNxKxGxE.shape
    # The prompt and the token itself start the running max, sum and output: the token is
    # always visible, so the max is finite and a block with no visible slot changes nothing.
    m = jnp.maximum(s_prompt.max(-1), s_self)
    w_prompt, w_self = jnp.exp(s_prompt - m[..., None]), jnp.exp(s_self - m)
    total = w_prompt.sum(-1) + w_self
    acc = (jnp.einsum("BNKGP,BKPE->BNKGE", w_prompt.astype(dt), self.prompt_v.astype(dt),
                      preferred_element_type=f32)
           + w_self[..., None] * v_self_BxNxKx1xE.astype(f32))

    def block(j, carry):
      m, total, acc = carry
      start = j * GEN_BLOCK
      corner = (self.gen_layer, 0, 0, 0, start, 0)
      size = (1, b, n, k, GEN_BLOCK, e)
      k_blk = jax.lax.dynamic_slice(self.gen_k, corner, size)[0].astype(dt)
      v_blk = jax.lax.dynamic_slice(self.gen_v, corner, size)[0].astype(dt)
      s_blk = apply_softcap(jnp.einsum("BNKGE,BNKTE->BNKGT", q_BxNxKxGxE, k_blk,
                                       preferred_element_type=f32), cap)
      s_blk = jnp.where(self._gen_visible(start, GEN_BLOCK, window, r, b, n), s_blk, NEG_INF)
      m_new = jnp.maximum(m, s_blk.max(-1))
      w_blk, rescale = jnp.exp(s_blk - m_new[..., None]), jnp.exp(m - m_new)
      acc = acc * rescale[..., None] + jnp.einsum("BNKGT,BNKTE->BNKGE", w_blk.astype(dt), v_blk,
                                                  preferred_element_type=f32)
      return m_new, total * rescale + w_blk.sum(-1), acc

    num_blocks = jnp.minimum((jnp.max(jnp.asarray(self.num_written)) + GEN_BLOCK - 1) // GEN_BLOCK,
                             self.gen_k.shape[4] // GEN_BLOCK)
    with jax.named_scope(GEN_WALK_SCOPE):
      _, total, acc = jax.lax.fori_loop(0, num_blocks, block, (m, total, acc))
    return (acc / total[..., None]).astype(dt)


def split_layers(cache):
  """(the per-layer fields {name: [L, ...]}, the cache with those fields set to None)."""
  names = cache.layer_fields() if hasattr(cache, "layer_fields") else cache.LAYER_FIELDS
  per_layer = {name: getattr(cache, name) for name in names}
  return per_layer, cache._replace(**{name: None for name in names})
