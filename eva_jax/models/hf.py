"""Hugging Face checkpoints: local folders of config.json + *.safetensors, in and out.

`load(path)` reads a `*ForCausalLM` or `*ForSequenceClassification` folder of a family in
`hf_families.HF_FAMILIES` (Llama, Gemma 2, Qwen 2, Mistral; sharded index files too) and returns
(ModelConfig, params); given `shardings` (e.g. `sharding.param_shardings_for(mesh)`) it places
every tensor straight onto its sharding (each device reads only its slice from the memory-mapped
file); `load_with_extras` also hands back a custom head's tensors (ArmoRM: `armorm.load`).
`save(path, config, params)` writes a folder transformers loads. Pickled weights (.bin/.pt) are
refused, never unpickled. Everything family-specific is in `hf_families`.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eva_jax import host, models
from eva_jax.models.config import ModelConfig
from eva_jax.models.hf_families import ACTIVATIONS, HF_FAMILIES, HFFamily
from eva_jax.models.safetensors_io import SafetensorsFile, iter_shards, save_file

SUPPORTED_MODEL_TYPES = tuple(HF_FAMILIES)
# Reward models whose published head is remote code: architecture -> (config.json field holding
# the number of regression outputs, its default, the regression tensor read as our `score`).
# Their other head tensors are read by their own loader through `load_with_extras`
# (`eva_jax.models.armorm.load`).
CUSTOM_REWARD_HEADS = {
    "LlamaForRewardModelWithGating": ("num_objectives", 19, "regression_layer.weight"),
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _family(model_type, where: str) -> HFFamily:
  if model_type not in HF_FAMILIES:
    raise ValueError(f"{where}: unsupported model_type {model_type!r} "
                     f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  return HF_FAMILIES[model_type]


def _rope_from_hf(hf: dict, where: str) -> tuple[float, Optional[tuple]]:
  """(rope_theta, Llama 3.1 scaling or None) from transformers 5 or legacy fields."""
  rope = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
  if rope_type == "llama3":
    src = rope if "factor" in rope else legacy
    return theta, (float(src["factor"]), float(src["low_freq_factor"]),
                   float(src["high_freq_factor"]), int(src["original_max_position_embeddings"]))
  if rope_type != "default":
    raise ValueError(f"{where}: unsupported rope_type {rope_type!r} (default and llama3 only)")
  return theta, None


def config_from_hf(hf: dict, *, where: str = "config.json", dtype: str = "float32",
                   compute_dtype: Optional[str] = None) -> ModelConfig:
  """Translates a transformers config dict; unsupported features are refused by name."""
  model_type = hf.get("model_type")
  family = _family(model_type, where)
  arch = (hf.get("architectures") or [f"{family.architecture}ForCausalLM"])[0]
  if arch.endswith("ForSequenceClassification"):
    num_labels = int(hf.get("num_labels") or len(hf.get("id2label") or {0: 0}))
  elif arch.endswith("ForCausalLM"):
    num_labels = 0
  elif arch in CUSTOM_REWARD_HEADS:
    field, default, _ = CUSTOM_REWARD_HEADS[arch]
    num_labels = int(hf.get(field, default))
  else:
    raise ValueError(f"{where}: unsupported architecture {arch!r} "
                     "(expected *ForCausalLM, *ForSequenceClassification or one of "
                     f"{', '.join(CUSTOM_REWARD_HEADS)})")
  for field, value in family.pinned.items():
    if field in hf and hf[field] != value:
      raise ValueError(f"{where}: field {field}={json.dumps(hf[field])} is not supported for "
                       f"{model_type} (only {json.dumps(value)})")

  heads = int(hf["num_attention_heads"])
  num_layers = int(hf["num_hidden_layers"])
  features = models.FAMILY_FEATURES[model_type](num_layers)
  act = hf.get(family.activation_field) or hf.get("hidden_act")
  if act is not None and act not in ACTIVATIONS:
    raise ValueError(f"{where}: field {family.activation_field}={act!r} is not supported "
                     f"(supported: {', '.join(ACTIVATIONS)})")
  theta, scaling = _rope_from_hf(hf, where)
  eos = hf.get("eos_token_id")
  eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
  fields = dict(
      vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]), num_layers=num_layers,
      num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads), rope_theta=theta,
      rope_llama3_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings",
                                 features.get("tie_embeddings", False))),
      num_labels=num_labels,
      max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
      pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=eos, param_dtype=dtype, dtype=compute_dtype or dtype)
  if act is not None:
    fields["mlp_activation"] = ACTIVATIONS[act]
  fields.update({ours: hf.get(theirs) for theirs, ours in family.fields})
  fields.update(family.read(hf, num_layers))
  return models.family_config(model_type, **fields)


def config_to_hf(config: ModelConfig, dtype: str) -> dict:
  """A transformers config dict for `config` (transformers 5 field names)."""
  family = HF_FAMILIES[config.family]
  head = "ForSequenceClassification" if config.is_reward_model else "ForCausalLM"
  rope = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_llama3_scaling is not None:
    factor, low, high, original = config.rope_llama3_scaling
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=original)
  eos = list(config.eos_token_ids)
  activation = {ours: theirs for theirs, ours in ACTIVATIONS.items()}[config.mlp_activation]
  hf = {
      "architectures": [family.architecture + head], "model_type": config.family,
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
      "rope_parameters": rope, "rope_theta": config.rope_theta,
      "tie_word_embeddings": config.tie_embeddings,
      "max_position_embeddings": config.max_position_embeddings,
      "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "dtype": dtype,
      family.activation_field: activation,
  }
  if config.is_reward_model:
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  hf.update({theirs: getattr(config, ours) for theirs, ours in family.fields})
  hf.update(family.pinned)
  hf.update(family.write(config))
  return hf


# ---------------------------------------------------------------------------------------------
# Tensor names and layouts. Each entry: (our path, HF name, layout, per_layer).
# Layouts: "copy"; "T" (2-D transpose); "in_heads" ([N*E, D] <-> [D, N, E]);
# "out_heads" ([D, H*E] <-> [H, E, D]); "bias_heads" ([N*E] <-> [N, E]).


def _layout(config: ModelConfig, score_name: str = "score.weight"
            ) -> list[tuple[tuple[str, ...], str, str, bool]]:
  base = "model."
  entries = [(("embedding",), base + "embed_tokens.weight", "copy", False),
             (("final_norm", "scale"), base + "norm.weight", "copy", False)]
  if config.is_reward_model:
    entries.append((("score",), score_name, "T", False))
  elif not config.tie_embeddings:
    entries.append((("lm_head",), "lm_head.weight", "T", False))
  layer = base + "layers.{i}."
  for name in ("q", "k", "v"):
    entries.append((("layers", "attn", name), layer + f"self_attn.{name}_proj.weight",
                    "in_heads", True))
    if config.qkv_bias:
      entries.append((("layers", "attn", f"{name}_bias"), layer + f"self_attn.{name}_proj.bias",
                      "bias_heads", True))
  entries.append((("layers", "attn", "o"), layer + "self_attn.o_proj.weight", "out_heads", True))
  for name in ("gate", "up", "down"):
    entries.append((("layers", "mlp", name), layer + f"mlp.{name}_proj.weight", "T", True))
  for ours, theirs in HF_FAMILIES[config.family].layer_norms:
    entries.append((("layers", ours, "scale"), layer + f"{theirs}.weight", "copy", True))
  return entries


def _to_ours(w: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
  if layout in ("T", "in_heads", "out_heads"):
    return w.T.reshape(shape)
  return w.reshape(shape)


def _to_hf(w: np.ndarray, layout: str) -> np.ndarray:
  if layout == "T":
    return w.T
  if layout == "in_heads":
    return w.reshape(w.shape[0], -1).T
  if layout == "out_heads":
    return w.reshape(-1, w.shape[-1]).T
  if layout == "bias_heads":
    return w.reshape(-1)
  return w


def _hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  return tuple(_to_hf(np.empty(shape, np.uint8), layout).shape)


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# load / save


def _open_weights(path: str) -> dict[str, SafetensorsFile]:
  """Maps every tensor name in the folder to the file holding it."""
  files = sorted(os.listdir(path))
  index_path = os.path.join(path, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    shards = {name: SafetensorsFile(os.path.join(path, name)) for name in set(weight_map.values())
              if os.path.exists(os.path.join(path, name))}
    missing = sorted(set(weight_map.values()) - set(shards))
    if missing:
      raise FileNotFoundError(f"{index_path}: lists shard {missing[0]!r}, which is not in {path}")
    return {tensor: shards[file] for tensor, file in weight_map.items()}
  st = [f for f in files if f.endswith(".safetensors")]
  if not st:
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickled:
      raise ValueError(f"{os.path.join(path, pickled[0])}: pickled weights are refused (loading "
                       "them would run arbitrary code); convert the checkpoint to .safetensors")
    raise FileNotFoundError(f"{path}: no *.safetensors weights found")
  out = {}
  for name in st:
    sf = SafetensorsFile(os.path.join(path, name))
    for tensor in sf.keys():
      out[tensor] = sf
  return out


def load(path: str, *, dtype: str = "float32", compute_dtype: Optional[str] = None,
         shardings: Optional[Callable[[ModelConfig], dict]] = None
         ) -> tuple[ModelConfig, dict]:
  """Loads a local HF folder; returns (ModelConfig, params) in `dtype`.

  shardings: config -> a params-shaped pytree of jax Shardings (`sharding.param_shardings_for(
  mesh)`); each parameter is then built with `jax.make_array_from_callback`, so each device
  receives only its own slice, read from the memory-mapped safetensors file.
  """
  config, params, _ = load_with_extras(path, lambda hf: (), dtype=dtype,
                                       compute_dtype=compute_dtype, shardings=shardings)
  return config, params


def load_with_extras(path: str, extra_names: Callable[[dict], Sequence[str]], *,
                     dtype: str = "float32", compute_dtype: Optional[str] = None,
                     shardings: Optional[Callable[[ModelConfig], dict]] = None
                     ) -> tuple[ModelConfig, dict, dict[str, np.ndarray]]:
  """`load`, plus the tensors `extra_names(config.json dict)` names (a custom head), returned
  as host float32 arrays {name: array}; a missing one is an error like a missing weight."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: missing (not a Hugging Face model folder)")
  with open(config_path) as f:
    hf = json.load(f)
  config = config_from_hf(hf, where=config_path, dtype=dtype, compute_dtype=compute_dtype)
  arch = (hf.get("architectures") or [""])[0]
  score_name = CUSTOM_REWARD_HEADS[arch][2] if arch in CUSTOM_REWARD_HEADS else "score.weight"
  weights = _open_weights(path)
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  placement = shardings(config) if shardings is not None else None

  consumed, params = set(), {}
  np_dtype = jnp.dtype(dtype)
  for our_path, hf_name, layout, per_layer in _layout(config, score_name):
    shape = tuple(_get(shapes, our_path).shape)
    layer_shape = shape[1:] if per_layer else shape
    names = [hf_name.format(i=i) for i in range(config.num_layers)] if per_layer else [hf_name]
    expected = _hf_shape(layer_shape, layout)
    for name in names:
      if name not in weights:
        raise ValueError(f"{path}: missing tensor {name!r}")
      got = weights[name].shape(name)
      if got != expected:
        raise ValueError(f"{path}: tensor {name!r} has shape {got}, config.json implies "
                         f"{expected}")
      consumed.add(name)

    def read(index=None, names=names, layout=layout, layer_shape=layer_shape,
             per_layer=per_layer):
      index = index or tuple(slice(None) for _ in range(len(layer_shape) + per_layer))
      if per_layer:
        chosen = names[index[0]]
        parts = [_to_ours(weights[n].get(n), layout, layer_shape)[index[1:]] for n in chosen]
        return np.stack(parts).astype(np_dtype)
      return _to_ours(weights[names[0]].get(names[0]), layout, layer_shape)[index].astype(
          np_dtype)

    if placement is None:
      value = jnp.asarray(read())
    else:
      value = jax.make_array_from_callback(shape, _get(placement, our_path), read)
    _set(params, our_path, value)

  extras = {}
  for name in extra_names(hf):
    if name not in weights:
      raise ValueError(f"{path}: missing tensor {name!r}")
    extras[name] = np.asarray(weights[name].get(name), np.float32)
    consumed.add(name)
  # Tied checkpoints sometimes also carry a copy of the embedding as lm_head.
  ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
  unexpected = sorted(n for n in weights if n not in consumed and n not in ignorable
                      and not n.endswith("rotary_emb.inv_freq"))
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    hint = (f"; {arch} has its own loader (eva_jax.models.armorm.load)"
            if arch in CUSTOM_REWARD_HEADS else "")
    raise ValueError(f"{path}: unexpected tensor {unexpected[0]!r}{more} for {config.family} "
                     f"{'reward model' if config.is_reward_model else 'causal LM'}{hint}")
  return config, params, extras


def save(path: str, config: ModelConfig, params: dict, *, dtype: Optional[str] = None,
         max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json and safetensors (sharded with an index past max_shard_bytes).

  Every process must call it (arrays are gathered); only process 0 writes.
  """
  dtype = dtype or config.param_dtype
  np_dtype = jnp.dtype(dtype)
  tensors = {}
  for our_path, hf_name, layout, per_layer in _layout(config):
    value = host.to_host(_get(params, our_path)).astype(np_dtype)
    if per_layer:
      for i in range(config.num_layers):
        tensors[hf_name.format(i=i)] = np.ascontiguousarray(_to_hf(value[i], layout))
    else:
      tensors[hf_name] = np.ascontiguousarray(_to_hf(value, layout))
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  shards = list(iter_shards(tensors, max_shard_bytes))
  metadata = {"format": "pt"}  # transformers expects this tag on safetensors it loads.
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, name), metadata)
      weight_map.update({t: name for t in shard})
    total = sum(t.nbytes for t in tensors.values())
    _write_json(os.path.join(path, INDEX_FILE),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  _write_json(os.path.join(path, "config.json"), config_to_hf(config, dtype))
  gen = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
         "eos_token_id": list(config.eos_token_ids) or None}
  _write_json(os.path.join(path, "generation_config.json"), gen)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)

