"""The decoder family against transformers' PyTorch models, and the HF folder round trip."""
import json
import os
import re

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
  # The vocabulary takes fsdp and tensor (a vocabulary-parallel head); `embed` moves the rest.
  assert tuple(default["embedding"].spec) == (("fsdp", "tensor"), None)
  assert tuple(default["layers"]["attn"]["q"].spec) == (None, "fsdp", "tensor", None)
  assert tuple(placed["layers"]["attn"]["q"].spec) == (None, None, "tensor", None)
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


def test_sample_step_on_the_split_cache_equals_decode_step_on_a_dense_cache():
  """The sampler's decode step (shared prompt cache + pre-split generated cache [L, B, N, K, T',
  E] with 3 slots written) against the dense cache run over prompt + generated + new token."""
  config = models.tiny("gemma2", sliding_window=5)  # Windows, softcaps, GQA.
  params = models.init_params(config, jax.random.key(0))
  b, n, gen_slots, written = 2, 2, 8, 3
  tokens_BxP, mask_BxP = hf_fixtures.ragged_batch([7, 4], 8, seed=1, side="left")
  p, r = tokens_BxP.shape[1], b * n
  gen_RxW = np.asarray(jax.random.randint(jax.random.key(1), (r, written + 1), 0, 256))
  prompt_pos_BxP = models.positions_from_mask(mask_BxP)
  prompt_valid_BxP = jnp.asarray(mask_BxP, bool)
  cache = models.init_cache(config, b, p, jnp.float32)
  _, cache = models.decode_step(config, params, tokens_BxP, prompt_pos_BxP, cache, 0,
                                prompt_pos_BxP, prompt_valid_BxP)

  # Reference: each row's own dense cache (its prompt's, repeated), then its 4 tokens at once.
  rows = lambda x: jnp.repeat(x, n, axis=0)
  length_R = rows(jnp.asarray(mask_BxP.sum(-1)))
  gen_pos_RxW = length_R[:, None] + jnp.arange(written + 1)
  dense = {name: jnp.pad(jnp.repeat(c, n, axis=1), ((0, 0), (0, 0), (0, written + 1),
                                                    (0, 0), (0, 0))) for name, c in cache.items()}
  kv_pos_RxS = jnp.concatenate([rows(prompt_pos_BxP), gen_pos_RxW], 1)
  kv_valid_RxS = jnp.concatenate([rows(prompt_valid_BxP), jnp.ones((r, written + 1), bool)], 1)
  want_RxWxD, dense = models.decode_step(config, params, gen_RxW, gen_pos_RxW, dense, p,
                                         kv_pos_RxS, kv_valid_RxS)

  # The split cache holds the first 3 generated tokens' keys/values, taken from the dense run.
  def generated(c_LxRxSxKxE):
    gen = jnp.swapaxes(c_LxRxSxKxE[:, :, p:p + written], 2, 3)  # [L, R, K, 3, E]
    gen = jnp.pad(gen, ((0, 0), (0, 0), (0, 0), (0, gen_slots - written), (0, 0)))
    return gen.reshape(config.num_layers, b, n, *gen.shape[2:])

  prompt = {name: jnp.swapaxes(c, 2, 3) for name, c in cache.items()}
  split = models.SplitCache(prompt["k"], prompt["v"], generated(dense["k"]),
                            generated(dense["v"]), prompt_pos_BxP, prompt_valid_BxP, written)
  got_RxD, new_kv = models.sample_step(config, params, gen_RxW[:, -1], gen_pos_RxW[:, -1], split)
  # float32 rounding only (the split softmax sums its three parts in another order).
  np.testing.assert_allclose(np.asarray(got_RxD), np.asarray(want_RxWxD[:, -1]), atol=1e-5)
  for name in ("k", "v"):
    np.testing.assert_allclose(np.asarray(new_kv[name]),
                               np.asarray(dense[name][:, :, p + written]), atol=1e-6)


def _splash_rows(b, t):
  """A [B, T] mask: full, right-padded, left-padded, a hole in the middle (a prompt then its
  response), repeated over B rows."""
  valid = np.ones((4, t), bool)
  valid[1, t - 57:] = False
  valid[2, :37] = False
  valid[3, 40:70] = False
  return np.resize(valid, (b, t))


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_splash_attention_matches_dense_values_and_grads(softcap):
  """The splash kernels (Pallas interpreter, 128-token tiles: T = 256 is 2 x 2 tiles) against
  `_dense_attention`, GQA H=4 over K=2, padding on either side: outputs on real-token rows and
  the gradients of a loss reading those rows, f32."""
  from eva_jax.models import attention
  config = models.tiny("llama", attn_logit_softcap=softcap, query_pre_attn_scalar=8)
  b, t, h, k, e = 4, 256, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 4)
  q, kk, v, w = (jax.random.normal(key, (b, t, n, e)) for key, n in zip(keys, [h, k, k, h]))
  valid = jnp.asarray(_splash_rows(b, t))
  pos = models.positions_from_mask(valid)
  cotangent = w * valid[:, :, None, None]

  def run(attend):
    out, vjp = jax.vjp(attend, q, kk, v)
    return out, vjp(cotangent)

  got, got_grads = jax.jit(lambda: run(
      lambda *a: attention.splash_attention(config, *a, valid, block=128)))()
  want, want_grads = run(lambda *a: attention._dense_attention(config, *a, pos, pos, valid, 0))
  np.testing.assert_allclose(np.asarray(got)[np.asarray(valid)],
                             np.asarray(want)[np.asarray(valid)], atol=1e-5)
  for name, g, w_ in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w_), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("softcap,window,dtype", [(None, 0, "float32"), (2.0, 5, "float32"),
                                                  (None, 0, "bfloat16")])
def test_grouped_attention_matches_einsum_autodiff(softcap, window, dtype):
  """The CPU path (`_grouped_dense_attention`: query heads folded into rows, hand-written
  backward) against autodiff of the einsum formula, on a prefix cache with invalid slots, a
  query row with no valid slot, GQA H=4 over K=2, soft-cap and window. f32: 1e-5 (only the
  summation order differs); bf16 inputs and probabilities: 2e-2 relative to the largest value
  (bf16 keeps 8 bits, and the two paths round P and dS at different points)."""
  from eva_jax.models import attention
  config = models.tiny("llama", attn_logit_softcap=softcap, query_pre_attn_scalar=8,
                       dtype=dtype)
  b, t, s, h, k, e = 3, 6, 10, 4, 2, 16
  keys = jax.random.split(jax.random.key(3), 4)
  q, kk, v = (jax.random.normal(key, (b, n_t, n, e), dtype)
              for key, n_t, n in zip(keys, [t, s, s], [h, k, k]))
  cotangent = jax.random.normal(keys[3], (b, t, h, e), jnp.float32)
  kv_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  pos = kv_pos[:, s - t:]
  kv_valid = np.ones((b, s), bool)
  kv_valid[1, :3] = False
  kv_valid[2, :] = False       # Row 2 sees no slot: a uniform average, and no score gradient.
  args = (pos, kv_pos, jnp.asarray(kv_valid), jnp.int32(window))

  def run(fn):
    out, vjp = jax.vjp(lambda *qkv: fn(config, *qkv, *args).astype(jnp.float32), q, kk, v)
    return out, vjp(cotangent)

  got, got_grads = jax.jit(lambda: run(attention._grouped_dense_attention))()
  want, want_grads = jax.jit(lambda: run(attention._einsum_dense_attention))()
  tol = dict(atol=1e-5, rtol=0) if dtype == "float32" else None
  for name, g, w_ in zip(["out", "q", "k", "v"], [got, *got_grads], [want, *want_grads]):
    g, w_ = np.asarray(g, np.float32), np.asarray(w_, np.float32)
    kw = tol or dict(atol=2e-2 * np.abs(w_).max(), rtol=0)
    np.testing.assert_allclose(g, w_, err_msg=name, **kw)
  # Undifferentiated (the sampler's prefill, scoring), the grouped path is the einsums
  # themselves, bit for bit; on CPU _dense_attention is the grouped path.
  np.testing.assert_array_equal(
      np.asarray(attention._dense_attention(config, q, kk, v, *args)),
      np.asarray(attention._einsum_dense_attention(config, q, kk, v, *args)))


def test_splash_forward_matches_dense_on_a_sharded_gemma2():
  """forward with attention_impl="splash" (interpreted, on a 2 x 2 data/tensor mesh of CPU
  devices: rows and heads per shard) equals the dense single-device forward on real tokens.
  Gemma 2 tiny: softcaps, query_pre_attn_scalar, GQA, and a window (8) shorter than T, so the
  windowed layers take the dense branch and the global ones the kernels."""
  config = models.tiny("gemma2")
  params = models.init_params(config, jax.random.key(0))
  b, t = 4, 128
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, config.vocab_size)
  mask = jnp.asarray(_splash_rows(b, t), jnp.int32)
  want = jax.jit(lambda p: models.forward(config, p, tokens, mask))(params)
  splash_config = config.replace(attention_impl="splash")
  mesh = sharding.make_mesh(2, 1, 2, devices=jax.devices()[:4])
  with sharding.activation_rules(mesh):
    got = jax.jit(lambda p: models.forward(splash_config, p, tokens, mask))(params)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)


def test_attention_impl_auto_picks_the_compile_platform():
  """"auto" is splash only when compiling for TPU (the mesh's platform, so a deviceless TPU
  compile from this CPU process counts) and T % 128 == 0; "dense"/"splash" are what they say."""
  from eva_jax.models import attention
  auto, dense = models.tiny("llama"), models.tiny("llama", attention_impl="dense")
  assert not attention.uses_splash(auto, 256)
  with sharding.activation_rules(sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])):
    assert not attention.uses_splash(auto, 256)
  assert attention.uses_splash(auto.replace(attention_impl="splash"), 100)
  with pytest.raises(ValueError, match="attention_impl"):
    models.tiny("llama", attention_impl="flash")
  pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[tpu]'")
  tpu = sharding.make_mesh(1, 1, 1, devices=sharding.tpu_topology_devices("v5e:2x2")[:1])
  with sharding.activation_rules(tpu):
    assert attention.uses_splash(auto, 256)
    assert not attention.uses_splash(auto, 200)
    assert not attention.uses_splash(dense, 256)


def test_splash_attention_compiles_for_tpu():
  """Values and gradients of `splash_attention` lowered by Mosaic and compiled for a TPU v5e
  (libtpu, no TPU attached) on a 2 x 2 data/tensor mesh: the forward, dq and dkv kernels are TPU
  custom calls on each shard's rows and heads, and no collective moves q, k or v."""
  pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[tpu]'")
  from eva_jax.models import attention
  mesh = sharding.make_mesh(2, 1, 2, devices=sharding.tpu_topology_devices("v5e:2x2"))
  config = models.tiny("gemma2", head_dim=128, dtype="bfloat16")
  b, t, h, k, e = 4, 512, 4, 2, 128

  def arg(shape, names, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=sharding.logical_to_sharding(shape, names, mesh))

  def loss(q, kk, v, valid):
    return jnp.sum(attention.splash_attention(config, q, kk, v, valid).astype(jnp.float32))

  args = [arg((b, t, h, e), ("act_batch", None, "act_heads", None)),
          arg((b, t, k, e), ("act_batch", None, "act_kv_heads", None)),
          arg((b, t, k, e), ("act_batch", None, "act_kv_heads", None)),
          arg((b, t), ("act_batch", None), jnp.bool_)]
  # conftest's "highest" matmul precision asks Mosaic for fp32 passes on bf16 dots, which it
  # refuses; training runs at the default precision.
  with sharding.activation_rules(mesh), jax.default_matmul_precision("default"):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
  calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
  for kernel in ["splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"]:
    named = [line for line in calls if kernel in line]
    assert len(named) == 1, (kernel, calls)
    # Operands and results are one shard's: 2 of the 4 rows, 2 of the 4 query heads.
    shapes = [[int(d) for d in dims.split(",")]
              for dims in re.findall(r"\[([\d,]+)\]", named[0]) if "512" in dims]
    assert shapes and all(max(s[:-2], default=1) <= 2 for s in shapes), (kernel, shapes)
  assert not [line for line in hlo.splitlines()
              if re.search(r"= \S+ (all-gather|all-to-all|collective-permute)\(", line)]
