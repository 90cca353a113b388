"""The decoder family against transformers' PyTorch models, and the HF folder round trip."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from eva_jax import models, sharding  # noqa: E402
from eva_jax.models import hf  # noqa: E402
from eva_jax.models.safetensors_io import SafetensorsFile, save_file  # noqa: E402
from tests import hf_fixtures  # noqa: E402

FAMILIES = ["llama", "gemma2", "qwen2", "mistral"]
LENGTHS = [12, 7, 3]  # Gemma's and Mistral's windows are 5, so the long rows cross them.


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
  family = request.param
  model = hf_fixtures.torch_model(family)
  path = hf_fixtures.save_torch_model(model, str(tmp_path_factory.mktemp(family)))
  return family, model, path


def _torch_logits(model, tokens, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.logits.float().numpy()


def test_logits_match_transformers(saved):
  family, model, path = saved
  config, params = hf.load(path)
  assert config.family == family
  tokens, mask = hf_fixtures.ragged_batch(LENGTHS, 12)
  ours = np.asarray(jax.jit(models.forward, static_argnums=0)(config, params, tokens, mask))
  ref = _torch_logits(model, tokens, mask)
  valid = mask.astype(bool)
  diff = np.abs(ours - ref)[valid].max()
  print(f"{family}: max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4


def test_save_round_trip_loads_in_transformers(saved, tmp_path):
  family, model, path = saved
  config, params = hf.load(path)
  out = str(tmp_path / "exported")
  hf.save(out, config, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens, mask = hf_fixtures.ragged_batch(LENGTHS, 12, seed=1)
  diff = np.abs(_torch_logits(reloaded, tokens, mask) - _torch_logits(model, tokens, mask))
  assert diff[mask.astype(bool)].max() <= 1e-5
  config2, params2 = hf.load(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_sharded_index_and_mesh_placement(saved, tmp_path):
  family, _, path = saved
  config, params = hf.load(path)
  out = str(tmp_path / "sharded")
  hf.save(out, config, params, max_shard_bytes=20_000)
  assert os.path.exists(os.path.join(out, hf.INDEX_FILE))
  assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  config2, placed = hf.load(out, shardings=sharding.param_shardings_for(mesh))
  expected = sharding.param_shardings(config2, mesh)
  for got, want, ref in zip(jax.tree.leaves(placed), jax.tree.leaves(expected),
                            jax.tree.leaves(params)):
    assert got.sharding == want
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # At least one parameter really is split across devices.
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(expected))


def test_rules_from_config_override_the_defaults():
  config = models.tiny("llama")
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  rules = sharding.rules_from_config({"embed": None, "mlp": ["fsdp", "tensor"]})
  placed = sharding.param_shardings(config, mesh, rules)
  default = sharding.param_shardings(config, mesh)
  assert tuple(default["embedding"].spec) == ("tensor", "fsdp")
  assert tuple(placed["embedding"].spec) == ("tensor", None)
  assert tuple(placed["layers"]["mlp"]["up"].spec) == (None, None, ("fsdp", "tensor"))
  assert sharding.rules_from_config(None) == sharding.DEFAULT_RULES
  with pytest.raises(ValueError, match="unknown logical axis 'embedding'"):
    sharding.rules_from_config({"embedding": "fsdp"})
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.rules_from_config({"embed": "model"})


def test_load_in_bfloat16(saved):
  _, _, path = saved
  config, params = hf.load(path, dtype="bfloat16")
  assert config.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_scores_match_transformers(family, tmp_path):
  model = hf_fixtures.torch_model(family, num_labels=1)
  path = hf_fixtures.save_torch_model(model, str(tmp_path))
  config, params = hf.load(path)
  assert config.is_reward_model
  tokens, mask = hf_fixtures.ragged_batch(LENGTHS, 12, seed=2)
  ours = np.asarray(models.forward(config, params, tokens, mask))
  ref = _torch_logits(model, tokens, mask)[:, 0]
  assert ours.shape == (len(LENGTHS),)
  assert np.abs(ours - ref).max() <= 1e-4


# --- parameter counts of the named sizes (jax.eval_shape, nothing allocated) ---

PUBLISHED = {  # From the model cards / safetensors index totals.
    "gemma2_2b": 2_614_341_888, "gemma2_9b": 9_241_705_984, "gemma2_27b": 27_227_128_320,
    "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496,
    "qwen2_5_0_5b": 494_032_768, "qwen2_5_7b": 7_615_616_512,
    "mistral_7b": 7_241_732_096,  # Mistral-7B-v0.1, vocab 32000.
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_named_size_parameter_counts(name):
  assert models.param_count(models.NAMED_SIZES[name]()) == PUBLISHED[name]


# --- bad input: one clear error naming the file, tensor or field ---


def _copy_folder(src, dst):
  os.makedirs(dst, exist_ok=True)
  for f in os.listdir(src):
    with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
      b.write(a.read())
  return dst


def _rewrite_tensors(folder, edit):
  path = os.path.join(folder, "model.safetensors")
  sf = SafetensorsFile(path)
  tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
  del sf
  edit(tensors)
  save_file(tensors, path)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
  return hf_fixtures.save_torch_model(hf_fixtures.torch_model("llama"),
                                      str(tmp_path_factory.mktemp("llama_bad")))


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load(str(tmp_path))


def test_unsupported_model_type(llama_folder, tmp_path):
  d = _copy_folder(llama_folder, str(tmp_path / "m"))
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["model_type"] = "gpt_neox"
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
    hf.load(d)


def test_missing_tensor(llama_folder, tmp_path):
  d = _copy_folder(llama_folder, str(tmp_path / "m"))
  _rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    hf.load(d)


def test_unexpected_tensor(llama_folder, tmp_path):
  d = _copy_folder(llama_folder, str(tmp_path / "m"))
  _rewrite_tensors(d, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensor 'model.extra.weight'"):
    hf.load(d)


def test_shape_mismatch(llama_folder, tmp_path):
  d = _copy_folder(llama_folder, str(tmp_path / "m"))
  name = "model.layers.0.self_attn.k_proj.weight"
  _rewrite_tensors(d, lambda t: t.update({name: np.zeros((8, 32), np.float32)}))
  with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(8, 32\)"):
    hf.load(d)


def test_pickle_only_weights_refused(llama_folder, tmp_path):
  d = str(tmp_path / "m")
  os.makedirs(d)
  _copy_folder(llama_folder, d)
  os.remove(os.path.join(d, "model.safetensors"))
  open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match=r"pytorch_model.bin: pickled weights are refused"):
    hf.load(d)


def test_config_field_errors():
  with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
    models.tiny("llama", num_heads=3, num_kv_heads=2)
  with pytest.raises(ValueError, match="use_sliding_window"):
    hf.config_from_hf({"model_type": "qwen2", "use_sliding_window": True, "vocab_size": 8,
                       "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2})


_MISTRAL_JSON = {"model_type": "mistral", "vocab_size": 8, "hidden_size": 8,
                 "intermediate_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2}


@pytest.mark.parametrize("window,want", [(None, (0, 0, 0)), (7, (7, 7, 7))])
def test_mistral_sliding_window_null_or_every_layer(window, want):
  config = hf.config_from_hf(dict(_MISTRAL_JSON, sliding_window=window))
  assert config.layer_windows == want
  assert hf.config_to_hf(config, "float32")["sliding_window"] == window


def test_unsupported_activation_is_refused():
  with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
    hf.config_from_hf(dict(_MISTRAL_JSON, hidden_act="relu"))


def test_family_features_not_names_drive_the_model():
  """Gemma 2's architecture on a llama-named config gives Gemma 2's logits: the model code
  reads feature fields only."""
  gemma = models.tiny("gemma2", num_layers=1)
  features = {f: getattr(gemma, f) for f in (
      "norm_scale_plus_one", "post_norms", "embed_scale", "mlp_activation", "tie_embeddings",
      "attn_logit_softcap", "final_logit_softcap", "sliding_window", "sliding_layers",
      "query_pre_attn_scalar")}
  llama = models.tiny("llama", num_layers=1, **features)
  params = models.init_params(gemma, jax.random.key(0))
  tokens, mask = hf_fixtures.ragged_batch([6, 3], 6)
  np.testing.assert_array_equal(np.asarray(models.forward(gemma, params, tokens, mask)),
                                np.asarray(models.forward(llama, params, tokens, mask)))
