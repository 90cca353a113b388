"""The GPU check: one command on an H100 / H200 (under 10 minutes) that prints one JSON object.

1. kernel: `kernels.pallas_target_logprobs` compiled for the GPU (interpret=False: the Triton
   lowering forward, the blockwise JAX walk backward) against `kernels.reference_target_logprobs`
   (float32 logits materialised) on the same inputs: max abs difference of the log-probs and of
   both gradients (d hidden, d w_out) of sum(g * logprob), in float32 and in bfloat16 with
   Gemma 2's soft-cap 30. The reference runs in float32 on the float32 copy of the inputs.
2. update: one DPO update of `train.make_train_step` for a Llama-3.2-1B-shaped model (1.24 B
   parameters, tied, float32 master weights, bfloat16 compute), 8 pairs of 1024 tokens,
   AdamW; seconds per step (median of the timed steps after the compile) and
   MFU = 6·N·tokens / seconds / the GPU's published dense bf16 peak (also with attention's
   FLOPs, `ModelConfig.flops_per_token`).
3. sample: `sampling.sample` at W1's shapes (experiments/benchmarks/w1_sampling.py: the 55 M
   Llama-shaped float32 model, random weights, 8 prompts of 64 tokens x 6 samples, 128 new
   tokens, temperature 0.7, top-p 0.9, no EOS); generated tokens/s (best of the repeats after a
   warm-up) and the HBM-bandwidth fraction of one decode step = (param bytes + KV bytes a step
   reads at the cache's mean fill) / (seconds / new tokens) / the published HBM bandwidth. The
   seconds include the prefill, so the fraction is a lower bound.

Peaks (NVIDIA's H100 SXM and H200 SXM datasheets): 989 TFLOP/s dense bf16 both; HBM 3.35 TB/s
(H100), 4.8 TB/s (H200). Another device kind gets `null` fractions; the CPU gets the host's
float32 roof measured in the run (`train.cpu_peak_flops`) and no bandwidth.

  python experiments/gpu_check.py            # on the GPU machine
  python experiments/gpu_check.py --smoke    # everything at tiny sizes on CPU (kernel interpreted)
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from eva_jax import kernels, logprobs, models, sampling, sharding, train, train_state

# (device kind substring, dense bf16 FLOP/s, HBM bytes/s), matched in order.
GPU_PEAKS = (("H200", 989e12, 4.8e12), ("H100", 989e12, 3.35e12))

# name -> sizes; "full" is the GPU run, "smoke" the CPU test.
SIZES = {
    "full": dict(kernel=(4096, 2048, 128256), pairs=8, seq_len=1024, steps=5, repeats=3,
                 w1=(8, 64, 6, 128)),
    "smoke": dict(kernel=(64, 32, 300), pairs=2, seq_len=64, steps=1, repeats=1,
                  w1=(2, 8, 2, 4)),
}


def peaks(device) -> tuple[Optional[float], Optional[float]]:
  """(peak FLOP/s, peak HBM bytes/s) of one device, None where unknown."""
  if device.platform == "cpu":
    return train.cpu_peak_flops(), None
  for key, flops, bandwidth in GPU_PEAKS:
    if key.lower() in device.device_kind.lower():
      return flops, bandwidth
  return None, None


def llama_1b(**kw) -> models.ModelConfig:
  """The shape of Llama 3.2 1B (hidden 2048, 16 layers, 32 / 8 heads, tied embeddings)."""
  return models.family_config("llama", **{**dict(
      vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
      num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_embeddings=True,
      param_dtype="float32", dtype="bfloat16", remat="dots"), **kw})


def w1_model() -> models.ModelConfig:
  """W1's model (BENCHMARKS.md): vocab 32000, hidden 512, MLP 1408, 8 layers, 8 / 2 heads."""
  return models.family_config(
      "llama", vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
      num_heads=8, num_kv_heads=2, head_dim=64, rope_theta=10000.0, tie_embeddings=False)


def check_kernel(rows: int, dim: int, vocab: int) -> dict:
  """Max abs differences, Pallas kernel vs the float32 reference, values and gradients."""
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(rows, dim)).astype(np.float32)
  w_out = (rng.normal(size=(dim, vocab)) / np.sqrt(dim)).astype(np.float32)
  targets = jnp.asarray(rng.integers(0, vocab, rows), jnp.int32)
  g = jnp.asarray(rng.normal(size=rows), jnp.float32)
  out = {}
  for dtype, softcap in ((jnp.float32, None), (jnp.bfloat16, 30.0)):
    h, w = jnp.asarray(hidden, dtype), jnp.asarray(w_out, dtype)

    def value_and_grads(fn, h, w, softcap=softcap):
      logp, vjp = jax.vjp(lambda h, w: fn(h, w, targets, softcap=softcap), h, w)
      return (logp, *vjp(g))

    kernel = jax.jit(lambda h, w: value_and_grads(
        lambda *a, **k: kernels.pallas_target_logprobs(*a, **k), h, w))
    reference = jax.jit(lambda h, w: value_and_grads(kernels.reference_target_logprobs, h, w))
    # Full float32 matmuls on both sides: GPUs otherwise run float32 dots in TF32.
    with jax.default_matmul_precision("highest"):
      got = kernel(h, w)
      want = reference(h.astype(jnp.float32), w.astype(jnp.float32))
    diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) for a, b in zip(got, want)]
    out[jnp.dtype(dtype).name] = dict(zip(("logprob", "d_hidden", "d_w_out"), diffs),
                                      softcap=softcap)
  return {"rows": rows, "dim": dim, "vocab": vocab, "max_abs_diff": out}


def check_update(config: models.ModelConfig, pairs: int, seq_len: int, steps: int,
                 peak_flops: Optional[float]) -> dict:
  """Seconds per DPO update and its MFU on one device."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  prompt, response = seq_len // 4, seq_len - seq_len // 4

  def ids(n):
    return [rng.integers(3, config.vocab_size, n).tolist() for _ in range(pairs)]

  batch = logprobs.make_pair_batch(ids(prompt), ids(response), ids(response), max_length=seq_len,
                                   max_prompt_length=prompt, pad_id=0,
                                   ref_chosen=np.zeros(pairs), ref_rejected=np.zeros(pairs))
  opt_cfg = train_state.OptimizerConfig(learning_rate=5e-7, total_steps=100, warmup_ratio=0.0)
  optimizer = train_state.make_optimizer(opt_cfg)
  step = train.make_train_step(config, optimizer, mesh, train.LossConfig("dpo", beta=0.05))
  state = train_state.init_train_state(config, optimizer, mesh, rng=jax.random.key(0))
  start = time.perf_counter()
  state, metrics = step(state, batch)
  loss = float(metrics["loss"])  # Waits for the step.
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    float(metrics["loss"])
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  n = models.param_count(config)
  tokens = 2 * pairs * seq_len
  model_flops = 6 * n * tokens
  with_attention = 3 * config.flops_per_token(seq_len) * tokens
  mfu = lambda flops: None if peak_flops is None else flops / seconds / peak_flops  # noqa: E731
  return {"params": n, "tokens": tokens, "remat": config.remat, "first_loss": loss,
          "compile_and_first_step_s": round(compile_s, 1), "step_times": times,
          "seconds_per_step": seconds, "tokens_per_s": tokens / seconds,
          "model_flops": model_flops, "mfu": mfu(model_flops),
          "mfu_with_attention": mfu(with_attention)}


def decode_step_bytes(config: models.ModelConfig, params: dict, prompts: int, prompt_len: int,
                      samples: int, new_tokens: int) -> int:
  """Bytes one decode step reads: every param, and the KV cache at its mean fill (the prompt
  slots, shared by a prompt's samples, and half of the generated ones)."""
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(
      config.dtype).itemsize
  return int(param_bytes + slot * (prompts * prompt_len + prompts * samples * new_tokens / 2))


def check_sample(config: models.ModelConfig, prompts: int, prompt_len: int, samples: int,
                 new_tokens: int, repeats: int, peak_bw: Optional[float]) -> dict:
  """Generated tokens/s of `sampling.sample` and the HBM fraction of its decode steps."""
  params = models.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size, (prompts, prompt_len)).astype(np.int32)
  mask = np.ones_like(tokens)

  def run():
    out = sampling.sample(config, params, tokens, mask, rng=jax.random.key(1),
                          num_samples=samples, max_new_tokens=new_tokens, temperature=0.7,
                          top_p=0.9, top_k=0, eos_ids=())
    jax.block_until_ready(out)
    assert int(np.min(out.lengths)) == new_tokens, "every row must run to max_new_tokens"

  run()  # Compile.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  seconds = min(times)
  step_bytes = decode_step_bytes(config, params, prompts, prompt_len, samples, new_tokens)
  step_s = seconds / new_tokens
  return {"params": models.param_count(config), "prompts": prompts, "prompt_len": prompt_len,
          "samples": samples, "new_tokens": new_tokens, "seconds": seconds, "times": times,
          "tokens_per_s": prompts * samples * new_tokens / seconds, "step_s": step_s,
          "step_bytes": step_bytes,
          "hbm_fraction": None if peak_bw is None else step_bytes / step_s / peak_bw}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the CPU test")
  args = parser.parse_args(argv)
  sizes = SIZES["smoke" if args.smoke else "full"]
  device = jax.devices()[0]
  if not args.smoke and device.platform != "gpu":
    raise SystemExit(f"gpu_check: needs a GPU (found {device.platform}: {device.device_kind}); "
                     "--smoke runs it at tiny sizes on CPU")
  peak_flops, peak_bw = peaks(device)
  update_config = (models.tiny("llama", vocab_size=512, num_layers=1, dtype="bfloat16")
                   if args.smoke else llama_1b())
  sample_config = (models.tiny("llama", vocab_size=512, num_layers=1) if args.smoke
                   else w1_model())
  start = time.perf_counter()
  result = {"device_kind": device.device_kind, "platform": device.platform,
            "smoke": args.smoke, "peak_flops": peak_flops, "peak_hbm_bytes_per_s": peak_bw,
            "kernel": check_kernel(*sizes["kernel"]),
            "update": check_update(update_config, sizes["pairs"], sizes["seq_len"],
                                   sizes["steps"], peak_flops),
            "sample": check_sample(sample_config, *sizes["w1"], sizes["repeats"], peak_bw)}
  result["total_s"] = round(time.perf_counter() - start, 1)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
