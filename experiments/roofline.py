"""Roofline figures of compiled device programs at a TPU chip's published peaks.

See experiments/memory_plan.py's docstring for the definitions (model FLOPs, model bytes, the
roofline time, MFU and bandwidth fraction) and experiments/hlo_cost.py for how the compiled
program's FLOPs and bytes are counted.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from eva_jax import models
from experiments import hlo_cost

GIB = 2**30
# Published per-chip peaks, bf16 FLOP/s and HBM bytes/s: Cloud TPU docs, "TPU v5e" and "TPU v5p"
# (cloud.google.com/tpu/docs/v5e, cloud.google.com/tpu/docs/v5p).
PEAKS = {"v5e": (197e12, 819e9), "v5p": (459e12, 2765e9)}


def forward_flops(config: models.ModelConfig, tokens: int, logit_rows: int) -> int:
  """Model FLOPs of a forward over `tokens` tokens of which `logit_rows` go through the LM head:
  2 per matmul parameter per token. The embedding lookup costs none; the LM head (tied: the
  same table) runs on the logit rows only. Attention's score FLOPs are left out, as in
  6·N·tokens (which this is, x 3 for an update, for a tied model with logits at every token)."""
  vd = config.vocab_size * config.hidden_size
  head = vd if config.num_labels == 0 else 0
  lookup = 0 if head and config.tie_embeddings else vd
  body = models.param_count(config) - lookup - head
  return 2 * body * tokens + 2 * head * logit_rows


def decode_model_bytes(config: models.ModelConfig, num_prompts: int, prompt_len: int,
                       num_samples: int, new_tokens: int) -> int:
  """HBM bytes one decode step must read, all chips together: the params in the compute dtype
  (the decode program casts float32 master weights once, before its loop) and the KV cache at
  the loop's mean fill (every prompt slot, read once per prompt since the samples share it,
  and half of the generated slots)."""
  itemsize = jnp.dtype(config.dtype).itemsize
  params = models.param_count(config) * itemsize
  slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
  slots = num_prompts * prompt_len + num_prompts * num_samples * (new_tokens - 1) / 2
  return int(params + slot * slots)


def roofline(compiled, chip: str, devices: int, model_flops: float,
             model_bytes: Optional[float] = None, hlo_path: Optional[str] = None,
             steps: int = 1, named_trips: Optional[dict] = None) -> dict:
  """One program's cost per chip (see hlo_cost: loops expanded) and its roofline.

  time = max(flops / peak FLOP/s, bytes / peak HBM bytes/s) of the compiled per-chip program;
  mfu = model FLOPs per chip / (time x peak FLOP/s); bw_fraction = model bytes per chip /
  (time x peak bytes/s). The compiler's own cost_analysis (each loop body once) is kept beside.
  hlo_path: where to keep the optimized HLO text, to re-read it without compiling again.
  steps: for the decode program, its steps (max_new_tokens - 1): the figures are per step, the
  program's one-off work spread over them (hlo_cost.program_cost); named_trips: the trip
  counts of its named inner loops (hlo_cost.program_cost)."""
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  cost = hlo_cost.program_cost(text, steps, named_trips)
  raw = compiled.cost_analysis()
  raw = raw[0] if isinstance(raw, (list, tuple)) else raw
  peak_flops, peak_bw = PEAKS[chip]
  flops, moved = cost.flops / steps, cost.bytes / steps
  seconds = max(flops / peak_flops, moved / peak_bw)
  out = {"flops": flops, "bytes": moved, "loops": list(cost.loops),
         "flops_once": cost.flops_once, "bytes_once": cost.bytes_once,
         "compiler_flops_once": float(raw.get("flops", 0.0)),
         "compiler_bytes_once": float(raw.get("bytes accessed", 0.0)),
         "model_flops": model_flops / devices, "roofline_s": seconds,
         "bound": "compute" if flops / peak_flops >= moved / peak_bw else "memory",
         "mfu": model_flops / devices / (seconds * peak_flops)}
  if model_bytes is not None:
    out["model_bytes"] = model_bytes / devices
    out["bw_fraction"] = model_bytes / devices / (seconds * peak_bw)
  return out


def memory_table(rows: list[dict]) -> str:
  """One line per workload: the per-device bytes of memory_plan.memory_of, what the runner
  keeps beside (`resident`), the total against the chip's HBM."""
  gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
  lines = ["| workload | slice | mesh d/f/t | params | remat | per-device batch | argument | "
           "output | alias | temp | step | + resident | total | HBM | fits |",
           "|" + "---|" * 15]
  for r in rows:
    mesh = "/".join(str(v) for v in r["mesh"].values())
    lines.append(
        f"| {r['name']} | {r['slice']} | {mesh} | {r['param_dtype']} | {r['remat']} | "
        f"{r['batch']} | {gib(r['argument'])} | {gib(r['output'])} | {gib(r['alias'])} | "
        f"{gib(r['temp'])} | {gib(r['step'])} | {gib(r['resident'])} | {gib(r['total'])} | "
        f"{gib(r['hbm'])} | {'yes' if r['fits'] else 'NO'} |")
  return "\n".join(lines)


def cost_table(rows: list[dict]) -> str:
  """One line per compiled program: GiB per chip (program + resident), fits, headroom, per-chip
  TFLOPs and GB (loops expanded), roofline time, estimated MFU and HBM-bandwidth fraction."""
  lines = ["| program | slice | compiles | GiB per chip | fits | headroom | TFLOP | GB | "
           "model TFLOP | bound | roofline ms | est. MFU | est. BW fraction |",
           "|" + "---|" * 13]
  for r in rows:
    compiled = bool(r["programs"])
    headroom = f"{100 * (1 - r['total'] / r['hbm']):.0f} %" if compiled else "-"
    mem = (f"{r['step'] / GIB:.1f} + {r['resident'] / GIB:.1f}" if compiled
           else f"temp {r['temp'] / GIB:.1f}")
    for program, c in r["programs"].items() or [("-", None)]:
      cost = (f"{c['flops'] / 1e12:.2f} | {c['bytes'] / 1e9:.1f} | {c['model_flops'] / 1e12:.2f} | "
              f"{c['bound']} | {1e3 * c['roofline_s']:.1f} | {100 * c['mfu']:.0f} % | " +
              (f"{100 * c['bw_fraction']:.0f} % |" if "bw_fraction" in c else "- |")
              if c else "- | - | - | - | - | - | - |")
      lines.append(f"| {r['name']}: {program} | {r['slice']} | {'yes' if compiled else 'NO (HBM)'}"
                   f" | {mem} | {'yes' if r['fits'] else 'NO'} | {headroom} | {cost}")
  return "\n".join(lines)
