"""One Flax Linen decoder for every family; family differences are ModelConfig feature fields.

Axis letters in names: B batch, T new tokens, S key/value slots (the cache, or T without one),
D hidden, H query heads, K key/value heads, E head dim, F MLP hidden, V vocab, L layers.

The layers are one `nn.scan` over a block, so parameters carry a leading `layers` axis and a
model of any depth compiles once (on CPU the loop is unrolled by CPU_SCAN_UNROLL layers). One
block serves training, prefill and the sampler's decode step: the Attention module computes
queries/keys/values and RoPE, then attends through the kind of cache it was given
(`eva_jax.models.attention`: NoCache, DenseCache, SplitCache). The module returns the final
hidden states; the heads (LM logits, reward score) are pure functions over the parameters in
`eva_jax.models`, so training can feed hidden states straight into the fused log-prob kernel
without ever forming [B, T, V].
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eva_jax.kernels.vocab_parallel_embed import vocab_parallel_embed
from eva_jax.models.attention import compile_platform, split_layers
from eva_jax.models.config import ModelConfig

Array = jax.Array
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# On CPU the layer scan is unrolled by this many layers: XLA:CPU otherwise slices every layer's
# weights and saved activations in and out of the stacked [L, ...] buffers with copies (~12 % of
# the CPU time of an 8-layer MLP stack's forward and backward at W2 sizes); accelerators keep the
# rolled loop, and deeper models compile at most this many layers per loop iteration.
CPU_SCAN_UNROLL = 8


def _param(module: nn.Module, name: str, init, shape, names, dtype):
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _constrain(x: Array, names: tuple) -> Array:
  return nn.with_logical_constraint(x, names)


def _flat_axes(axes) -> tuple:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def vocab_split(vocab_size: int, vocab_name: str = "act_vocab", rows: int | None = None):
  """(vocabulary axes, row axes) of the mesh and logical rules in effect when `vocab_name`
  splits a vocabulary of `vocab_size` over more than one device (rows along `act_batch`); None
  without such a split, or when `rows` is given and does not divide over the row axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  rules = dict(nn.get_logical_axis_rules())
  axes, row_axes = _flat_axes(rules.get(vocab_name)), _flat_axes(rules.get("act_batch"))
  shards = math.prod(mesh.shape[a] for a in axes)
  if shards == 1 or vocab_size % shards:
    return None
  if rows is not None and rows % math.prod(mesh.shape[a] for a in row_axes):
    return None
  return axes, row_axes


@jax.custom_vjp
def _cpu_matmul(x_NxI: Array, w_IxO: Array) -> Array:
  return x_NxI @ w_IxO


def _cpu_matmul_fwd(x_NxI, w_IxO):
  return x_NxI @ w_IxO, (x_NxI, w_IxO)


def _cpu_matmul_bwd(residuals, g_NxO):
  # Autodiff's weight gradient contracts both operands over N, and XLA:CPU then transposes the
  # larger [N, O] cotangent inside the elementwise fusion that produces it (strided reads of
  # every input). Transposing the operands here, behind barriers that keep XLA from folding the
  # transposes back into the dots, leaves two plain [M, K] x [K, N] matmuls.
  x_NxI, w_IxO = residuals
  w_OxI = jax.lax.optimization_barrier(w_IxO.T)
  x_IxN = jax.lax.optimization_barrier(x_NxI.T)
  return (g_NxO @ w_OxI).astype(x_NxI.dtype), (x_IxN @ g_NxO).astype(w_IxO.dtype)


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def _dense(x: Array, w: Array, in_dims: int) -> Array:
  """Contracts the last `in_dims` axes of x with the first `in_dims` axes of w (a plain
  einsum); on CPU as one 2D matmul with a layout-friendly gradient (_cpu_matmul_bwd: ~20 %
  less CPU time for the MLP's forward and backward at W2 sizes; same values up to rounding)."""
  lead, contracted, out = x.shape[:-in_dims], w.shape[:in_dims], w.shape[in_dims:]
  if compile_platform() != "cpu":
    return jnp.tensordot(x, w, axes=in_dims)
  size = lambda dims: int(np.prod(dims, dtype=np.int64))  # noqa: E731
  y = _cpu_matmul(x.reshape(size(lead), size(contracted)), w.reshape(size(contracted), size(out)))
  return y.reshape(*lead, *out)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [E/2], with Llama 3.1's scaling when configured."""
  e = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, e, 2, dtype=np.float32) / e))
  inv_freq = inv_freq.astype(np.float32)
  if config.rope_llama3_scaling is not None:
    factor, low, high, original = config.rope_llama3_scaling
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, blended, scaled).astype(np.float32)
  return inv_freq


def apply_rope(x_BxTxNxE: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
  """Rotary embedding in the half-split layout that HF checkpoints use."""
  angles_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  cos = jnp.cos(angles_BxTxE2)[:, :, None, :]
  sin = jnp.sin(angles_BxTxE2)[:, :, None, :]
  x = x_BxTxNxE.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxE.dtype)


class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    plus_one = cfg.norm_scale_plus_one
    init = nn.initializers.zeros if plus_one else nn.initializers.ones
    scale = _param(self, "scale", init, (cfg.hidden_size,), ("norm",), cfg.jnp_param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    w = scale.astype(jnp.float32)
    return (y * (1.0 + w) if plus_one else y * w).astype(cfg.jnp_dtype)


class Attention(nn.Module):
  """Self-attention through `cache` (a kind from eva_jax.models.attention, this layer's slice);
  returns (output [B, T, D], what the cache kind hands back for this layer)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, window, cache):
    cfg = self.config
    d, h, k, e = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt, pdt = cfg.jnp_dtype, cfg.jnp_param_dtype
    init = nn.initializers.normal(0.02)
    wq = _param(self, "q", init, (d, h, e), ("embed", "heads", "head_dim"), pdt)
    wk = _param(self, "k", init, (d, k, e), ("embed", "kv_heads", "head_dim"), pdt)
    wv = _param(self, "v", init, (d, k, e), ("embed", "kv_heads", "head_dim"), pdt)
    wo = _param(self, "o", init, (h, e, d), ("heads", "head_dim", "embed"), pdt)
    x = x_BxTxD.astype(dt)
    q_BxTxHxE = _dense(x, wq.astype(dt), 1)    # BTD,DHE->BTHE
    k_BxTxKxE = _dense(x, wk.astype(dt), 1)    # BTD,DKE->BTKE
    v_BxTxKxE = _dense(x, wv.astype(dt), 1)
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxTxHxE += _param(self, "q_bias", zeros, (h, e), ("heads", "head_dim"), pdt).astype(dt)
      k_BxTxKxE += _param(self, "k_bias", zeros, (k, e), ("kv_heads", "head_dim"), pdt).astype(dt)
      v_BxTxKxE += _param(self, "v_bias", zeros, (k, e), ("kv_heads", "head_dim"), pdt).astype(dt)
    q_BxTxHxE = _constrain(q_BxTxHxE, ("act_batch", "act_len", "act_heads", None))

    inv_freq = rope_inv_freq(cfg)
    q_BxTxHxE = apply_rope(q_BxTxHxE, positions_BxT, inv_freq)
    k_BxTxKxE = apply_rope(k_BxTxKxE, positions_BxT, inv_freq)
    out_BxTxHxE, layer_out = cache.attend(cfg, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT,
                                          window)
    out_BxTxD = _dense(out_BxTxHxE, wo.astype(dt), 2)    # BTHE,HED->BTD
    return _constrain(out_BxTxD, ("act_batch", "act_len", "act_embed")), layer_out


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    d, f, dt, pdt = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_dtype, cfg.jnp_param_dtype
    init = nn.initializers.normal(0.02)
    w_gate = _param(self, "gate", init, (d, f), ("embed", "mlp"), pdt)
    w_up = _param(self, "up", init, (d, f), ("embed", "mlp"), pdt)
    w_down = _param(self, "down", init, (f, d), ("mlp", "embed"), pdt)
    gate_BxTxF = _dense(x_BxTxD, w_gate.astype(dt), 1)    # BTD,DF->BTF
    up_BxTxF = _dense(x_BxTxD, w_up.astype(dt), 1)
    act = _ACTIVATIONS[cfg.mlp_activation](gate_BxTxF)
    hidden_BxTxF = _constrain(act * up_BxTxF, ("act_batch", "act_len", "act_mlp"))
    return _dense(hidden_BxTxF, w_down.astype(dt), 1)    # BTF,FD->BTD


class Block(nn.Module):
  """One decoder layer; called by nn.scan with this layer's window and cache slice."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, layer_in: dict, positions_BxT, shared_cache):
    cfg = self.config
    cache = shared_cache._replace(**layer_in["cache"])
    attn_out, layer_out = Attention(cfg, name="attn")(
        RMSNorm(cfg, name="input_norm")(x_BxTxD), positions_BxT, layer_in["window"], cache)
    if cfg.post_norms:
      attn_out = RMSNorm(cfg, name="post_attn_norm")(attn_out)
    x_BxTxD = x_BxTxD + attn_out
    mlp_out = MLP(cfg, name="mlp")(RMSNorm(cfg, name="pre_mlp_norm")(x_BxTxD))
    if cfg.post_norms:
      mlp_out = RMSNorm(cfg, name="post_mlp_norm")(mlp_out)
    x_BxTxD = _constrain(x_BxTxD + mlp_out, ("act_batch", "act_len", "act_embed"))
    return x_BxTxD, layer_out


class Decoder(nn.Module):
  """Embedding, scanned blocks and final norm.

  Returns (hidden states [B, T, D], what the cache kind hands back, stacked over layers). It also
  owns the head parameters (`lm_head` when untied, `score` for reward models) so that one init
  creates every weight; the heads are applied by the functions in `eva_jax.models`.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, cache):
    cfg = self.config
    d, pdt, dt = cfg.hidden_size, cfg.jnp_param_dtype, cfg.jnp_dtype
    embedding = _param(self, "embedding", nn.initializers.normal(0.02), (cfg.vocab_size, d),
                       ("vocab", "embed"), pdt)
    split = vocab_split(cfg.vocab_size, "vocab", rows=tokens_BxT.shape[0])
    if split is None:
      x_BxTxD = jnp.take(embedding, tokens_BxT, axis=0).astype(dt)
    else:
      # Each device reads its own vocabulary slice: left to XLA, the lookup on a large mesh
      # gathers the whole table and its gradient is a whole float32 table on every chip.
      x_BxTxD = vocab_parallel_embed(embedding, tokens_BxT, axes=split[0], row_axes=split[1],
                                     out_dtype=dt)
    if cfg.embed_scale:
      # sqrt(d) rounded to the compute dtype, as Gemma's reference code does.
      x_BxTxD = x_BxTxD * jnp.asarray(d ** 0.5, dtype=dt)
    x_BxTxD = _constrain(x_BxTxD, ("act_batch", "act_len", "act_embed"))

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
    layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
        unroll=min(cfg.num_layers, CPU_SCAN_UNROLL) if compile_platform() == "cpu" else 1)
    per_layer, shared_cache = split_layers(cache)
    layer_in = {"window": jnp.asarray(cfg.layer_windows, dtype=jnp.int32), "cache": per_layer}
    x_BxTxD, layer_out = layers(cfg, name="layers")(x_BxTxD, layer_in, positions_BxT,
                                                    shared_cache)
    hidden_BxTxD = RMSNorm(cfg, name="final_norm")(x_BxTxD)

    if cfg.is_reward_model:
      _param(self, "score", nn.initializers.normal(0.02), (d, cfg.num_labels), ("embed", None),
             pdt)
    elif not cfg.tie_embeddings:
      _param(self, "lm_head", nn.initializers.normal(0.02), (d, cfg.vocab_size),
             ("embed_head", "vocab"), pdt)
    return hidden_BxTxD, layer_out
