"""Token selection: one exact draw per row from softmax(logits / T), truncated to the top-k and
then to the top-p nucleus and renormalised, without sorting the vocabulary for top-p.

The nucleus is the set of tokens whose strictly-more-probable tokens carry less than `top_p` of
the mass (transformers' rule; tokens tied at the boundary are kept or dropped together). See
`_sample_vocab` for the sort-free draw. Used inside the sampler's decode loop (`eva_jax.sampling`)
and callable alone (`select_tokens`).

Axis letters: B rows, V vocabulary, C blocks of W vocabulary entries, K top-k candidates.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = 128  # Vocabulary block of the two-level inverse-CDF draw.
# Smallest positive temperature: float32 max / 1e6 = 3.4e32 bounds the logits that stay finite.
MIN_TEMPERATURE = 1e-6




def _inverse_cdf(weights_BxN: jax.Array, u_B: jax.Array) -> jax.Array:
  """Index drawn with probability weights / sum(weights), given uniforms in [0, 1).

  The first index with positive weight whose cumulative sum exceeds u * total, so rounding can
  never pick a zero-weight index (the last positive index if rounding overshoots the end).
  """
  n = weights_BxN.shape[-1]
  cum_BxN = jnp.cumsum(weights_BxN, axis=-1)
  target_B = u_B * cum_BxN[:, -1]
  hit_BxN = (cum_BxN > target_B[:, None]) & (weights_BxN > 0)
  last_positive_B = n - 1 - jnp.argmax(weights_BxN[:, ::-1] > 0, axis=-1)
  return jnp.where(hit_BxN.any(-1), jnp.argmax(hit_BxN, axis=-1), last_positive_B)


def _uniforms(keys_B: jax.Array, step, count: int) -> jax.Array:
  """[B, count] uniforms in [0, 1), one independent stream per row and step."""
  return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (count,)))(keys_B)


def _sample_vocab(logits_BxV: jax.Array, keys_B: jax.Array, temperature, top_p,
                  nucleus: bool, skip_B: jax.Array) -> jax.Array:
  """Exact draw from softmax(logits / temperature), restricted to the top-p nucleus if `nucleus`.

  Without sorting: adaptive rejection sampling. Each round draws a candidate c from the weights
  e = exp((logits - max) / temperature) restricted to {e > lam} (lam = -1 at first), by a
  two-level inverse CDF (C blocks of W = 128 tokens, then within the block). c is in the
  nucleus iff M(c) = sum(e[e > e_c]) < top_p * sum(e). If not, every nucleus token has
  e > e_c, so the next round restricts to {e > e_c}: the proposal is always the target
  distribution restricted to a superset of the nucleus, so an accepted draw has exactly the
  nucleus distribution. The support strictly shrinks on every rejection, so the loop ends; the
  acceptance rate starts at >= top_p and rises. One pass over [B, V] per round computes the
  block sums of e[e > e_c], which give both M(c) and the next round's proposal.

  Rows in `skip_B` (non-finite logits: their token is discarded) never enter the loop, and the
  loop stops after V rounds whatever happens (the support has at most V tokens); a row still
  undecided then takes its argmax, which is always in the nucleus.
  """
  b, v = logits_BxV.shape
  num_blocks = -(-v // _BLOCK)
  scaled_BxV = logits_BxV / temperature
  e_BxV = jnp.exp(scaled_BxV - scaled_BxV.max(axis=-1, keepdims=True))
  e_BxCxW = jnp.pad(e_BxV, ((0, 0), (0, num_blocks * _BLOCK - v))).reshape(b, num_blocks, _BLOCK)
  block_mass_BxC = e_BxCxW.sum(-1)
  rows = jnp.arange(b)

  def draw(block_mass_BxC, lam_B, step):
    u_Bx2 = _uniforms(keys_B, step, 2)
    block_B = _inverse_cdf(block_mass_BxC, u_Bx2[:, 0])
    e_BxW = e_BxCxW[rows, block_B]
    within_B = _inverse_cdf(jnp.where(e_BxW > lam_B[:, None], e_BxW, 0.0), u_Bx2[:, 1])
    return block_B * _BLOCK + within_B, e_BxW[rows, within_B]

  lam0_B = jnp.full((b,), -1.0, e_BxV.dtype)
  if not nucleus:
    return draw(block_mass_BxC, lam0_B, 0)[0]
  threshold_B = top_p * block_mass_BxC.sum(-1)

  def body(state):
    step, token_B, accepted_B, block_mass_BxC, lam_B = state
    cand_B, e_cand_B = draw(block_mass_BxC, lam_B, step)
    above_BxC = jnp.where(e_BxCxW > e_cand_B[:, None, None], e_BxCxW, 0.0).sum(-1)
    ok_B = above_BxC.sum(-1) < threshold_B
    token_B = jnp.where(~accepted_B & ok_B, cand_B, token_B)
    rejected_B = ~accepted_B & ~ok_B
    block_mass_BxC = jnp.where(rejected_B[:, None], above_BxC, block_mass_BxC)
    lam_B = jnp.where(rejected_B, e_cand_B, lam_B)
    return step + 1, token_B, accepted_B | ok_B, block_mass_BxC, lam_B

  state = (0, jnp.zeros((b,), jnp.int32), skip_B, block_mass_BxC, lam0_B)
  _, token_B, accepted_B, _, _ = jax.lax.while_loop(lambda s: ~s[2].all() & (s[0] < v), body,
                                                    state)
  return jnp.where(accepted_B, token_B, jnp.argmax(logits_BxV, axis=-1))


def _sample_top_k(logits_BxV: jax.Array, keys_B: jax.Array, temperature, top_p, top_k: int,
                  nucleus: bool) -> jax.Array:
  """Exact draw from the k most likely tokens (then their top-p nucleus), renormalised.

  `lax.top_k` returns the k largest logits sorted; among logits tied at the k-th value it keeps
  the lowest ids. The nucleus is then exact on those k sorted values.
  """
  values_BxK, ids_BxK = jax.lax.top_k(logits_BxV, top_k)
  e_BxK = jnp.exp((values_BxK - values_BxK[:, :1]) / temperature)
  if nucleus:
    above_BxK = jnp.where(values_BxK[:, None, :] > values_BxK[:, :, None], e_BxK[:, None, :],
                          0.0).sum(-1)
    e_BxK = jnp.where(above_BxK < top_p * e_BxK.sum(-1, keepdims=True), e_BxK, 0.0)
  pick_B = _inverse_cdf(e_BxK, _uniforms(keys_B, 0, 1)[:, 0])
  return jnp.take_along_axis(ids_BxK, pick_B[:, None], axis=-1)[:, 0]


def select(logits_BxV, keys_B, temperature, top_p, *, top_k: int, greedy: bool,
            nucleus: bool):
  """(tokens int32 [B], temperature-1 log-probs float32 [B]); the flags are static.

  A row whose logits (divided by the temperature) have a NaN, a +inf or no finite maximum gets
  token -1 and log-prob NaN.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  # max(logits) / T = max(logits / T) for T > 0, and a NaN anywhere makes the max NaN.
  top_B = logits_BxV.max(axis=-1)
  bad_B = ~jnp.isfinite(top_B if greedy else top_B / temperature)
  if greedy:
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  elif top_k:
    token_B = _sample_top_k(logits_BxV, keys_B, temperature, top_p, top_k, nucleus)
  else:
    token_B = _sample_vocab(logits_BxV, keys_B, temperature, top_p, nucleus, bad_B)
  token_B = token_B.astype(jnp.int32)
  picked_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0]
  logprob_B = picked_B - jax.nn.logsumexp(logits_BxV, axis=-1)
  return jnp.where(bad_B, -1, token_B), jnp.where(bad_B, jnp.nan, logprob_B)


def static_flags(vocab_size: int, temperature: float, top_p: float, top_k: int,
                  greedy: bool) -> dict:
  greedy = bool(greedy or temperature == 0)
  return dict(greedy=greedy, top_k=0 if greedy or top_k >= vocab_size else int(top_k),
              nucleus=not greedy and top_p < 1.0)


def select_tokens(logits_BxV: jax.Array, keys_B: jax.Array, *, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, greedy: bool = False):
  """One token per row -> (tokens int32 [B], log-probs float32 [B] at temperature 1).

  `keys_B` holds one PRNG key per row. Greedy (or temperature 0) takes the argmax; otherwise the
  draw is exact from softmax(logits / temperature) truncated to the top-k, then to the top-p
  nucleus, and renormalised. top_k=0 and top_p=1 switch those filters off. A row with non-finite
  logits (or logits / temperature) gets token -1 and log-prob NaN.
  """
  check_args(temperature, top_p, top_k)
  flags = static_flags(logits_BxV.shape[-1], temperature, top_p, top_k, greedy)
  return select(logits_BxV, keys_B, jnp.float32(temperature if temperature > 0 else 1.0),
                 jnp.float32(top_p), **flags)


def check_args(temperature, top_p, top_k) -> None:
  if not 0 <= temperature < float("inf"):  # Also rejects NaN.
    raise ValueError(f"sample: temperature must be >= 0 and finite, got {temperature}")
  if 0 < temperature < MIN_TEMPERATURE:
    raise ValueError(f"sample: temperature {temperature} is below {MIN_TEMPERATURE}, where "
                     "logits / temperature can overflow float32; use temperature=0 (greedy, "
                     "the cold limit) instead")
  if not 0 < top_p <= 1:
    raise ValueError(f"sample: top_p must lie in (0, 1], got {top_p}")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"sample: top_k must be an int >= 0 (0 = off), got {top_k!r}")
