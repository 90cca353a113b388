"""W2's matmuls alone: XLA:CPU's GEMMs against PyTorch's (and NumPy's) on the step's own shapes.

W2 (`w2_dpo_step.py`) is nearly all matmuls, so its ratio is bounded by two numbers: how many
FLOPs each side multiplies, and how fast each side's GEMM library multiplies them. This times
every distinct matmul of both steps, forward and both gradients (dX = dY·Wᵀ, dW = Xᵀ·dY), each
library on its own (best of --repeats, the libraries interleaved), and sums them with the
counts of one step:

- ours (`eva_jax.train`'s DPO step): 8 layers × {the 512 shared prompt tokens, the 3072
  response tokens} × (q, k, v, o, gate, up, down), plus the LM head at the 3072 response
  positions only;
- the peer (eager PyTorch on transformers' Llama): 8 layers × 4096 tokens × the same seven,
  plus the LM head at all 4096 positions.

Libraries: XLA:CPU as JAX compiles it by default (YNNPACK dots), XLA:CPU with YNNPACK off (its
Eigen dots; a per-compile option, so both run in this process), PyTorch, NumPy (OpenBLAS).
Attention's small batched matmuls (~5 % of the FLOPs) are left out. One JSON line: per library
the seconds of each side's matmuls and their GFLOP/s, and `w2_ratio_bound`: the peer's matmul
seconds under PyTorch over ours under each library -- the W2 ratio we would reach if everything
else in both steps cost nothing (for "torch" and "numpy": if our step could call their GEMMs).

  python experiments/benchmarks/w2_gemm_gap.py [--repeats 3]
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from eva_jax import context

LAYERS, D, Q, KV, F, V = 8, 512, 512, 128, 1408, 32000   # W2's model (w2_dpo_step.py)
PROMPT_TOKENS, RESPONSE_TOKENS, PEER_TOKENS = 8 * 64, 16 * 192, 16 * 256
LAYER_MATMULS = ((D, Q), (D, KV), (D, KV), (Q, D), (D, F), (D, F), (F, D))   # q k v o gate up down
XLA_EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def step_matmuls() -> dict:
  """{"ours" | "peer": {(M, K, N): count}} of one step's forward matmuls."""
  def count(token_blocks, head_tokens):
    out = {}
    for m in token_blocks:
      for k, n in LAYER_MATMULS:
        out[(m, k, n)] = out.get((m, k, n), 0) + LAYERS
    out[(head_tokens, D, V)] = out.get((head_tokens, D, V), 0) + 1
    return out
  return {"ours": count((PROMPT_TOKENS, RESPONSE_TOKENS), RESPONSE_TOKENS),
          "peer": count((PEER_TOKENS,), PEER_TOKENS)}


def _best(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _xla(options: dict):
  """(forward, dX, dW) callables for XLA compiled with `options`."""
  def compiled(f, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(f).lower(*args).compile(compiler_options=options)

  def make(m, k, n):
    fwd = compiled(lambda x, w: x @ w, (m, k), (k, n))
    d_x = compiled(lambda g, w: g @ w.T, (m, n), (k, n))
    d_w = compiled(lambda x, g: x.T @ g, (m, k), (m, n))
    return [lambda a, b, f=f: f(a, b).block_until_ready() for f in (fwd, d_x, d_w)]
  return make, jnp.asarray


def _eager(m, k, n):
  """(forward, dX, dW) for an eager library (PyTorch or NumPy arrays)."""
  return [lambda a, b: a @ b, lambda g, w: g @ w.T, lambda x, g: x.T @ g]


def main():
  context.skip_absent_tpu()  # No libtpu start-up errors on a CPU machine's stderr.
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  counts = step_matmuls()
  shapes = sorted(set(counts["ours"]) | set(counts["peer"]))
  libraries = {"xla": _xla({}), "xla_eigen": _xla(XLA_EIGEN),
               "torch": (_eager, torch.from_numpy), "numpy": (_eager, np.asarray)}
  rng = np.random.default_rng(0)
  seconds = {lib: {} for lib in libraries}   # (m, k, n) -> seconds of forward + dX + dW
  for m, k, n in shapes:
    x, w, g = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n), (m, n)))
    operands = ((x, w), (g, w), (x, g))
    for lib, (make, convert) in libraries.items():   # interleaved: the machine is shared
      fns = make(m, k, n)
      seconds[lib][(m, k, n)] = sum(
          _best(lambda f=f, a=convert(a), b=convert(b): f(a, b), args.repeats)
          for f, (a, b) in zip(fns, operands))
  flops = {side: sum(3 * 2 * m * k * n * c for (m, k, n), c in counts[side].items())
           for side in counts}
  result = {"workload": "W2 matmuls", "backend": jax.default_backend(),
            "threads": {"torch": torch.get_num_threads(), "cpus": os.cpu_count()},
            "gflop_per_step": {side: round(f / 1e9, 1) for side, f in flops.items()},
            "flop_ratio": round(flops["peer"] / flops["ours"], 3)}
  for lib in libraries:
    result[lib] = {}
    for side in counts:
      s = sum(seconds[lib][shape] * c for shape, c in counts[side].items())
      result[lib][side] = {"s": round(s, 3), "gflop_s": round(flops[side] / s / 1e9, 1)}
  peer_s = result["torch"]["peer"]["s"]
  result["w2_ratio_bound"] = {lib: round(peer_s / result[lib]["ours"]["s"], 3)
                              for lib in ("xla", "xla_eigen", "torch", "numpy")}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
