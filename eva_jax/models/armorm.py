"""The ArmoRM head (RLHFlow/ArmoRM-Llama3-8B-v0.1, the eva paper's default reward model).

ArmoRM is a Llama 3 8B backbone (`model.*` tensors, as in LlamaForSequenceClassification) with a
custom head, `LlamaForRewardModelWithGating` in the checkpoint's modeling_custom.py. With h the
final normed hidden states and O = num_objectives (19):

  rewards_BxO = h[last token] @ W_reg                       regression_layer.weight [O, D], no bias
  x_BxD       = h[gating position]                          see `gating_position`
  x           = relu(x @ W_i + b_i), i < n_hidden           gating.layers.{i}.{weight,bias}
  logits_BxO  = x @ W_n + b_n                               gating.layers.{n_hidden}
  gate_BxO    = softmax(logits / temperature) * logit_scale  gating.logit_scale [1]
  score_B     = sum_o gate * (rewards @ M)                  reward_transform_matrix M [O, O]

config.json carries num_objectives (19), gating_temperature (10), gating_hidden_dim (1024) and
gating_n_hidden (3). The gating position is where the last occurrence of the token pattern
<|eot_id|><|start_header_id|>assistant<|end_header_id|>"\n\n" starts: the end of the last user
turn, so the gate depends on the prompt only.

What is here: the head as a pure function over the backbone's hidden states, the conversion of
the published head tensors, and the host-side gating position. What loading a checkpoint still
needs is in `hf.load` (see the closing note of the reward issue): accept the architecture
`LlamaForRewardModelWithGating` as a Llama backbone without a head, and hand back the head
tensors listed in `HEAD_TENSORS` instead of refusing them as unexpected.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# tokenizer.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n") in Llama 3.
LLAMA3_GATING_PATTERN = (128009, 128006, 78191, 128007, 271)


@dataclasses.dataclass(frozen=True)
class ArmoHeadConfig:
  num_objectives: int = 19
  temperature: float = 10.0
  hidden_dim: int = 1024
  n_hidden: int = 3
  gating_pattern: tuple[int, ...] = LLAMA3_GATING_PATTERN


def head_config_from_hf(hf: dict) -> ArmoHeadConfig:
  """The head's settings from an ArmoRM config.json dict (the published defaults if absent)."""
  arch = (hf.get("architectures") or [None])[0]
  if arch != "LlamaForRewardModelWithGating":
    raise ValueError(f"not an ArmoRM config: architectures[0] is {arch!r}, expected "
                     "'LlamaForRewardModelWithGating'")
  return ArmoHeadConfig(num_objectives=int(hf.get("num_objectives", 19)),
                        temperature=float(hf.get("gating_temperature", 10)),
                        hidden_dim=int(hf.get("gating_hidden_dim", 1024)),
                        n_hidden=int(hf.get("gating_n_hidden", 3)))


def head_tensor_names(head: ArmoHeadConfig) -> list[str]:
  """Names of the head tensors in the checkpoint (everything that is not `model.*`)."""
  names = ["regression_layer.weight", "reward_transform_matrix", "gating.logit_scale"]
  for i in range(head.n_hidden + 1):
    names += [f"gating.layers.{i}.weight", f"gating.layers.{i}.bias"]
  return names


def head_params_from_tensors(head: ArmoHeadConfig, tensors: Mapping[str, np.ndarray],
                             hidden_size: int, dtype=jnp.float32) -> dict:
  """Our head params from the checkpoint's tensors (torch Linear weights are [out, in]).

  Returns {"regression": [D, O], "gating_w": [[in, out]...], "gating_b": [[out]...],
  "logit_scale": [], "transform": [O, O]}; shapes are checked against the config.
  """
  o, h = head.num_objectives, head.hidden_dim
  dims = [hidden_size] + [h] * head.n_hidden + [o]
  expected = {"regression_layer.weight": (o, hidden_size), "reward_transform_matrix": (o, o),
              "gating.logit_scale": (1,)}
  for i in range(head.n_hidden + 1):
    expected[f"gating.layers.{i}.weight"] = (dims[i + 1], dims[i])
    expected[f"gating.layers.{i}.bias"] = (dims[i + 1],)
  for name, shape in expected.items():
    if name not in tensors:
      raise ValueError(f"ArmoRM head: missing tensor {name!r}")
    if tuple(np.shape(tensors[name])) != shape:
      raise ValueError(f"ArmoRM head: tensor {name!r} has shape {np.shape(tensors[name])}, "
                       f"config implies {shape}")
  get = lambda name: jnp.asarray(np.asarray(tensors[name], np.float32), dtype)  # noqa: E731
  return {
      "regression": get("regression_layer.weight").T,
      "gating_w": [get(f"gating.layers.{i}.weight").T for i in range(head.n_hidden + 1)],
      "gating_b": [get(f"gating.layers.{i}.bias") for i in range(head.n_hidden + 1)],
      "logit_scale": get("gating.logit_scale")[0],
      "transform": get("reward_transform_matrix"),
  }


def gating_position(ids: Sequence[int], pattern: Sequence[int] = LLAMA3_GATING_PATTERN) -> int:
  """Index where the last occurrence of `pattern` starts in `ids` (one unpadded sequence)."""
  ids, n = list(ids), len(pattern)
  for start in range(len(ids) - n, -1, -1):
    if ids[start:start + n] == list(pattern):
      return start
  raise ValueError(f"ArmoRM: gating pattern {tuple(pattern)} not found in a sequence of "
                   f"{len(ids)} tokens (is it a Llama 3 chat with an assistant turn?)")


def head_scores(head: ArmoHeadConfig, head_params: dict, hidden_BxTxD: jax.Array,
                attention_mask_BxT: jax.Array, gate_pos_B: jax.Array) -> tuple[jax.Array, ...]:
  """(score [B], rewards [B, O], gate [B, O]) from the backbone's final hidden states.

  The rewards are read at each row's rightmost real token (either padding side);
  `gate_pos_B` indexes the gating token within the padded row. All head math is float32.
  """
  mask = attention_mask_BxT.astype(jnp.int32)
  last_B = mask.shape[-1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
  hidden = hidden_BxTxD.astype(jnp.float32)
  last_BxD = jnp.take_along_axis(hidden, last_B[:, None, None], axis=1)[:, 0]
  x_BxD = jnp.take_along_axis(hidden, gate_pos_B[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  rewards_BxO = last_BxD @ head_params["regression"].astype(jnp.float32)
  for i, (w, b) in enumerate(zip(head_params["gating_w"], head_params["gating_b"])):
    x_BxD = x_BxD @ w.astype(jnp.float32) + b.astype(jnp.float32)
    if i < head.n_hidden:
      x_BxD = jax.nn.relu(x_BxD)
  gate_BxO = jax.nn.softmax(x_BxD / head.temperature, axis=-1)
  gate_BxO = gate_BxO * head_params["logit_scale"].astype(jnp.float32)
  adjusted_BxO = rewards_BxO @ head_params["transform"].astype(jnp.float32)
  return jnp.sum(gate_BxO * adjusted_BxO, axis=-1), rewards_BxO, gate_BxO
