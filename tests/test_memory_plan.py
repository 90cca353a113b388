"""experiments/memory_plan.py at a small size: a tiny model, the 8 fake CPU devices, abstract
inputs only. The byte counts are checked against sizes computed by hand from the shapes and
shardings (argument = every state and batch array's per-device shard; the decode's aliased
output = the donated KV cache). The cost and roofline figures are compiled for a TPU v5e with
libtpu (no TPU attached) and checked against FLOPs and bytes counted by hand."""
import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eva_jax import models, sampling, sharding, train_state
from experiments import hlo_cost, memory_plan, roofline

CONFIG = models.tiny("llama", vocab_size=512, num_layers=2)
PAIRS, SEQ = 8, 32


def _shard_bytes(tree) -> int:
  return sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape))
             for x in jax.tree.leaves(tree))


def _mesh(fsdp: int):
  return sharding.make_mesh(1, fsdp, 1, devices=jax.devices()[:fsdp])


@pytest.fixture(scope="module")
def train_memory():
  """Per-device memory of the tiny preference update on 2 and on 8 devices."""
  out = {}
  for fsdp in (2, 8):
    mesh = _mesh(fsdp)
    compiled = memory_plan.compile_train_step(CONFIG, mesh, num_pairs=PAIRS, seq_len=SEQ)
    optimizer = train_state.make_optimizer(train_state.OptimizerConfig(total_steps=1000))
    inputs = (memory_plan.abstract_train_state(CONFIG, optimizer, mesh),
              memory_plan.abstract_pair_batch(mesh, PAIRS, SEQ))
    out[fsdp] = (memory_plan.memory_of(compiled), _shard_bytes(inputs), _shard_bytes(inputs[0]))
  return out


def test_train_step_bytes_per_device(train_memory):
  for fsdp, (mem, input_bytes, state_bytes) in train_memory.items():
    assert all(mem[k] > 0 for k in ("argument", "output", "alias", "temp")), (fsdp, mem)
    assert mem["argument"] == input_bytes, fsdp
    # The state is donated: its buffers are reused for the new state, not added to it.
    assert state_bytes * 0.99 <= mem["alias"] <= state_bytes, fsdp
    assert mem["step"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]


def test_more_devices_hold_less_per_device(train_memory):
  (mem2, _, _), (mem8, _, _) = train_memory[2], train_memory[8]
  assert mem8["argument"] < mem2["argument"] / 3  # fsdp 8 vs 2: the state is split 4x finer.
  assert mem8["step"] < mem2["step"]


def test_sampling_bytes_per_device():
  mesh = _mesh(8)
  prompts, prompt_len, samples, new_tokens = 8, 8, 2, 4
  prefill, decode = memory_plan.compile_sampling(CONFIG, mesh, num_prompts=prompts,
                                                 prompt_len=prompt_len, num_samples=samples,
                                                 max_new_tokens=new_tokens)
  pre, dec = memory_plan.memory_of(prefill), memory_plan.memory_of(decode)
  for mem in (pre, dec):
    assert all(mem[k] > 0 for k in ("argument", "output", "temp")), mem
  # The KV cache the decode loop updates in place, by hand: prompt slots [L, B, K, P, E] and
  # generated slots [L, B, N, K, generated_slots(T), E], keys and values, split over the 8
  # devices.
  c = CONFIG
  slots = prompts * prompt_len + prompts * samples * sampling.generated_slots(new_tokens)
  cache_bytes = 2 * c.num_layers * slots * c.num_kv_heads * c.head_dim * 4 // 8
  assert dec["alias"] == cache_bytes
  assert dec["argument"] >= cache_bytes + memory_plan.params_bytes_per_device(CONFIG, mesh)


def test_params_bytes_shrink_with_the_mesh():
  nine_b = memory_plan.paper_policy()
  full = 4 * models.param_count(nine_b)
  assert memory_plan.params_bytes_per_device(nine_b, _mesh(1)) == full
  per_device = memory_plan.params_bytes_per_device(nine_b, _mesh(8))
  # Everything but the (replicated) norm scales is split 8 ways along `embed`.
  norms = 4 * nine_b.hidden_size * (4 * nine_b.num_layers + 1)
  assert per_device == (full - norms) // 8 + norms


def test_reward_forward_bytes_per_device():
  """The reward program the plan compiles: its arguments are the placed params and two [8, 16]
  int32 inputs (tokens, mask) split over the 8 batch shards; one float32 score per row comes
  back replicated."""
  config = models.tiny("llama", vocab_size=512, num_layers=2, num_labels=1)
  mesh = _mesh(8)
  mem = memory_plan.memory_of(memory_plan.compile_reward_forward(config, mesh, batch=8,
                                                                 length=16))
  rows_bytes = 2 * 8 * 16 * 4 // 8
  assert mem["argument"] == memory_plan.params_bytes_per_device(config, mesh) + rows_bytes
  assert mem["output"] == 8 * 4


# ---------------------------------------------------------------------------------------------
# Cost and roofline (experiments/hlo_cost.py, roofline.roofline)


def test_model_flops_are_6_n_tokens():
  """An update's model FLOPs: 6·N·tokens for a tied LM (Gemma 2 9B) with logits everywhere; an
  untied one's embedding lookup costs nothing; a classifier has no LM head."""
  tokens = 2 * 64 * 2048
  nine_b = memory_plan.paper_policy()
  n = models.param_count(nine_b)
  assert 3 * roofline.forward_flops(nine_b, tokens, tokens) == 6 * n * tokens
  table = CONFIG.vocab_size * CONFIG.hidden_size  # Untied: an input table and an LM head.
  assert roofline.forward_flops(CONFIG, 10, 3) == 2 * (
      models.param_count(CONFIG) - 2 * table) * 10 + 2 * table * 3
  scorer = models.tiny("llama", vocab_size=512, num_layers=2, num_labels=1)
  assert roofline.forward_flops(scorer, 10, 0) == 2 * (
      models.param_count(scorer) - table) * 10


@pytest.fixture(scope="module")
def tpu_mesh():
  """4 chips of a TPU v5e slice, for compiles only."""
  pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[tpu]'")
  return sharding.make_mesh(1, 4, 1, devices=sharding.tpu_topology_devices("v5e:2x2")[:4])


def test_matmul_cost_by_hand(tpu_mesh):
  """bf16 [M, K] @ [K, N], rows split over 4 chips: per chip 2·(M/4)·K·N FLOPs and its operands
  and result moved once. In a 10-step loop the TPU compiler's cost_analysis counts one step;
  hlo_cost counts all ten."""
  m, k, n = 1024, 2048, 4096
  rows = NamedSharding(tpu_mesh, P("fsdp"))
  a = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=rows)
  b = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=sharding.replicated(tpu_mesh))
  compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  cost = hlo_cost.program_cost(compiled.as_text())
  assert cost.flops == compiled.cost_analysis()["flops"] == 2 * (m // 4) * k * n
  assert cost.bytes == 2 * (m // 4 * k + k * n + m // 4 * n)
  square = jax.ShapeDtypeStruct((k, k), jnp.bfloat16, sharding=sharding.replicated(tpu_mesh))
  looped = jax.jit(lambda a, b: jax.lax.fori_loop(0, 10, lambda i, x: x @ b, a)).lower(
      a, square).compile()
  cost = hlo_cost.program_cost(looped.as_text())
  assert cost.loops == (10,)
  assert cost.flops == 10 * 2 * (m // 4) * k * k
  assert looped.cost_analysis()["flops"] == 2 * (m // 4) * k * k


def test_multiline_attributes_do_not_end_the_computation():
  """A Pallas call's kernel_metadata runs over lines, one starting with "}}" (the splash
  attention kernels): the instructions after it are still counted, 2·M·K·N for the dot."""
  hlo = "\n".join([
      "HloModule m", "",
      "ENTRY %main (p0: f32[4,8], p1: f32[8,16]) -> f32[4,16] {",
      "  %p0 = f32[4,8]{1,0} parameter(0)",
      "  %p1 = f32[8,16]{1,0} parameter(1)",
      '  %cc = f32[4,8]{1,0} custom-call(%p0), custom_call_target="tpu_custom_call", '
      "frontend_attributes={kernel_metadata={",
      '"xprof_metadata":"{\\"block_q\\": 512}"',
      '}}, backend_config={"flag_configs":[]}',
      "  ROOT %dot = f32[4,16]{1,0} dot(%cc, %p1), lhs_contracting_dims={1}, "
      "rhs_contracting_dims={0}",
      "}", ""])
  assert hlo_cost.program_cost(hlo).flops == 2 * 4 * 8 * 16


def test_update_roofline_counts_every_micro_batch(tpu_mesh):
  """The tiny update in 1 and in 2 micro-batches does the same matmul work, which hlo_cost
  finds (the compiler's own count halves); it executes at least the model FLOPs; the MFU is the
  model FLOPs over the roofline time at the v5e peak."""
  tokens = 2 * PAIRS * SEQ
  model_flops = 3 * roofline.forward_flops(CONFIG, tokens, tokens)
  costs = [roofline.roofline(memory_plan.compile_train_step(
      CONFIG, tpu_mesh, num_pairs=PAIRS, seq_len=SEQ, accum_steps=accum), "v5e", 4, model_flops)
      for accum in (1, 2)]
  one, two = costs
  assert one["flops"] == two["flops"] >= one["model_flops"] == model_flops / 4
  assert two["compiler_flops_once"] < 0.6 * one["compiler_flops_once"]
  peak_flops, peak_bw = roofline.PEAKS["v5e"]
  for c in costs:
    assert c["roofline_s"] == max(c["flops"] / peak_flops, c["bytes"] / peak_bw)
    assert c["mfu"] == pytest.approx(model_flops / 4 / (c["roofline_s"] * peak_flops))


def test_decode_roofline_is_per_step(tpu_mesh):
  """The decode program, a loop that can stop early, counted as max_new_tokens - 1 steps and
  divided by them: 2·N FLOPs per row a step (plus attention over the slots); its bandwidth fraction
  uses the bytes a step must read."""
  prompts, prompt_len, samples, new_tokens = 4, 8, 2, 4
  _, decode = memory_plan.compile_sampling(CONFIG, tpu_mesh, num_prompts=prompts,
                                           prompt_len=prompt_len, num_samples=samples,
                                           max_new_tokens=new_tokens)
  rows = prompts * samples
  model_bytes = roofline.decode_model_bytes(CONFIG, prompts, prompt_len, samples, new_tokens)
  c = CONFIG
  params_bytes = 4 * models.param_count(c)  # The tiny config computes in float32.
  kv_slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
  assert model_bytes == params_bytes + kv_slot * (prompts * prompt_len + rows * 1.5)
  cost = roofline.roofline(decode, "v5e", 4, roofline.forward_flops(CONFIG, rows, rows),
                              model_bytes, steps=new_tokens - 1)
  assert new_tokens - 1 in cost["loops"]
  # Attention by hand: QK and PV, 4·H·E FLOPs a slot (prompt, generated, the token itself) per
  # row and layer, over the 4 chips.
  slots = prompt_len + sampling.generated_slots(new_tokens, "tpu") + 1
  attention = 4 * c.num_heads * c.head_dim * slots * c.num_layers * rows / 4
  assert cost["model_flops"] <= cost["flops"] <= 1.1 * (cost["model_flops"] + attention)
  assert cost["bw_fraction"] == pytest.approx(
      model_bytes / 4 / (cost["roofline_s"] * roofline.PEAKS["v5e"][1]))


def test_resident_bytes_count_what_the_runner_keeps():
  """By hand from the parameter counts, 8 devices: the offline update holds the reward model
  beside its state (θ_t is donated into it), sampling θ_t too, scoring θ_t; the online update
  the reward model and θ_0 in bfloat16, its sampling also the state's params and moments."""
  mesh = _mesh(8)
  policy = 4 * models.param_count(memory_plan.paper_policy()) / 8
  rm = 2 * models.param_count(memory_plan.REWARD_MODEL) / 8

  def resident(kind, loop="offline"):
    w = memory_plan.Workload("x", kind, "v5p-8", (1, 8, 1), loop=loop)
    return memory_plan.resident_bytes(w, mesh)
  assert resident("train") == pytest.approx(rm, rel=1e-3)
  assert resident("sample") == pytest.approx(policy + rm, rel=1e-3)
  assert resident("score") == pytest.approx(policy, rel=1e-3)
  assert resident("rloo", "online") == pytest.approx(policy / 2 + rm, rel=1e-3)
  assert resident("sample", "online") == pytest.approx(3.5 * policy + rm, rel=1e-3)


def test_decode_walk_over_generated_blocks_is_counted_at_its_mean(tpu_mesh):
  """On TPU a decode step reads only the generated blocks that hold tokens (a loop whose trip
  count the HLO cannot show). hlo_cost counts that loop at the mean over a generation, given
  by name: 200 new tokens, 256 slots in blocks of 128 -> steps with 0 written slots read 0
  blocks, 1-128 one, 129-198 two: (128 + 2 * 70) / 199. Each extra trip adds, per layer, the
  QK and PV products of one block, 4·H·E FLOPs a slot and row, over the 4 chips. (Bytes are
  not checked here: at this size the compiler keeps the cache in on-chip memory.)"""
  from eva_jax.models import attention
  prompts, samples, new_tokens = 4, 2, 200
  gen_len = sampling.generated_slots(new_tokens, "tpu")
  assert gen_len == 256 and attention.walks_generated_blocks("tpu", gen_len)
  mean = attention.mean_walked_blocks(new_tokens, gen_len)
  assert mean == pytest.approx((128 + 2 * 70) / 199)
  _, decode = memory_plan.compile_sampling(CONFIG, tpu_mesh, num_prompts=prompts, prompt_len=8,
                                           num_samples=samples, max_new_tokens=new_tokens)
  text = decode.as_text()
  named = hlo_cost.program_cost(text, new_tokens - 1, {attention.GEN_WALK_SCOPE: mean})
  once = hlo_cost.program_cost(text, new_tokens - 1)
  assert mean in named.loops and mean not in once.loops
  c = CONFIG
  block_flops = 4 * c.num_heads * c.head_dim * attention.GEN_BLOCK * prompts * samples / 4
  assert named.flops - once.flops == pytest.approx(
      (mean - 1) * (new_tokens - 1) * c.num_layers * block_flops, rel=1e-6)
