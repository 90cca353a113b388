"""One Flax Linen decoder for the Llama 3, Gemma 2 and Qwen 2.5 families.

Axis letters in names: B batch, T new tokens, S key/value slots (the cache, or T without one),
D hidden, H query heads, K key/value heads, G query heads per key/value head, E head dim,
F MLP hidden, V vocab, L layers.

The layers are one `nn.scan` over a block, so parameters carry a leading `layers` axis and a
model of any depth compiles once. The module returns the final hidden states; the heads (LM
logits, reward score) are pure functions over the parameters in `eva_jax.models`, so training can
feed hidden states straight into the fused log-prob kernel without ever forming [B, T, V].

Masking works on positions, not slot indices: a query at position p sees the valid slots whose
position is <= p (and > p - window on sliding layers). That one rule covers right-padded batches,
left-padded batches and a KV cache whose slots hold prompt padding.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eva_jax.models.config import ModelConfig

Array = jax.Array
_NEG_INF = -0.7 * float(np.finfo(np.float32).max)

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(module: nn.Module, name: str, init, shape, names, dtype):
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _constrain(x: Array, names: tuple) -> Array:
  return nn.with_logical_constraint(x, names)


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
    # Gemma stores w and scales by (1 + w); the others store the scale itself.
    init = nn.initializers.zeros if cfg.is_gemma else nn.initializers.ones
    scale = _param(self, "scale", init, (cfg.hidden_size,), ("norm",), cfg.jnp_param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    w = scale.astype(jnp.float32)
    return (y * (1.0 + w) if cfg.is_gemma else y * w).astype(cfg.jnp_dtype)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, kv_positions_BxS, kv_valid_BxS, window,
               cache: Optional[dict], write_index):
    cfg = self.config
    d, h, k, e = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt, pdt = cfg.jnp_dtype, cfg.jnp_param_dtype
    init = nn.initializers.normal(0.02)
    wq = _param(self, "q", init, (d, h, e), ("embed", "heads", "head_dim"), pdt)
    wk = _param(self, "k", init, (d, k, e), ("embed", "kv_heads", "head_dim"), pdt)
    wv = _param(self, "v", init, (d, k, e), ("embed", "kv_heads", "head_dim"), pdt)
    wo = _param(self, "o", init, (h, e, d), ("heads", "head_dim", "embed"), pdt)
    x = x_BxTxD.astype(dt)
    q_BxTxHxE = jnp.einsum("BTD,DHE->BTHE", x, wq.astype(dt))
    k_BxTxKxE = jnp.einsum("BTD,DKE->BTKE", x, wk.astype(dt))
    v_BxTxKxE = jnp.einsum("BTD,DKE->BTKE", x, wv.astype(dt))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxTxHxE += _param(self, "q_bias", zeros, (h, e), ("heads", "head_dim"), pdt).astype(dt)
      k_BxTxKxE += _param(self, "k_bias", zeros, (k, e), ("kv_heads", "head_dim"), pdt).astype(dt)
      v_BxTxKxE += _param(self, "v_bias", zeros, (k, e), ("kv_heads", "head_dim"), pdt).astype(dt)
    q_BxTxHxE = _constrain(q_BxTxHxE, ("act_batch", "act_len", "act_heads", None))

    inv_freq = rope_inv_freq(cfg)
    q_BxTxHxE = apply_rope(q_BxTxHxE, positions_BxT, inv_freq)
    k_BxTxKxE = apply_rope(k_BxTxKxE, positions_BxT, inv_freq)

    new_cache = None
    if cache is not None:
      # Write the new keys/values into their slots; the caller owns slot positions/validity.
      start = (0, write_index, 0, 0)
      k_BxSxKxE = jax.lax.dynamic_update_slice(cache["k"], k_BxTxKxE.astype(cache["k"].dtype),
                                               start)
      v_BxSxKxE = jax.lax.dynamic_update_slice(cache["v"], v_BxTxKxE.astype(cache["v"].dtype),
                                               start)
      new_cache = {"k": k_BxSxKxE, "v": v_BxSxKxE}
    else:
      k_BxSxKxE, v_BxSxKxE = k_BxTxKxE, v_BxTxKxE

    scale = (cfg.query_pre_attn_scalar or e) ** -0.5
    b, t = q_BxTxHxE.shape[:2]
    q_BxTxKxGxE = (q_BxTxHxE * scale).reshape(b, t, k, h // k, e)
    logits_BxKxGxTxS = jnp.einsum("BTKGE,BSKE->BKGTS", q_BxTxKxGxE, k_BxSxKxE.astype(dt),
                                  preferred_element_type=jnp.float32)
    if cfg.attn_logit_softcap is not None:
      cap = cfg.attn_logit_softcap
      logits_BxKxGxTxS = cap * jnp.tanh(logits_BxKxGxTxS / cap)
    q_pos = positions_BxT[:, None, None, :, None]
    kv_pos = kv_positions_BxS[:, None, None, None, :]
    mask = kv_valid_BxS[:, None, None, None, :] & (kv_pos <= q_pos)
    mask &= (window <= 0) | (q_pos - kv_pos < window)
    logits_BxKxGxTxS = jnp.where(mask, logits_BxKxGxTxS, _NEG_INF)
    probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(dt)
    out_BxTxKxGxE = jnp.einsum("BKGTS,BSKE->BTKGE", probs, v_BxSxKxE.astype(dt))
    out_BxTxHxE = out_BxTxKxGxE.reshape(b, t, h, e)
    out_BxTxD = jnp.einsum("BTHE,HED->BTD", out_BxTxHxE, wo.astype(dt))
    return _constrain(out_BxTxD, ("act_batch", "act_len", "act_embed")), new_cache


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
    gate_BxTxF = jnp.einsum("BTD,DF->BTF", x_BxTxD, w_gate.astype(dt))
    up_BxTxF = jnp.einsum("BTD,DF->BTF", x_BxTxD, w_up.astype(dt))
    # Gemma 2 is GeGLU with the tanh GELU; Llama and Qwen are SwiGLU.
    act = jax.nn.gelu(gate_BxTxF, approximate=True) if cfg.is_gemma else jax.nn.silu(gate_BxTxF)
    hidden_BxTxF = _constrain(act * up_BxTxF, ("act_batch", "act_len", "act_mlp"))
    return jnp.einsum("BTF,FD->BTD", hidden_BxTxF, w_down.astype(dt))


class Block(nn.Module):
  """One decoder layer; called by nn.scan with this layer's window and cache slice."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, layer_in: dict, positions_BxT, kv_positions_BxS, kv_valid_BxS,
               write_index):
    cfg = self.config
    attn_out, new_cache = Attention(cfg, name="attn")(
        RMSNorm(cfg, name="input_norm")(x_BxTxD), positions_BxT, kv_positions_BxS,
        kv_valid_BxS, layer_in["window"], layer_in.get("cache"), write_index)
    if cfg.is_gemma:
      attn_out = RMSNorm(cfg, name="post_attn_norm")(attn_out)
    x_BxTxD = x_BxTxD + attn_out
    mlp_out = MLP(cfg, name="mlp")(RMSNorm(cfg, name="pre_mlp_norm")(x_BxTxD))
    if cfg.is_gemma:
      mlp_out = RMSNorm(cfg, name="post_mlp_norm")(mlp_out)
    x_BxTxD = _constrain(x_BxTxD + mlp_out, ("act_batch", "act_len", "act_embed"))
    return x_BxTxD, ({"cache": new_cache} if new_cache is not None else {})


class Decoder(nn.Module):
  """Embedding, scanned blocks and final norm; returns hidden states [B, T, D] and the cache.

  It also owns the head parameters (`lm_head` when untied, `score` for reward models) so that
  one init creates every weight; the heads are applied by `eva_jax.models.head_*`.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, kv_positions_BxS, kv_valid_BxS,
               cache: Optional[dict] = None, write_index: Any = None):
    cfg = self.config
    d, pdt, dt = cfg.hidden_size, cfg.jnp_param_dtype, cfg.jnp_dtype
    embedding = _param(self, "embedding", nn.initializers.normal(0.02), (cfg.vocab_size, d),
                       ("vocab", "embed"), pdt)
    x_BxTxD = jnp.take(embedding, tokens_BxT, axis=0).astype(dt)
    if cfg.is_gemma:
      # Gemma scales by sqrt(d) rounded to the compute dtype, as its reference code does.
      x_BxTxD = x_BxTxD * jnp.asarray(d ** 0.5, dtype=dt)
    x_BxTxD = _constrain(x_BxTxD, ("act_batch", "act_len", "act_embed"))

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
    layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    layer_in = {"window": jnp.asarray(cfg.layer_windows, dtype=jnp.int32)}
    if cache is not None:
      layer_in["cache"] = cache
    x_BxTxD, layer_out = layers(cfg, name="layers")(
        x_BxTxD, layer_in, positions_BxT, kv_positions_BxS, kv_valid_BxS, write_index)
    hidden_BxTxD = RMSNorm(cfg, name="final_norm")(x_BxTxD)

    if cfg.is_reward_model:
      _param(self, "score", nn.initializers.normal(0.02), (d, cfg.num_labels), ("embed", None),
             pdt)
    elif not cfg.tie_embeddings:
      _param(self, "lm_head", nn.initializers.normal(0.02), (d, cfg.vocab_size),
             ("embed", "vocab"), pdt)
    return hidden_BxTxD, layer_out.get("cache")
