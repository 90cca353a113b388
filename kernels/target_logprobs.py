"""Per-token target log-probs of a language model head, without the [N, V] logits.

`target_logprobs` is the entry point the training code calls; it dispatches to

- "reference": `reference_target_logprobs`, plain jnp that materialises the [N, V] logits;
- "dense":     `dense_target_logprobs`, the same [N, V] logits with a hand-written backward
               (logprob_dense.py; what the CPU update uses for small heads);
- "chunked":   `chunked_target_logprobs`, pure JAX walking the vocabulary in blocks
               (logprob_chunked.py);
- "pallas":    `pallas_target_logprobs`, fused Pallas kernels, forward and backward
               (logprob_pallas.py; on GPU the backward is the chunked walk).

All compute logits = hidden @ w_out with float32 accumulation, the optional Gemma 2 soft-cap
softcap * tanh(logits / softcap), log_softmax over the vocabulary, and the target's entry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .logprob_chunked import DEFAULT_BLOCK_V as DEFAULT_CHUNK_V
from .logprob_chunked import apply_softcap
from .logprob_chunked import chunked_target_logprobs
from .logprob_chunked import common_dtype
from .logprob_chunked import validate_inputs
from .logprob_dense import dense_target_logprobs
from .logprob_pallas import pallas_target_logprobs

IMPLS = ("auto", "reference", "dense", "chunked", "pallas")


def reference_target_logprobs(hidden_NxD, w_out_DxV, targets_N, *, softcap=None,
                              return_entropy=False):
  """The plain version: materialises float32 logits [N, V]; shapes as in target_logprobs."""
  validate_inputs(hidden_NxD, w_out_DxV, targets_N, softcap)
  dtype = common_dtype(hidden_NxD, w_out_DxV)
  logits_NxV = jnp.einsum("nd,dv->nv", hidden_NxD.astype(dtype), w_out_DxV.astype(dtype),
                          preferred_element_type=jnp.float32)
  logp_NxV = jax.nn.log_softmax(apply_softcap(logits_NxV, softcap), axis=-1)
  logprob_N = jnp.take_along_axis(logp_NxV, targets_N[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if not return_entropy:
    return logprob_N
  return logprob_N, -jnp.sum(jnp.exp(logp_NxV) * logp_NxV, axis=-1)


def target_logprobs(hidden_NxD, w_out_DxV, targets_N, *, softcap=None, return_entropy=False,
                    impl="auto", block_n=None, block_v=None, interpret=None):
  """log softmax(softcap(hidden @ w_out))[n, targets[n]] for every row n.

  Args:
    hidden_NxD: final hidden states [N, D] (float32 or bfloat16; float32 accumulation).
    w_out_DxV: output projection (unembedding) [D, V].
    targets_N: int token ids [N], each in [0, V).
    softcap: Gemma 2 final-logit soft-cap (30.0 for Gemma 2), or None for no capping.
    return_entropy: also return each row's softmax entropy in nats.
    impl: "auto" (Pallas on GPU/TPU, chunked on CPU), "reference", "dense", "chunked" or
      "pallas".
    block_n: Pallas row tile (ignored by the other impls); None for the default.
    block_v: vocabulary block of the chunked walk or of the Pallas tile; None for the default.
    interpret: Pallas interpreter switch; None means True on CPU.

  Returns:
    float32 log-probs [N], and float32 entropies [N] when return_entropy. Gradients flow to
    hidden and w_out (none to targets).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = "chunked" if jax.default_backend() == "cpu" else "pallas"
  if impl == "reference":
    return reference_target_logprobs(hidden_NxD, w_out_DxV, targets_N, softcap=softcap,
                                     return_entropy=return_entropy)
  if impl == "dense":
    return dense_target_logprobs(hidden_NxD, w_out_DxV, targets_N, softcap=softcap,
                                 return_entropy=return_entropy)
  if impl == "chunked":
    return chunked_target_logprobs(hidden_NxD, w_out_DxV, targets_N, softcap=softcap,
                                   return_entropy=return_entropy,
                                   block_v=DEFAULT_CHUNK_V if block_v is None else block_v)
  return pallas_target_logprobs(hidden_NxD, w_out_DxV, targets_N, softcap=softcap,
                                return_entropy=return_entropy, block_n=block_n, block_v=block_v,
                                interpret=interpret)
