"""W4: peak temporary memory of sequence log-probs at a large vocabulary (BENCHMARKS.md).

4096 tokens, hidden 2048, vocabulary 256000 (Gemma's). Lowers and compiles, from abstract
inputs (jax.ShapeDtypeStruct: nothing is allocated), the sum of target log-probs -- forward
only, and value-and-grad with respect to hidden and w_out -- for the naive version that
materialises the [tokens, vocab] logits and for ours (the chunked walk: what "auto" runs on
CPU), and reads XLA's `memory_analysis().temp_size_in_bytes`. One JSON line per
(pass, dtype); "ratio" is naive / ours.

The bfloat16 figures on CPU are dominated by a CPU-only XLA quirk: its bf16 float-normalisation
pass does not keep dynamic-slice in bf16, so it converts the whole [D, V] w_out to float32
(2.1 GB) ahead of the vocabulary loop. GPU and TPU slice bf16 natively.

  python experiments/benchmarks/w4_logprob_memory.py
"""
import json

import jax
import jax.numpy as jnp

from eva_jax import context, kernels

TOKENS, HIDDEN, VOCAB = 4096, 2048, 256000


def _temp_bytes(logprob_fn, with_grad: bool, dtype) -> int:
  """Temporary bytes of the compiled sum-of-log-probs (and its gradient) for abstract inputs."""
  def total(hidden_NxD, w_out_DxV, targets_N):
    return jnp.sum(logprob_fn(hidden_NxD, w_out_DxV, targets_N))

  fn = jax.value_and_grad(total, argnums=(0, 1)) if with_grad else total
  args = (jax.ShapeDtypeStruct((TOKENS, HIDDEN), dtype),
          jax.ShapeDtypeStruct((HIDDEN, VOCAB), dtype),
          jax.ShapeDtypeStruct((TOKENS,), jnp.int32))
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def main():
  context.skip_absent_tpu()  # No libtpu start-up errors on a CPU machine's stderr.
  for dtype in (jnp.float32, jnp.bfloat16):
    for with_grad in (True, False):
      naive = _temp_bytes(kernels.reference_target_logprobs, with_grad, dtype)
      ours = _temp_bytes(kernels.chunked_target_logprobs, with_grad, dtype)
      print(json.dumps({
          "workload": "W4",
          "pass": "forward+backward" if with_grad else "forward",
          "dtype": jnp.dtype(dtype).name,
          "impl": "chunked",
          "backend": jax.default_backend(),
          "ours_temp_bytes": ours,
          "naive_temp_bytes": naive,
          "ratio": round(naive / ours, 2),
      }))


if __name__ == "__main__":
  main()
