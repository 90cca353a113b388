"""The sampler's decode step: N samples per prompt read one shared, unrepeated prompt cache.

`models.decode_step` scans the layers over one cache [L, B, S, K, E] and hands back every
layer's slice re-written, which inside a decode loop costs several full copies of the cache per
token. The sampler keeps two caches instead:
  prompt     {"k", "v"} [L, B, K, P, E]      filled once by the prefill, only read afterwards;
  generated  {"k", "v"} [L, B*N, K, T, E]    row b * N + n, slot j = the j-th generated token.
(Slots next to head_dim, so the attention einsums read them without a transposed copy.)
A step computes the new token's keys/values in every layer and attends to the prompt, the
generated slots written so far and itself under one softmax; the loop then writes the new keys/
values with one small dynamic_update_slice, in place. The N samples of a prompt share its cache
without repeating it (the query heads of the N samples meet the prompt keys in one einsum).

The layer maths reuses the model's modules (RMSNorm, MLP, RoPE); only the attention reads its
keys differently, with the same masking rule: a query at position p sees valid slots at
positions <= p, and on Gemma's sliding layers only those with p - position < window.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from eva_jax.models.config import ModelConfig
from eva_jax.models.transformer import _NEG_INF, MLP, RMSNorm, apply_rope, rope_inv_freq


def init_generated_cache(config: ModelConfig, rows: int, length: int, dtype) -> dict:
  """Empty generated-token cache {"k", "v"}: [L, rows, K, length, E] each."""
  shape = (config.num_layers, rows, config.num_kv_heads, length, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _softcap(x: jax.Array, cap) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def _attention(config: ModelConfig, p: dict, h_RxD, positions_R, window, prompt_k, prompt_v,
               prompt_positions_BxP, prompt_valid_BxP, gen_k, gen_v, num_written):
  """Self-attention of one new token per row -> (output [R, D], its k and v [R, K, E])."""
  cfg = config
  h, k, e, dt = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype
  b, prompt_len = prompt_positions_BxP.shape
  r = h_RxD.shape[0]
  n, g = r // b, h // k
  q_RxHxE = jnp.einsum("RD,DHE->RHE", h_RxD, p["q"].astype(dt))
  k_RxKxE = jnp.einsum("RD,DKE->RKE", h_RxD, p["k"].astype(dt))
  v_RxKxE = jnp.einsum("RD,DKE->RKE", h_RxD, p["v"].astype(dt))
  if cfg.qkv_bias:
    q_RxHxE += p["q_bias"].astype(dt)
    k_RxKxE += p["k_bias"].astype(dt)
    v_RxKxE += p["v_bias"].astype(dt)
  inv_freq = rope_inv_freq(cfg)
  q_RxHxE = apply_rope(q_RxHxE[:, None], positions_R[:, None], inv_freq)[:, 0]
  k_RxKxE = apply_rope(k_RxKxE[:, None], positions_R[:, None], inv_freq)[:, 0]
  k_new = k_RxKxE.astype(gen_k.dtype)
  v_new = v_RxKxE.astype(gen_v.dtype)

  scale = (cfg.query_pre_attn_scalar or e) ** -0.5
  q_BxNxKxGxE = (q_RxHxE * scale).reshape(b, n, k, g, e)
  gen_len = gen_k.shape[2]
  gen_k_BxNxKxTxE = gen_k.reshape(b, n, k, gen_len, e).astype(dt)
  gen_v_BxNxKxTxE = gen_v.reshape(b, n, k, gen_len, e).astype(dt)
  f32 = jnp.float32
  s_prompt = jnp.einsum("BNKGE,BKPE->BNKGP", q_BxNxKxGxE, prompt_k.astype(dt),
                        preferred_element_type=f32)
  s_gen = jnp.einsum("BNKGE,BNKTE->BNKGT", q_BxNxKxGxE, gen_k_BxNxKxTxE,
                     preferred_element_type=f32)
  s_self = jnp.einsum("BNKGE,BNKE->BNKG", q_BxNxKxGxE, k_new.astype(dt).reshape(b, n, k, e),
                      preferred_element_type=f32)
  cap = cfg.attn_logit_softcap
  s_prompt, s_gen, s_self = _softcap(s_prompt, cap), _softcap(s_gen, cap), _softcap(s_self, cap)

  # Prompt slots are all earlier than the query; generated slot j sits num_written - j tokens
  # before it and holds a token once j < num_written.
  q_pos_BxN = positions_R.reshape(b, n)
  in_window_BxNxP = (window <= 0) | (q_pos_BxN[:, :, None] - prompt_positions_BxP[:, None] <
                                     window)
  prompt_ok = (prompt_valid_BxP[:, None] & in_window_BxNxP)[:, :, None, None, :]
  back_T = num_written - jnp.arange(gen_len)
  gen_ok = ((back_T > 0) & ((window <= 0) | (back_T < window)))[None, None, None, None, :]
  s_prompt = jnp.where(prompt_ok, s_prompt, _NEG_INF)
  s_gen = jnp.where(gen_ok, s_gen, _NEG_INF)
  # One softmax over the three parts (the token itself is always visible).
  m = jnp.maximum(jnp.maximum(s_prompt.max(-1), s_gen.max(-1)), s_self)
  w_prompt, w_gen = jnp.exp(s_prompt - m[..., None]), jnp.exp(s_gen - m[..., None])
  w_self = jnp.exp(s_self - m)
  denom = w_prompt.sum(-1) + w_gen.sum(-1) + w_self
  out_BxNxKxGxE = (
      jnp.einsum("BNKGP,BKPE->BNKGE", (w_prompt / denom[..., None]).astype(dt),
                 prompt_v.astype(dt))
      + jnp.einsum("BNKGT,BNKTE->BNKGE", (w_gen / denom[..., None]).astype(dt),
                   gen_v_BxNxKxTxE)
      + (w_self / denom).astype(dt)[..., None] * v_new.astype(dt).reshape(b, n, k, 1, e))
  out_RxD = jnp.einsum("RHE,HED->RD", out_BxNxKxGxE.reshape(r, h, e), p["o"].astype(dt))
  return out_RxD, k_new, v_new


def decode_step(config: ModelConfig, params: dict, tokens_R: jax.Array, positions_R: jax.Array,
                prompt_cache: dict, prompt_positions_BxP: jax.Array,
                prompt_valid_BxP: jax.Array, gen_cache: dict, num_written
                ) -> tuple[jax.Array, dict]:
  """One new token per row (R = B * N rows, prompt-major) -> (final hidden [R, D], new keys and
  values {"k", "v"} [L, R, K, E] to store in generated slot `num_written`).

  positions_R: the new tokens' positions; prompt_*_BxP: per prompt slot, its position and
  whether it holds a real token; gen_cache slots [0, num_written) hold the earlier tokens.
  """
  cfg = config
  dt = cfg.jnp_dtype
  x_RxD = jnp.take(params["embedding"], tokens_R, axis=0).astype(dt)
  if cfg.is_gemma:
    x_RxD = x_RxD * jnp.asarray(cfg.hidden_size ** 0.5, dtype=dt)
  norm = lambda scale, x: RMSNorm(cfg).apply({"params": {"scale": scale}}, x)

  def layer(x_RxD, xs):
    lp, window, pk, pv, gk, gv = xs
    attn_out, k_new, v_new = _attention(
        cfg, lp["attn"], norm(lp["input_norm"]["scale"], x_RxD), positions_R, window, pk, pv,
        prompt_positions_BxP, prompt_valid_BxP, gk, gv, num_written)
    if cfg.is_gemma:
      attn_out = norm(lp["post_attn_norm"]["scale"], attn_out)
    x_RxD = x_RxD + attn_out
    mlp_out = MLP(cfg).apply({"params": lp["mlp"]},
                             norm(lp["pre_mlp_norm"]["scale"], x_RxD)[:, None])[:, 0]
    if cfg.is_gemma:
      mlp_out = norm(lp["post_mlp_norm"]["scale"], mlp_out)
    return x_RxD + mlp_out, (k_new, v_new)

  windows = jnp.asarray(cfg.layer_windows, jnp.int32)
  x_RxD, (k_new, v_new) = jax.lax.scan(
      layer, x_RxD, (params["layers"], windows, prompt_cache["k"], prompt_cache["v"],
                     gen_cache["k"], gen_cache["v"]))
  return norm(params["final_norm"]["scale"], x_RxD), {"k": k_new, "v": v_new}
