"""ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1), the eva paper's default reward model.

ArmoRM is a Llama 3 8B backbone (`model.*` tensors) with a custom head, published as remote code
(`LlamaForRewardModelWithGating` in the checkpoint's modeling_custom.py). With h the final normed
hidden states and O = num_objectives (19):

  rewards_BxO = h[last token] @ W_reg                       regression_layer.weight [O, D], no bias
  x_BxD       = h[gating position]                          see `gating_position`
  x           = relu(x @ W_i + b_i), i < n_hidden           gating.layers.{i}.{weight,bias}
  logits_BxO  = x @ W_n + b_n                               gating.layers.{n_hidden}
  gate_BxO    = softmax(logits / temperature) * logit_scale  gating.logit_scale [1]
  score_B     = sum_o gate * (rewards @ M)                  reward_transform_matrix M [O, O]

config.json carries num_objectives (19), gating_temperature (10), gating_hidden_dim (1024) and
gating_n_hidden (3). The gating position is where the last occurrence of the token pattern
<|eot_id|><|start_header_id|>assistant<|end_header_id|>"\n\n" starts: the end of the last user
turn, so the gate depends on the prompt only. The published forward reads the rewards at the
token before the first pad; we read them at each row's rightmost real token, the same place for
right padding and the right place for left padding too.

Our layout: the backbone plus the regression layer is an O-label Llama sequence classifier
(`hf.load` maps regression_layer.weight onto `score`, so `models.forward` gives the O rewards);
the rest of the head is a separate pytree {"gating_w": [[in, out]...], "gating_b": [[out]...],
"logit_scale": [], "transform": [O, O]}, kept in float32 (it is tiny, and its softmax and sums
are where bfloat16 would cost most).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eva_jax import models
from eva_jax.models import hf as hf_lib

ARCHITECTURE = "LlamaForRewardModelWithGating"
# The text of the gating pattern, and its ids in Llama 3's tokenizer (as the published code has
# them, hard-coded).
GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
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
  if arch != ARCHITECTURE:
    raise ValueError(f"not an ArmoRM config: architectures[0] is {arch!r}, expected "
                     f"{ARCHITECTURE!r}")
  return ArmoHeadConfig(num_objectives=int(hf.get("num_objectives", 19)),
                        temperature=float(hf.get("gating_temperature", 10)),
                        hidden_dim=int(hf.get("gating_hidden_dim", 1024)),
                        n_hidden=int(hf.get("gating_n_hidden", 3)))


def head_tensor_names(head: ArmoHeadConfig) -> list[str]:
  """The head's tensors besides regression_layer.weight (which loads as the backbone's `score`)."""
  names = ["reward_transform_matrix", "gating.logit_scale"]
  for i in range(head.n_hidden + 1):
    names += [f"gating.layers.{i}.weight", f"gating.layers.{i}.bias"]
  return names


def head_params_from_tensors(head: ArmoHeadConfig, tensors: Mapping[str, np.ndarray],
                             hidden_size: int) -> dict:
  """Our float32 head params from the checkpoint's tensors (torch Linear weights are [out, in]);
  shapes are checked against the config."""
  o, h = head.num_objectives, head.hidden_dim
  dims = [hidden_size] + [h] * head.n_hidden + [o]
  expected = {"reward_transform_matrix": (o, o), "gating.logit_scale": (1,)}
  for i in range(head.n_hidden + 1):
    expected[f"gating.layers.{i}.weight"] = (dims[i + 1], dims[i])
    expected[f"gating.layers.{i}.bias"] = (dims[i + 1],)
  for name, shape in expected.items():
    if name not in tensors:
      raise ValueError(f"ArmoRM head: missing tensor {name!r}")
    if tuple(np.shape(tensors[name])) != shape:
      raise ValueError(f"ArmoRM head: tensor {name!r} has shape {np.shape(tensors[name])}, "
                       f"config implies {shape}")
  get = lambda name: jnp.asarray(np.asarray(tensors[name], np.float32))  # noqa: E731
  return {
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


def gating_positions(tokens_BxT: jax.Array, attention_mask_BxT: jax.Array,
                     pattern: Sequence[int]) -> jax.Array:
  """`gating_position` of every padded row (either padding side), int32 [B].

  A row without the pattern gets T - 1; callers check each sequence on the host first.
  """
  valid_BxT = attention_mask_BxT.astype(bool)
  match_BxT = valid_BxT
  for k, token in enumerate(pattern):
    # Whether token t + k is real and equals pattern[k]; false past the end.
    ahead_BxT = jnp.pad(tokens_BxT[:, k:] == token, ((0, 0), (0, k)))
    real_BxT = jnp.pad(valid_BxT[:, k:], ((0, 0), (0, k)))
    match_BxT = match_BxT & ahead_BxT & real_BxT
  t = tokens_BxT.shape[-1]
  return (t - 1 - jnp.argmax(match_BxT[:, ::-1], axis=-1)).astype(jnp.int32)


def gated_score(head: ArmoHeadConfig, head_params: dict, rewards_BxO: jax.Array,
                prompt_BxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(score [B], gate [B, O]) from the O rewards and the hidden state at the gating position."""
  x = prompt_BxD.astype(jnp.float32)
  for i, (w, b) in enumerate(zip(head_params["gating_w"], head_params["gating_b"])):
    x = x @ w.astype(jnp.float32) + b.astype(jnp.float32)
    if i < head.n_hidden:
      x = jax.nn.relu(x)
  gate_BxO = jax.nn.softmax(x / head.temperature, axis=-1)
  gate_BxO = gate_BxO * head_params["logit_scale"].astype(jnp.float32)
  adjusted_BxO = rewards_BxO.astype(jnp.float32) @ head_params["transform"].astype(jnp.float32)
  return jnp.sum(gate_BxO * adjusted_BxO, axis=-1), gate_BxO


def head_scores(head: ArmoHeadConfig, head_params: dict, score_DxO: jax.Array,
                hidden_BxTxD: jax.Array, attention_mask_BxT: jax.Array,
                gate_pos_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(score [B], rewards [B, O], gate [B, O]) from the backbone's final hidden states.

  The rewards (`score_DxO`, the regression layer) are read at each row's rightmost real token;
  `gate_pos_B` indexes the gating token within the padded row. All head math is float32.
  """
  mask = attention_mask_BxT.astype(jnp.int32)
  last_B = mask.shape[-1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
  hidden = hidden_BxTxD.astype(jnp.float32)
  last_BxD = jnp.take_along_axis(hidden, last_B[:, None, None], axis=1)[:, 0]
  prompt_BxD = jnp.take_along_axis(hidden, gate_pos_B[:, None, None].astype(jnp.int32),
                                   axis=1)[:, 0]
  rewards_BxO = last_BxD @ score_DxO.astype(jnp.float32)
  score_B, gate_BxO = gated_score(head, head_params, rewards_BxO, prompt_BxD)
  return score_B, rewards_BxO, gate_BxO


def outputs(config: models.ModelConfig, head: ArmoHeadConfig, params: dict,
            tokens_BxT: jax.Array, attention_mask_BxT: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(score [B], rewards [B, O], gate [B, O]) of padded chats; params {"model", "head"}."""
  hidden_BxTxD = models.forward_hidden(config, params["model"], tokens_BxT, attention_mask_BxT)
  gate_pos_B = gating_positions(tokens_BxT, attention_mask_BxT, head.gating_pattern)
  return head_scores(head, params["head"], params["model"]["score"], hidden_BxTxD,
                     attention_mask_BxT, gate_pos_B)


def forward(config: models.ModelConfig, head: ArmoHeadConfig, params: dict,
            tokens_BxT: jax.Array, attention_mask_BxT: jax.Array) -> jax.Array:
  """ArmoRM's score, float32 [B] (what its published forward returns as `score` and `logits`)."""
  return outputs(config, head, params, tokens_BxT, attention_mask_BxT)[0]


def load(path: str, *, dtype: str = "float32", compute_dtype: Optional[str] = None,
         shardings: Optional[Callable[[models.ModelConfig], dict]] = None
         ) -> tuple[models.ModelConfig, dict, ArmoHeadConfig, dict]:
  """(backbone config, backbone params, head config, head params) of a local ArmoRM folder.

  The backbone (an O-label Llama classifier) loads as `hf.load` loads any model, `shardings`
  included; the head params are float32 on the default device (place them yourself on a mesh).
  A missing or unexpected tensor, or one of the wrong shape, is an error naming it.
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: missing (not a Hugging Face model folder)")
  with open(config_path) as f:
    head = head_config_from_hf(json.load(f))
  config, params, extras = hf_lib.load_with_extras(
      path, lambda hf: head_tensor_names(head_config_from_hf(hf)), dtype=dtype,
      compute_dtype=compute_dtype, shardings=shardings)
  try:
    head_params = head_params_from_tensors(head, extras, config.hidden_size)
  except ValueError as err:
    raise ValueError(f"{path}: {err}") from None
  return config, params, head, head_params
