"""W2: one DPO update, ours (jitted) against eager PyTorch on the same transformers model.

BENCHMARKS.md W2: the 55M Llama-shaped reference model (vocab 32000, hidden 512, MLP 1408,
8 layers, 8 query / 2 KV heads, untied, float32); 8 pairs of 64 prompt + 192 response tokens;
one AdamW step (gradient norm clipped to 1) on the sigmoid DPO loss with precomputed reference
log-probs. The same weights go to both sides through an HF folder.

Ours: `eva_jax.train.make_train_step`, timed after compilation; the LM head runs only at the
192 response positions of each row. The peer: `LlamaForCausalLM` full logits, log_softmax,
gather, masked sum over the response -- what a PyTorch user writes -- then backward, clipping,
`torch.optim.AdamW.step`. After one warm-up step each, the two alternate step by step (the
machine is shared). Prints one JSON line: median seconds per step of each, the ratio
(peer / ours, > 1 means we are faster), an MFU estimate for each against the CPU roof measured
in the same run (`train.cpu_peak_flops`), both first-step losses and the largest difference of
their summed log-probs. Also each side's median CPU seconds (user + sys, all threads) per step
and the load average: on a shared machine the CPU-time ratio is the steadier figure.

  python experiments/benchmarks/w2_dpo_step.py [--steps 3] [--impl auto]
"""
import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from eva_jax import context, logprobs, sharding, train, train_state
from eva_jax.models import hf

PAIRS, PROMPT, RESPONSE, BETA, LR = 8, 64, 192, 0.1, 5e-7


def _torch_model():
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
      tie_word_embeddings=False)
  return transformers.LlamaForCausalLM(config).float().train()


def _pair_batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = lambda n: [rng.integers(3, 32000, n).tolist() for _ in range(PAIRS)]
  return logprobs.make_pair_batch(ids(PROMPT), ids(RESPONSE), ids(RESPONSE),
                                  max_length=PROMPT + RESPONSE, max_prompt_length=PROMPT,
                                  pad_id=0)


def _torch_step(model, optimizer, batch):
  """One eager step; returns (loss, summed response log-probs [2B])."""
  tokens = torch.from_numpy(np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]]))
  mask = torch.from_numpy(np.concatenate([batch["chosen_mask"], batch["rejected_mask"]]))
  loss_mask = torch.from_numpy(np.concatenate(
      [batch["chosen_loss_mask"], batch["rejected_loss_mask"]])).float()
  logits = model(input_ids=tokens.long(), attention_mask=mask.long()).logits
  logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
  logp = torch.gather(logp, 2, tokens[:, 1:, None].long()).squeeze(2)
  summed = (logp * loss_mask[:, 1:]).sum(1)
  chosen, rejected = summed[:PAIRS], summed[PAIRS:]
  ref_c, ref_r = torch.from_numpy(batch["ref_chosen"]), torch.from_numpy(batch["ref_rejected"])
  loss = -torch.nn.functional.logsigmoid(BETA * ((chosen - ref_c) - (rejected - ref_r))).mean()
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  optimizer.step()
  return loss.item(), summed.detach().numpy()


def main():
  context.skip_absent_tpu()  # No libtpu start-up errors on a CPU machine's stderr.
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
  parser.add_argument("--impl", default="auto", help="kernels.target_logprobs impl")
  args = parser.parse_args()

  model = _torch_model()
  with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path, safe_serialization=True)
    config, params = hf.load(path)
  batch = _pair_batch()
  batch = logprobs.with_reference([batch], *logprobs.reference_logprobs(config, params, [batch],
                                                                        impl=args.impl))[0]

  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  opt_cfg = train_state.OptimizerConfig(learning_rate=LR, total_steps=100, warmup_ratio=0.0)
  optimizer = train_state.make_optimizer(opt_cfg)
  step = train.make_train_step(config, optimizer, mesh,
                               train.LossConfig("dpo", beta=BETA, logprob_impl=args.impl))
  state = train_state.init_train_state(config, optimizer, mesh, params=params)
  del params
  torch_opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

  def ours_step():
    nonlocal state
    state, metrics = step(state, batch)
    return float(metrics["loss"])   # waits for the step

  start = time.perf_counter()
  first_loss = ours_step()
  compile_s = time.perf_counter() - start
  peer_loss, peer_logps = _torch_step(model, torch_opt, batch)
  # The machine is shared: alternate the two so that both see the same background load.
  ours_times, peer_times, ours_cpu, peer_cpu = [], [], [], []
  cpu_seconds = lambda: sum(os.times()[:2])  # noqa: E731  (user + sys of every thread)
  for _ in range(args.steps):
    start, cpu = time.perf_counter(), cpu_seconds()
    ours_step()
    ours_times.append(time.perf_counter() - start)
    ours_cpu.append(cpu_seconds() - cpu)
    start, cpu = time.perf_counter(), cpu_seconds()
    _torch_step(model, torch_opt, batch)
    peer_times.append(time.perf_counter() - start)
    peer_cpu.append(cpu_seconds() - cpu)
  ours_s, peer_s = float(np.median(ours_times)), float(np.median(peer_times))
  ours_cpu_s, peer_cpu_s = float(np.median(ours_cpu)), float(np.median(peer_cpu))
  ours_logps = np.stack([batch["ref_chosen"], batch["ref_rejected"]]).reshape(-1)

  roof = train.cpu_peak_flops()   # this machine's float32 matmul roof, measured now
  tokens = 2 * PAIRS * (PROMPT + RESPONSE)
  flops = 3.0 * config.flops_per_token(PROMPT + RESPONSE) * tokens
  print(json.dumps({
      "workload": "W2", "impl": args.impl, "backend": jax.default_backend(),
      "steps": args.steps, "ours_s_per_step": round(ours_s, 3),
      "ours_step_times": [round(t, 2) for t in ours_times],
      "peer_step_times": [round(t, 2) for t in peer_times],
      "peer_s_per_step": round(peer_s, 3), "ratio": round(peer_s / ours_s, 3),
      "ours_cpu_s_per_step": round(ours_cpu_s, 2), "peer_cpu_s_per_step": round(peer_cpu_s, 2),
      "cpu_ratio": round(peer_cpu_s / ours_cpu_s, 3),
      "load_average": [round(x, 2) for x in os.getloadavg()],
      "ours_compile_and_first_step_s": round(compile_s, 1),
      "cpu_roof_gflop_s": round(roof / 1e9, 1),
      "ours_mfu": round(flops / ours_s / roof, 3), "peer_mfu": round(flops / peer_s / roof, 3),
      "ours_first_loss": first_loss, "peer_first_loss": peer_loss,
      # Our reference log-probs (the policy before any step) against the peer's first forward.
      "logp_max_abs_diff": float(np.abs(ours_logps - peer_logps).max()),
  }))


if __name__ == "__main__":
  main()
