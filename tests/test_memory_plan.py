"""experiments/memory_plan.py at a small size: a tiny model, the 8 fake CPU devices, abstract
inputs only. The byte counts are checked against sizes computed by hand from the shapes and
shardings (argument = every state and batch array's per-device shard; the decode's aliased
output = the donated KV cache)."""
import math

import jax
import pytest

from eva_jax import models, sharding, train_state
from experiments import memory_plan

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
  # generated slots [L, B*N, K, T-1, E], keys and values, split over the 8 devices along B.
  c = CONFIG
  slots = prompts * prompt_len + prompts * samples * (new_tokens - 1)
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
