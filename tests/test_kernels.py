"""Target log-prob kernels (chunked JAX, Pallas in interpret mode) against the references.

The jnp reference is itself checked against a float64 NumPy log-softmax. Shapes are ragged on
purpose (N=13, D=24, V=103 against 8 x 32 tiles) so that row padding, vocabulary padding and the
slid last vocabulary block are all exercised. Float32 tolerance: rtol 1e-5, atol 1e-5 (matmuls
run at "highest" precision, see conftest.py). The Pallas kernels are also compiled (not run) for
a TPU through libtpu, the `tpu` extra. The vocabulary-parallel head runs on meshes of the 8 fake
CPU devices against the single-device reference.
"""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import kernels
from eva_jax import models
from eva_jax import sharding

N, D, V = 13, 24, 103
TOL = dict(rtol=1e-5, atol=1e-5)
SOFTCAP = 3.0  # small, so that tanh saturates for the logits of these inputs


def _inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(N, D)), dtype)
  w_out = jnp.asarray(0.5 * rng.normal(size=(D, V)), dtype)
  targets = jnp.asarray(rng.integers(0, V, size=N), jnp.int32)
  # Cotangent weights, so that every row's log-prob and entropy enter the loss differently.
  weights = jnp.asarray(rng.normal(size=(2, N)), jnp.float32)
  return hidden, w_out, targets, weights


def _impl(name, softcap, return_entropy, **overrides):
  """A (hidden, w_out, targets) -> outputs function for one implementation, small tiles."""
  if name in ("reference", "dense"):
    kwargs = {}
  elif name == "chunked":
    kwargs = dict(block_v=32)
  else:
    kwargs = dict(block_n=8, block_v=32, block_d=8, bwd_block_v=32, interpret=True)
  kwargs.update(overrides)
  fn = {"reference": kernels.reference_target_logprobs,
        "dense": kernels.dense_target_logprobs,
        "chunked": kernels.chunked_target_logprobs,
        "pallas": kernels.pallas_target_logprobs}[name]
  return lambda h, w, t: fn(h, w, t, softcap=softcap, return_entropy=return_entropy, **kwargs)


def _value_and_grads(fn, hidden, w_out, targets, weights, with_entropy):
  """Outputs and d(loss)/d(hidden, w_out) for loss = weighted sum of log-probs (+ entropies)."""
  def loss(h, w):
    out = fn(h, w, targets)
    logprob, entropy = out if with_entropy else (out, None)
    total = jnp.sum(weights[0] * logprob)
    if with_entropy:
      total = total + jnp.sum(weights[1] * entropy)
    return total, out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, w_out)
  return out, grads


def _numpy_logprobs(hidden, w_out, targets, softcap):
  logits = np.asarray(hidden, np.float64) @ np.asarray(w_out, np.float64)
  if softcap is not None:
    logits = softcap * np.tanh(logits / softcap)
  shifted = logits - logits.max(axis=1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return logp[np.arange(len(targets)), np.asarray(targets)], -(np.exp(logp) * logp).sum(axis=1)


@pytest.mark.parametrize("softcap", [None, SOFTCAP])
def test_reference_matches_numpy(softcap):
  hidden, w_out, targets, _ = _inputs()
  logprob, entropy = kernels.reference_target_logprobs(hidden, w_out, targets, softcap=softcap,
                                                       return_entropy=True)
  want_logprob, want_entropy = _numpy_logprobs(hidden, w_out, targets, softcap)
  np.testing.assert_allclose(logprob, want_logprob, **TOL)
  np.testing.assert_allclose(entropy, want_entropy, **TOL)


@pytest.mark.parametrize("impl", ["dense", "chunked", "pallas"])
@pytest.mark.parametrize("softcap", [None, SOFTCAP])
def test_values_and_grads_match_reference(impl, softcap):
  hidden, w_out, targets, weights = _inputs()
  got, got_grads = _value_and_grads(_impl(impl, softcap, True), hidden, w_out, targets, weights,
                                    with_entropy=True)
  want, want_grads = _value_and_grads(_impl("reference", softcap, True), hidden, w_out, targets,
                                      weights, with_entropy=True)
  for name, g, w in zip(["logprob", "entropy", "d_hidden", "d_w_out"], [*got, *got_grads],
                        [*want, *want_grads]):
    assert g.dtype == jnp.float32, name
    np.testing.assert_allclose(g, w, err_msg=name, **TOL)


@pytest.mark.parametrize("impl,overrides", [
    ("dense", {}),
    ("chunked", dict(block_v=256)),         # block wider than the vocabulary: clipped to V
    ("pallas", dict(block_d=None)),         # all of D in one matmul inside the kernel
])
def test_logprobs_only(impl, overrides):
  hidden, w_out, targets, weights = _inputs(seed=1)
  got, got_grads = _value_and_grads(_impl(impl, SOFTCAP, False, **overrides), hidden, w_out,
                                    targets, weights, with_entropy=False)
  want, want_grads = _value_and_grads(_impl("reference", SOFTCAP, False), hidden, w_out, targets,
                                      weights, with_entropy=False)
  assert got.shape == (N,)
  np.testing.assert_allclose(got, want, **TOL)
  for name, g, w in zip(["d_hidden", "d_w_out"], got_grads, want_grads):
    np.testing.assert_allclose(g, w, err_msg=name, **TOL)


@pytest.mark.parametrize("impl", ["dense", "chunked", "pallas"])
def test_probabilities_sum_to_one(impl):
  """One hidden row scored against every vocabulary entry: the probabilities sum to 1."""
  hidden, w_out, _, _ = _inputs(seed=2)
  every_token = jnp.arange(V, dtype=jnp.int32)
  logprob = _impl(impl, None, False)(jnp.broadcast_to(hidden[0], (V, D)), w_out, every_token)
  np.testing.assert_allclose(jnp.sum(jnp.exp(logprob)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "chunked", "pallas"])
def test_bfloat16_inputs(impl):
  """bf16 inputs: float32 outputs equal the float32 computation on the same (rounded) values.

  bf16 x bf16 products are exact in float32 and accumulation is float32, so the values keep the
  float32 tolerance. Gradients come back in bf16 and carry its rounding (8 bits of mantissa).
  """
  hidden, w_out, targets, weights = _inputs(seed=3, dtype=jnp.bfloat16)
  got, got_grads = _value_and_grads(_impl(impl, SOFTCAP, True), hidden, w_out, targets, weights,
                                    with_entropy=True)
  want, want_grads = _value_and_grads(_impl("reference", SOFTCAP, True), hidden.astype(jnp.float32),
                                      w_out.astype(jnp.float32), targets, weights,
                                      with_entropy=True)
  for name, g, w in zip(["logprob", "entropy"], got, want):
    assert g.dtype == jnp.float32, name
    np.testing.assert_allclose(g, w, err_msg=name, rtol=1e-5, atol=1e-4)
  for name, g, w in zip(["d_hidden", "d_w_out"], got_grads, want_grads):
    assert g.dtype == jnp.bfloat16, name
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(g.astype(jnp.float32), w, err_msg=name, rtol=2 ** -7,
                               atol=2 ** -7 * scale)


def _numpy_logit_cotangent(hidden, w_out, targets, weights, softcap):
  """d loss / d logits [N, V] in float64 for loss = sum(w0 * logprob + w1 * entropy):
  (w0 ([k = t] - p_k) - w1 p_k (log p_k + H)) (1 - (z_k / softcap)^2)."""
  logits = np.asarray(hidden, np.float64) @ np.asarray(w_out, np.float64)
  capped = softcap * np.tanh(logits / softcap)
  logp = capped - capped.max(axis=1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
  p = np.exp(logp)
  entropy = -(p * logp).sum(axis=1, keepdims=True)
  w0, w1 = (np.asarray(w, np.float64)[:, None] for w in weights)
  g = w0 * (np.eye(logits.shape[1])[np.asarray(targets)] - p) - w1 * p * (logp + entropy)
  return g * (1.0 - np.square(capped / softcap))


def test_backward_kernels_bfloat16_masked_rows():
  """The Pallas backward kernels (d_hidden, d_w_out) on bf16 inputs against jax.grad of the
  plain log-softmax gather in float32 on the same (rounded) values, for a loss that masks rows
  the way training masks padding: masked rows get exactly zero d_hidden. (Float32 inputs:
  test_values_and_grads_match_reference, at TOL; measured max abs error ~1e-6.)

  The bound: the kernels cast each tile's float32 logit cotangent G to bf16 for the MXU
  (relative error u = 2^-8: 8 significand bits, round to nearest), the bf16 x bf16 products are
  exact in float32 and accumulate in float32 (negligible error), and the result is rounded to
  bf16 once more (u). So per element |error| <= u (|G| |W|^T) + u |d_hidden|
  <= 2^-7 (|G| |W|^T), likewise 2^-7 (|H|^T |G|) for d_w_out: relative to the sum of
  magnitudes, not to the result, which cancellation can make small (measured: max error /
  max |gradient| ~ 3.8e-3 ~ 2^-8, element-wise relative error up to 0.2 on small entries).
  """
  hidden, w_out, targets, weights = _inputs(seed=4, dtype=jnp.bfloat16)
  masked_N = np.arange(N) % 3 == 0
  weights = jnp.where(masked_N, 0.0, weights)
  _, got = _value_and_grads(_impl("pallas", SOFTCAP, True), hidden, w_out, targets, weights,
                            with_entropy=True)
  h32, w32 = hidden.astype(jnp.float32), w_out.astype(jnp.float32)
  _, want = _value_and_grads(_impl("reference", SOFTCAP, True), h32, w32, targets, weights,
                             with_entropy=True)
  assert got[0].dtype == got[1].dtype == jnp.bfloat16
  assert not np.any(got[0][masked_N]) and np.all(np.any(got[0][~masked_N], axis=1))
  g_abs = np.abs(_numpy_logit_cotangent(h32, w32, targets, weights, SOFTCAP))
  bounds = [2 ** -7 * g_abs @ np.abs(w32).T, 2 ** -7 * np.abs(h32).T @ g_abs]
  for name, g, w, bound in zip(["d_hidden", "d_w_out"], got, want, bounds):
    excess = np.abs(np.asarray(g.astype(jnp.float32)) - w) - bound
    assert excess.max() <= 1e-6, (name, excess.max())


def test_kernels_compile_for_tpu():
  """The forward and both backward kernels lowered by Mosaic (interpret=False) and compiled for
  a TPU v5e with libtpu, no TPU attached: the program holds each kernel as a TPU custom call
  (not a fallback). Ragged N and V (padding), bf16 with softcap and entropy (5 row vectors into
  the backward), float32 without (3)."""
  pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[tpu]'")
  devices = sharding.tpu_topology_devices("v5e:2x2")
  mesh = sharding.make_mesh(1, 1, 1, devices=devices[:1])
  rows, dim, vocab = 200, 128, 1000
  for dtype, softcap, with_entropy in [(jnp.bfloat16, 30.0, True), (jnp.float32, None, False)]:
    def loss(h, w, t, softcap=softcap, with_entropy=with_entropy):
      out = kernels.pallas_target_logprobs(h, w, t, softcap=softcap,
                                           return_entropy=with_entropy, block_n=128,
                                           block_v=256, interpret=False)
      return jnp.sum(out[0] + out[1]) if with_entropy else jnp.sum(out)

    args = [jax.ShapeDtypeStruct(shape, dt, sharding=sharding.replicated(mesh))
            for shape, dt in [((rows, dim), dtype), ((dim, vocab), dtype), ((rows,), jnp.int32)]]
    with jax.set_mesh(mesh):
      hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    for kernel in ["target_logprobs_fwd", "target_logprobs_bwd_hidden", "target_logprobs_bwd_w"]:
      # The pallas_call's name is in the custom call's instruction name and op_name metadata.
      named = [line for line in calls if re.search(rf"(?<![a-z]){kernel}(?![a-z])", line)]
      assert len(named) == 1, (kernel, dtype, calls)


def test_target_logprobs_dispatch_with_default_blocks():
  hidden, w_out, targets, _ = _inputs()
  want = kernels.reference_target_logprobs(hidden, w_out, targets, softcap=SOFTCAP,
                                           return_entropy=True)
  # "auto" is the chunked walk on CPU; "pallas" runs its default 64 x 256 tile interpreted.
  for impl in ["auto", "reference", "dense", "chunked", "pallas"]:
    got = kernels.target_logprobs(hidden, w_out, targets, softcap=SOFTCAP, return_entropy=True,
                                  impl=impl)
    for name, g, w in zip(["logprob", "entropy"], got, want):
      np.testing.assert_allclose(g, w, err_msg=f"{impl} {name}", **TOL)


@pytest.mark.parametrize("impl", ["reference", "dense", "chunked", "pallas"])
@pytest.mark.parametrize("bad,error,match", [
    (dict(hidden=np.zeros((N, D + 1), np.float32)), ValueError, "D differs"),
    (dict(targets=np.zeros((N + 1,), np.int32)), ValueError, "targets has"),
    (dict(hidden=np.zeros((N * D,), np.float32)), ValueError, "hidden must have 2"),
    (dict(targets=np.zeros((N,), np.float32)), TypeError, "integer token ids"),
    (dict(softcap=0.0), ValueError, "softcap"),
])
def test_bad_inputs_raise(impl, bad, error, match):
  hidden, w_out, targets, _ = _inputs()
  args = dict(hidden=hidden, w_out=w_out, targets=targets, softcap=None)
  args.update(bad)
  with pytest.raises(error, match=match):
    kernels.target_logprobs(args["hidden"], args["w_out"], args["targets"],
                            softcap=args["softcap"], impl=impl)


def test_bad_options_raise():
  hidden, w_out, targets, _ = _inputs()
  with pytest.raises(ValueError, match="impl"):
    kernels.target_logprobs(hidden, w_out, targets, impl="fused")
  with pytest.raises(ValueError, match="block_d"):
    kernels.pallas_target_logprobs(hidden, w_out, targets, block_d=7)
  with pytest.raises(ValueError, match="block_v"):
    kernels.chunked_target_logprobs(hidden, w_out, targets, block_v=0)


# --- the vocabulary-parallel head (8 fake CPU devices, see conftest.py) ----------------------

VP_N, VP_V = 27, 104  # N divides by no mesh (rows are padded); V splits into 8 slices of 13.


def _vocab_parallel_inputs():
  rng = np.random.default_rng(4)
  hidden = jnp.asarray(rng.normal(size=(VP_N, D)), jnp.float32)
  w_out = jnp.asarray(0.5 * rng.normal(size=(D, VP_V)), jnp.float32)
  # Three rows target each of the 8 slices of 13 columns, the rest anywhere.
  targets = np.concatenate([np.repeat(13 * np.arange(8), 3) + rng.integers(0, 13, 24),
                            rng.integers(0, VP_V, VP_N - 24)])
  weights = jnp.asarray(rng.normal(size=(2, VP_N)), jnp.float32)
  return hidden, w_out, jnp.asarray(targets, jnp.int32), weights


# row_chunk: (2, 2, 2) holds 7 rows a device gathered over fsdp (2) in chunks of 3 rows;
# (1, 8, 1) 4 rows gathered over 8 devices in chunks of 3 (24 // 8), so both walk a ragged last
# chunk; the Pallas and "reference" walks take one chunk.
@pytest.mark.parametrize("shape,impl,row_chunk", [
    ((2, 2, 2), "chunked", 6), ((1, 8, 1), "chunked", 24), ((1, 8, 1), "pallas", 8192),
    ((4, 1, 2), "reference", 8192)])
@pytest.mark.parametrize("softcap", [None, SOFTCAP])
def test_vocab_parallel_matches_single_device(shape, impl, row_chunk, softcap):
  hidden, w_out, targets, weights = _vocab_parallel_inputs()
  mesh = sharding.make_mesh(*shape)
  kwargs = {"chunked": dict(block_v=5), "pallas": dict(block_n=8, block_v=8, interpret=True),
            "reference": {}}[impl]
  got, got_grads = _value_and_grads(
      lambda h, w, t: kernels.vocab_parallel_target_logprobs(
          h, w, t, mesh=mesh, softcap=softcap, return_entropy=True, impl=impl,
          row_chunk=row_chunk, **kwargs),
      hidden, w_out, targets, weights, with_entropy=True)
  want, want_grads = _value_and_grads(_impl("reference", softcap, True), hidden, w_out, targets,
                                      weights, with_entropy=True)
  for name, g, w in zip(["logprob", "entropy", "d_hidden", "d_w_out"], [*got, *got_grads],
                        [*want, *want_grads]):
    assert g.dtype == jnp.float32 and g.shape == w.shape, name
    np.testing.assert_allclose(g, w, err_msg=name, **TOL)
  # The head's gradient stays split like the head: a [D, V / (fsdp * tensor)] slice a device.
  slices = shape[1] * shape[2]
  assert {s.data.shape for s in got_grads[1].addressable_shards} == {(D, VP_V // slices)}


def test_vocab_parallel_logprobs_only_and_bad_inputs():
  hidden, w_out, targets, weights = _vocab_parallel_inputs()
  mesh = sharding.make_mesh(1, 8, 1)
  got, got_grads = _value_and_grads(
      lambda h, w, t: kernels.vocab_parallel_target_logprobs(h, w, t, mesh=mesh, softcap=SOFTCAP,
                                                             impl="chunked", block_v=8),
      hidden, w_out, targets, weights, with_entropy=False)
  want, want_grads = _value_and_grads(_impl("reference", SOFTCAP, False), hidden, w_out,
                                      targets, weights, with_entropy=False)
  for name, g, w in zip(["logprob", "d_hidden", "d_w_out"], [got, *got_grads],
                        [want, *want_grads]):
    np.testing.assert_allclose(g, w, err_msg=name, **TOL)
  with pytest.raises(ValueError, match="does not split into 8 slices"):
    kernels.vocab_parallel_target_logprobs(hidden, w_out[:, :-1], targets, mesh=mesh)
  with pytest.raises(ValueError, match="'model' is not an axis of the mesh"):
    kernels.vocab_parallel_target_logprobs(hidden, w_out, targets, mesh=mesh, axes=("model",))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_vocabulary_placement(family):
  """The embedding [V, D] and an untied head [D, V] split V over fsdp and tensor, and the head's
  D stays whole, so that the log-probs never need the whole head on a device."""
  config = models.tiny(family)
  specs = sharding.param_shardings(config, sharding.make_mesh(2, 2, 2))
  assert specs["embedding"].spec == jax.sharding.PartitionSpec(("fsdp", "tensor"), None)
  if not config.tie_embeddings:
    assert specs["lm_head"].spec == jax.sharding.PartitionSpec(None, ("fsdp", "tensor"))


def test_vocab_parallel_compiles_for_tpu_without_the_whole_head():
  """The vocabulary-parallel head with the Pallas kernels (interpret=False) compiled for a TPU
  v5e 2x2 with libtpu, the vocabulary over its 4 chips: each kernel is a TPU custom call, and no
  array of the program spans the whole vocabulary."""
  pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[tpu]'")
  mesh = sharding.make_mesh(1, 4, 1, devices=sharding.tpu_topology_devices("v5e:2x2"))
  rows, dim, vocab = 512, 128, 4096

  def loss(h, w, t):
    logprob, entropy = kernels.vocab_parallel_target_logprobs(
        h, w, t, mesh=mesh, softcap=30.0, return_entropy=True, impl="pallas", block_n=128,
        block_v=256, interpret=False)
    return jnp.sum(logprob + entropy)

  head = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("fsdp", "tensor")))
  rows_2d, rows_1d = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
  args = [jax.ShapeDtypeStruct((rows, dim), jnp.bfloat16, sharding=rows_2d),
          jax.ShapeDtypeStruct((dim, vocab), jnp.bfloat16, sharding=head),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rows_1d)]
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
  calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
  for kernel in ["target_logprobs_fwd", "target_logprobs_bwd_hidden", "target_logprobs_bwd_w"]:
    assert any(re.search(rf"(?<![a-z]){kernel}(?![a-z])", line) for line in calls), kernel
  assert not re.search(rf"\[[0-9,]*{vocab}[0-9,]*\]", hlo)


# --- the vocabulary-parallel embedding lookup ---------------------------------------------------

# Rows over data x fsdp, the vocabulary over fsdp x tensor: (2, 2, 2) gathers rows over fsdp and
# sums over tensor; (1, 8, 1) gathers over all 8; (4, 1, 2) sums the rows over tensor and the
# table's gradient over data. (8, 1, 1) splits the vocabulary over data, gathering all rows.
# row_chunk 4 (a step gathers up to max(row_chunk, V / S) rows) walks several chunks, some
# ragged, on all but (4, 1, 2).
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (4, 1, 2), (8, 1, 1)])
@pytest.mark.parametrize("row_chunk", [4, 8192])
def test_vocab_parallel_embed_matches_take(shape, row_chunk):
  rng = np.random.default_rng(5)
  table = jnp.asarray(rng.normal(size=(VP_V, D)), jnp.float32)
  # Every slice is hit, some tokens repeat (their gradient rows add up), 8 rows of 5 tokens.
  tokens = jnp.asarray(np.concatenate([13 * np.arange(8) + rng.integers(0, 13, 8),
                                       rng.integers(0, VP_V, 24), [7] * 8]).reshape(8, 5),
                       jnp.int32)
  cotangent = jnp.asarray(rng.normal(size=(8, 5, D)), jnp.float32)
  mesh = sharding.make_mesh(*shape)
  axes = ("fsdp", "tensor") if shape[0] < 8 else ("data",)
  row_axes = ("data", "fsdp")

  def loss(embed):
    return lambda t: jnp.sum(embed(t, tokens) * cotangent)

  parallel = functools.partial(kernels.vocab_parallel_embed, mesh=mesh, axes=axes,
                               row_axes=row_axes, row_chunk=row_chunk)
  with jax.set_mesh(mesh):
    got = jax.jit(parallel)(table, tokens)
    got_grad = jax.jit(jax.grad(loss(parallel)))(table)
  want = jnp.take(table, tokens, axis=0)
  want_grad = jax.grad(loss(lambda t, x: jnp.take(t, x, axis=0)))(table)
  # The forward reads one slice's row and adds zeros: bit-identical. The gradient sums the same
  # cotangent rows per token, in another order.
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)
  slices = math.prod(mesh.shape[a] for a in axes)
  assert {s.data.shape for s in got_grad.addressable_shards} == {(VP_V // slices, D)}


def test_vocab_parallel_embed_out_dtype_and_bad_inputs():
  table = jnp.asarray(np.random.default_rng(6).normal(size=(VP_V, D)), jnp.float32)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(4, 4) * 6
  mesh = sharding.make_mesh(2, 2, 2)
  with jax.set_mesh(mesh):
    got = jax.jit(functools.partial(kernels.vocab_parallel_embed, out_dtype=jnp.bfloat16))(
        table, tokens)
    grad = jax.jit(jax.grad(lambda t: jnp.sum(kernels.vocab_parallel_embed(
        t, tokens, out_dtype=jnp.bfloat16).astype(jnp.float32))))(table)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got, jnp.take(table, tokens, axis=0).astype(jnp.bfloat16))
  assert grad.dtype == jnp.float32   # accumulated in float32, returned in the table's dtype
  np.testing.assert_array_equal(grad, jnp.zeros_like(table).at[tokens].add(1.0))
  with pytest.raises(ValueError, match=r"vocabulary \(103\) does not split into 4 slices"):
    kernels.vocab_parallel_embed(table[:-1], tokens, mesh=mesh)
  with pytest.raises(ValueError, match=r"the batch \(3\) does not split over the 4 devices"):
    kernels.vocab_parallel_embed(table, tokens[:3], mesh=mesh)
  with pytest.raises(ValueError, match="'model' is not an axis of the mesh"):
    kernels.vocab_parallel_embed(table, tokens, mesh=mesh, axes=("model",))


def test_vocab_parallel_embed_compiles_for_tpu_without_the_whole_table():
  """The lookup and its gradient compiled for a TPU v5e 2x2 with libtpu, the vocabulary over
  its 4 chips: no array of the program spans the whole vocabulary (XLA's own partitioning of a
  plain take gathers the whole table on large meshes)."""
  pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[tpu]'")
  mesh = sharding.make_mesh(1, 4, 1, devices=sharding.tpu_topology_devices("v5e:2x2"))
  vocab, dim = 4096, 128

  def loss(table, tokens):
    return jnp.sum(kernels.vocab_parallel_embed(table, tokens, out_dtype=jnp.bfloat16))

  table = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("fsdp", "tensor"), None))
  args = [jax.ShapeDtypeStruct((vocab, dim), jnp.float32, sharding=table),
          jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))]
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss)).lower(*args).compile().as_text()
  assert not re.search(rf"\[[0-9,]*{vocab}[0-9,]*\]", hlo)
