"""The sampler against transformers' greedy `generate`, a teacher-forced forward, and NumPy's
truncated softmax; determinism, bucketing, sharding and bad input; continuous batching against
the fixed-batch sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

torch = pytest.importorskip("torch")

from eva_jax import continuous, models, sampling, sharding, token_select  # noqa: E402
from eva_jax.models import hf  # noqa: E402
from tests import hf_fixtures  # noqa: E402

FAMILIES = ["llama", "gemma2", "qwen2", "mistral"]
# Gemma's and Mistral's fixture windows are 5: the long prompts and the generation cross them.
PROMPT_LENGTHS = [9, 4, 6]
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
  family = request.param
  model = hf_fixtures.torch_model(family)
  path = hf_fixtures.save_torch_model(model, str(tmp_path_factory.mktemp(family)))
  config, params = hf.load(path)
  return family, model, config, params


def _hf_greedy(model, tokens_left, mask_left, eos):
  """transformers' greedy generation -> generated ids [B, NEW_TOKENS], 0 after an eos."""
  model.generation_config.eos_token_id = eos
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(tokens_left, dtype=torch.long),
                         attention_mask=torch.tensor(mask_left, dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
  gen = out[:, tokens_left.shape[1]:].numpy()
  return np.pad(gen, ((0, 0), (0, NEW_TOKENS - gen.shape[1])))  # It stops once all rows end.


def test_greedy_matches_transformers_generate(family_model):
  family, model, config, params = family_model
  tokens, mask = hf_fixtures.ragged_batch(PROMPT_LENGTHS, 12, seed=3)
  left, left_mask = hf_fixtures.ragged_batch(PROMPT_LENGTHS, 12, seed=3, side="left")
  free = _hf_greedy(model, left, left_mask, eos=None)
  # Two stop ids: row 0's third token, so row 0 stops early; and row 2's sixth token unless
  # that id already occurs earlier somewhere (then it is just a second id that may trigger).
  eos = [int(free[0, 2]), int(free[2, 5])]
  want = _hf_greedy(model, left, left_mask, eos=eos)
  out = sampling.sample(config, params, tokens, mask, rng=jax.random.key(0), num_samples=2,
                        max_new_tokens=NEW_TOKENS, eos_ids=eos, greedy=True)
  got = np.asarray(out.tokens)
  for n in range(2):
    np.testing.assert_array_equal(got[:, n], want, err_msg=f"{family} sample {n}")
  hit = np.isin(want, eos)
  first = np.where(hit.any(1), hit.argmax(1) + 1, NEW_TOKENS)
  np.testing.assert_array_equal(np.asarray(out.lengths), np.stack([first, first], 1))
  np.testing.assert_array_equal(np.asarray(out.finished), np.stack([hit.any(1)] * 2, 1))
  assert first[0] <= 3  # The early stop really happened.


def _teacher_forced_logprobs(config, params, tokens, mask, out):
  """log_softmax(forward(prompt + response)) at the response tokens -> [B, N, T]."""
  b, n, t = out.tokens.shape
  lengths = np.asarray(out.lengths)
  gen = np.asarray(out.tokens)
  width = mask.sum(1).max() + t
  seqs = np.zeros((b, n, width), np.int32)
  seq_mask = np.zeros_like(seqs)
  for i in range(b):
    prompt = tokens[i][mask[i].astype(bool)]
    for j in range(n):
      seq = np.concatenate([prompt, gen[i, j, :lengths[i, j]]])
      seqs[i, j, :len(seq)], seq_mask[i, j, :len(seq)] = seq, 1
  logits = jax.jit(models.forward, static_argnums=0)(
      config, params, seqs.reshape(b * n, width), seq_mask.reshape(b * n, width))
  logp = np.asarray(jax.nn.log_softmax(logits, -1)).reshape(b, n, width, -1)
  want = np.zeros((b, n, t), np.float32)
  for i in range(b):
    start = int(mask[i].sum())
    for j in range(n):
      steps = np.arange(lengths[i, j])
      want[i, j, steps] = logp[i, j, start - 1 + steps, seqs[i, j, start + steps]]
  return want


_init = jax.jit(models.init_params, static_argnums=0)


@pytest.fixture(scope="module")
def llama():
  config = models.tiny("llama", eos_token_ids=(5,))
  return config, _init(config, jax.random.key(3))


# The llama tests below share these shapes (batch bucket 4, prompt bucket 16) and so their
# compiles.
SHARED = dict(num_samples=2, max_new_tokens=6)


@pytest.fixture(scope="module")
def gemma():
  """Window 5: the prompts (up to 12 tokens) and their continuations cross it."""
  config = models.tiny("gemma2", sliding_window=5)
  return config, _init(config, jax.random.key(1))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_logprobs_equal_teacher_forced_forward(family, llama, gemma):
  config, params = llama if family == "llama" else gemma
  # Left-padded prompts: accepted as well as right-padded ones.
  tokens, mask = hf_fixtures.ragged_batch([12, 3, 7], 12, seed=4, side="left")
  out = sampling.sample(config, params, tokens, mask, rng=jax.random.key(2), temperature=0.8,
                        top_p=0.95, eos_ids=(7, 11, 13), **SHARED)
  want = _teacher_forced_logprobs(config, params, tokens, mask, out)
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4, rtol=0)
  gen = np.asarray(out.tokens)
  # The samples of a prompt differ (they share the prompt cache, not their draws).
  assert all((gen[i, 0] != gen[i, 1]).any() for i in range(3))
  steps = np.arange(SHARED["max_new_tokens"])
  after_end = steps[None, None] >= np.asarray(out.lengths)[..., None]
  assert (gen[after_end] == 0).all()


# --- token selection: empirical frequencies vs NumPy's truncated, renormalised softmax ---


def _reference_probs(logits, temperature, top_k, top_p):
  """transformers' rule in float64: top-k, then keep tokens whose more-probable mass < top_p."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(len(z), bool)
  keep[order[:top_k or len(z)]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  above = np.cumsum(p[order]) - p[order]
  if top_p < 1:
    assert np.abs(above - top_p).min() > 1e-5, "a boundary too close to top_p for a clean test"
    p[order[above >= top_p]] = 0.0
  return p / p.sum()


def _draw(logits, draws, seed, **kw):
  keys = jax.random.split(jax.random.key(seed), draws)
  fn = jax.jit(lambda l, k: token_select.select_tokens(l, k, **kw))
  tokens, logprobs = fn(jnp.broadcast_to(jnp.asarray(logits), (draws, len(logits))), keys)
  return np.asarray(tokens), np.asarray(logprobs)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.8, 0, 0.6), (1.3, 4, 1.0), (0.7, 6, 0.75)])
def test_selection_frequencies_match_truncated_softmax(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(0, 1.5, 16).astype(np.float32)
  want = _reference_probs(logits, temperature, top_k, top_p)
  draws = 40_000
  tokens, logprobs = _draw(logits, draws, seed=5, temperature=temperature, top_p=top_p,
                           top_k=top_k)
  counts = np.bincount(tokens, minlength=len(logits))
  assert counts[want == 0].sum() == 0  # Never outside the top-k / nucleus.
  # Every bin within 5 standard deviations of its binomial count (fixed seed).
  sd = np.sqrt(draws * want * (1 - want))
  assert (np.abs(counts - draws * want) <= 5 * sd + 1e-9).all(), (counts, draws * want)
  # Log-probs are of the untouched distribution (temperature 1, no truncation).
  np.testing.assert_allclose(logprobs, jax.nn.log_softmax(logits)[tokens], atol=1e-5)


@pytest.mark.parametrize("top_p", [0.9, 0.05])
def test_nucleus_on_a_large_vocabulary(top_p):
  """A flat 1000-token distribution: many 128-token blocks, and at top_p 0.05 many rejection
  rounds. Chi-square over the nucleus, Wilson-Hilferty z below 4."""
  logits = np.random.default_rng(1).normal(0, 0.5, 1000).astype(np.float32)
  want = _reference_probs(logits, 1.0, 0, top_p)
  draws = 10_000
  tokens, _ = _draw(logits, draws, seed=6, temperature=1.0, top_p=top_p)
  counts = np.bincount(tokens, minlength=len(logits))
  kept = want > 0
  assert counts[~kept].sum() == 0
  expected = draws * want[kept]
  assert expected.min() >= 5  # Chi-square is valid.
  k = kept.sum() - 1
  chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
  z = ((chi2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / np.sqrt(2 / (9 * k))
  assert z < 4, (chi2, k)


# --- determinism, temperature 0, bucketing, sharding ---


def test_same_rng_same_output_and_cold_limit_is_greedy(llama):
  config, params = llama
  tokens, mask = hf_fixtures.ragged_batch([5, 12, 2], 12, seed=7)
  kw = dict(top_p=0.9, **SHARED)
  a = sampling.sample(config, params, tokens, mask, rng=jax.random.key(4), **kw)
  b = sampling.sample(config, params, tokens, mask, rng=jax.random.key(4), **kw)
  c = sampling.sample(config, params, tokens, mask, rng=jax.random.key(5), **kw)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a.tokens, c.tokens)
  greedy = sampling.sample(config, params, tokens, mask, rng=jax.random.key(4), greedy=True,
                           **kw)
  zero = sampling.sample(config, params, tokens, mask, rng=jax.random.key(4), temperature=0.0,
                         **kw)
  # A tiny temperature runs the sampling path, whose limit is the argmax.
  cold = sampling.sample(config, params, tokens, mask, rng=jax.random.key(4), temperature=1e-4,
                         **kw)
  for other in (zero, cold):
    jax.tree.map(np.testing.assert_array_equal, greedy, other)


def test_buckets_bound_the_number_of_compiles(llama):
  config, params = llama
  kw = dict(rng=jax.random.key(0), top_p=0.8, **SHARED)
  tokens, mask = hf_fixtures.ragged_batch([10, 3, 16], 16, seed=8)
  first = sampling.sample(config, params, tokens, mask, temperature=0.9, **kw)
  before = dict(sampling.TRACE_COUNTS)
  # Other widths, batch sizes (3 and 4 share a bucket), padding sides and temperatures.
  left, left_mask = hf_fixtures.ragged_batch([10, 3, 16], 16, seed=8, side="left")
  again = sampling.sample(config, params, left, left_mask, temperature=0.9, **kw)
  for lengths, width in [([9, 12, 4, 11], 12), ([7, 9, 3], 9)]:
    t, m = hf_fixtures.ragged_batch(lengths, width, seed=9)
    sampling.sample(config, params, t, m, temperature=0.5, **kw)
  assert dict(sampling.TRACE_COUNTS) == before
  jax.tree.map(np.testing.assert_array_equal, first, again)  # Left padding == right padding.


# Both decode on sharding.decode_mesh (4 data x 2 tensor for 2 KV heads): one compile.
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_sampling_matches_unsharded(gemma, shape):
  config, params = gemma
  mesh = sharding.make_mesh(*shape)
  placed = jax.device_put(params, sharding.param_shardings(config, mesh))
  tokens, mask = hf_fixtures.ragged_batch([12, 3, 7], 12, seed=10)
  kw = dict(rng=jax.random.key(0), eos_ids=[], greedy=True, **SHARED)
  want = sampling.sample(config, params, tokens, mask, **kw)
  got = sampling.sample(config, placed, tokens, mask, mesh=mesh, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
  assert len(got.tokens.sharding.device_set) == 8
  # The nucleus sampler under the mesh too: per-row random streams do not depend on placement.
  kw.update(greedy=False, temperature=0.8, top_p=0.9)
  want = sampling.sample(config, params, tokens, mask, **kw)
  got = sampling.sample(config, placed, tokens, mask, mesh=mesh, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


def test_decode_params_are_prepared_once_tensor_parallel(gemma):
  """Under a mesh the sampler decodes with the weights whole along the model width and split
  over `tensor` by heads, MLP width and vocabulary; sample_batched prepares them once."""
  config, params = gemma
  mesh = sharding.make_mesh(1, 8, 1)
  placed = jax.device_put(params, sharding.param_shardings(config, mesh))
  decode_mesh = sharding.decode_mesh(mesh, config)
  assert dict(decode_mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  prepared = sampling.prepare_params(config, placed, mesh)
  layer = prepared["layers"]
  for x, spec in [(prepared["embedding"], P("tensor", None)),
                  (layer["attn"]["q"], P(None, None, "tensor", None)),
                  (layer["attn"]["k"], P(None, None, "tensor", None)),
                  (layer["attn"]["o"], P(None, "tensor", None, None)),
                  (layer["mlp"]["gate"], P(None, None, "tensor")),
                  (layer["mlp"]["down"], P(None, "tensor", None)),
                  (layer["input_norm"]["scale"], P())]:
    assert x.sharding.is_equivalent_to(NamedSharding(decode_mesh, spec), x.ndim), x.sharding
  assert sampling.prepare_params(config, prepared, mesh) is prepared
  # Three chunks of the sharded test's shapes (batch bucket 4, width bucket 16): no compile.
  tokens, mask = hf_fixtures.ragged_batch([12, 3, 7, 9, 10], 12, seed=11)
  ids = [list(row[m.astype(bool)]) for row, m in zip(tokens, mask)]
  before = sampling.TRACE_COUNTS["prepare"]
  sampling.sample_batched(config, placed, ids, rng=jax.random.key(0), batch_size=2, pad_id=0,
                          greedy=True, eos_ids=[], mesh=mesh, **SHARED)
  assert sampling.TRACE_COUNTS["prepare"] == before + 1


def test_decode_cache_is_donated(llama):
  config, params = llama
  tokens = jnp.ones((4, 16), jnp.int32)  # The shared shapes: no new compile.
  mask = jnp.ones((4, 16), jnp.int32)
  cache, logits = sampling._prefill(config, params, tokens, mask, cache_dtype="float32",
                                    mesh=None, **SHARED)
  # The generated cache: [L, B, N, K, slots, E]; slots for T - 1 tokens, a whole number of
  # 128-wide tiles on TPU, of 8 elsewhere (every decode step reads all of them).
  l, k, e = config.num_layers, config.num_kv_heads, config.head_dim
  slots = sampling.generated_slots(SHARED["max_new_tokens"])
  assert slots == -(-(SHARED["max_new_tokens"] - 1) // 8) * 8
  assert cache["generated"]["k"].shape == (l, 4, SHARED["num_samples"], k, slots, e)
  assert [sampling.generated_slots(t, "tpu") for t in (1, 2, 129, 130, 2048)] == [
      128, 128, 128, 256, 2048]
  assert [sampling.generated_slots(t, "cpu") for t in (1, 2, 9, 10, 24, 2048)] == [
      8, 8, 8, 16, 24, 2048]
  assert sampling.generated_slots(24, "gpu") == 24 and sampling.mesh_platform(None) == "cpu"
  sampling._decode(config, params, cache, logits, mask, jnp.ones(4, bool),
                   jnp.full((8,), -1, jnp.int32), jax.random.key(0), jnp.float32(1.0),
                   jnp.float32(1.0), pad_id=0, top_k=0, greedy=True, nucleus=False, mesh=None,
                   **SHARED)
  assert all(x.is_deleted() for x in jax.tree.leaves(cache))


# --- non-finite logits: one clear error, never a hang ---


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_p=0.9), dict(temperature=1.0),
                                dict(temperature=0.7, top_k=3), dict(greedy=True)])
def test_select_marks_non_finite_rows(kw):
  """NaN and +inf rows (which made the nucleus loop spin forever and top-p 1 return an id past
  the vocabulary) come back as token -1; the finite row is drawn as usual."""
  logits = np.random.default_rng(2).normal(0, 1, (4, 300)).astype(np.float32)
  logits[1, 17] = np.nan
  logits[2, 5] = np.inf
  logits[3] = -np.inf
  tokens, logprobs = jax.jit(lambda l, k: token_select.select_tokens(l, k, **kw))(
      jnp.asarray(logits), jax.random.split(jax.random.key(0), 4))
  tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
  np.testing.assert_array_equal(tokens[1:], [-1, -1, -1])
  assert np.isnan(logprobs[1:]).all()
  assert 0 <= tokens[0] < 300 and np.isfinite(logprobs[0])


def _nan_token_params(params, token):
  """params whose embedding of `token` is NaN: a row that reads it gets NaN logits."""
  return dict(params, embedding=params["embedding"].at[token].set(jnp.nan))


def test_non_finite_prompt_logits_name_the_row(llama):
  config, params = llama
  tokens, mask = hf_fixtures.ragged_batch([10, 4, 3], 10, seed=11)  # The shared buckets.
  tokens[tokens == 200] = 201
  tokens[1, 2] = 200
  with pytest.raises(ValueError, match=r"non-finite logits in prompt row 1 \(sample 0\) at "
                     r"step 0 \(2 row\(s\) in all\)"):
    sampling.sample(config, _nan_token_params(params, 200), tokens, mask,
                    rng=jax.random.key(0), top_p=0.9, **SHARED)


def test_non_finite_logits_mid_generation_name_the_row_and_step(llama):
  """Poison the token that greedy decoding emits first on prompt row 1: the first row to read
  it (in its prompt, or as the previous token) stops with an error naming its step."""
  config, params = llama
  tokens, mask = hf_fixtures.ragged_batch([5, 12, 2], 12, seed=7)
  kw = dict(rng=jax.random.key(0), greedy=True, eos_ids=[], **SHARED)
  gen = np.asarray(sampling.sample(config, params, tokens, mask, **kw).tokens)[:, 0]
  poison = int(gen[1, 0])
  steps = []
  for row in range(3):
    if poison in tokens[row][mask[row] > 0]:
      steps.append(0)
    else:
      hits = np.flatnonzero(gen[row, :-1] == poison)
      steps.append(int(hits[0]) + 1 if len(hits) else None)
  row = next(r for r, s in enumerate(steps) if s is not None)
  with pytest.raises(ValueError, match=rf"prompt row {row} \(sample 0\) at step {steps[row]} "):
    sampling.sample(config, _nan_token_params(params, poison), tokens, mask, **kw)


# --- the text helper ---


class _CharTokenizer:
  """Stand-in for the tokenizer wrapper: one id per character, a two-token chat template."""
  eos_ids = (5,)
  pad_id = 0

  def apply_chat_template(self, prompt, add_generation_prompt=True):
    assert add_generation_prompt
    return [1] + [32 + ord(c) % 200 for c in prompt] + [2]

  def decode(self, ids):
    return "".join(chr(int(i) + 40) for i in ids)


def test_sample_texts_decodes_each_response_up_to_its_eos(llama):
  config, params = llama
  tok = _CharTokenizer()
  prompts = ["hi", "a longer one", "mid"]
  texts = sampling.sample_texts(config, params, tok, prompts, rng=jax.random.key(0),
                                temperature=0.9, top_p=0.9, **SHARED)
  ids = [tok.apply_chat_template(p) for p in prompts]
  tokens = np.zeros((3, max(map(len, ids))), np.int32)
  mask = np.zeros_like(tokens)
  for i, row in enumerate(ids):
    tokens[i, :len(row)], mask[i, :len(row)] = row, 1
  # One chunk (all prompts), which sample_batched draws with fold_in(rng, chunk start = 0).
  out = sampling.sample(config, params, tokens, mask, rng=jax.random.fold_in(jax.random.key(0), 0),
                        temperature=0.9, top_p=0.9, eos_ids=tok.eos_ids, **SHARED)
  assert len(texts) == 3 and all(len(t) == 2 for t in texts)
  for i in range(3):
    for j in range(2):
      n = int(out.lengths[i, j]) - int(out.finished[i, j])
      assert texts[i][j] == tok.decode(np.asarray(out.tokens[i, j, :n]))


# --- bad input: one clear error each ---


@pytest.mark.parametrize("change,match", [
    (dict(mask=np.array([[1, 1, 0], [0, 0, 0]])), "prompt row 1 is empty"),
    (dict(max_new_tokens=8191), "needs 8193 positions .* max_position_embeddings=8192"),
    (dict(num_samples=0), "num_samples must be an int >= 1"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
    (dict(temperature=1e-39), "temperature 1e-39 is below 1e-06"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(tokens=np.array([[3, 300, 0], [4, 0, 0]])), r"token ids must lie in \[0, 256\)"),
    (dict(mask=np.ones((2, 2))), "prompt_mask shape"),
    (dict(eos_ids=[999]), "eos_ids must be"),
])
def test_bad_input_is_a_clear_error(llama, change, match):
  config, params = llama
  args = dict(tokens=np.array([[3, 4, 0], [4, 0, 0]]), mask=np.array([[1, 1, 0], [1, 0, 0]]),
              num_samples=2, max_new_tokens=4, top_p=1.0, temperature=1.0, top_k=0,
              eos_ids=None)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    sampling.sample(config, params, args.pop("tokens"), args.pop("mask"),
                    rng=jax.random.key(0), **args)


# --- continuous batching (eva_jax.continuous): the fixed-batch sampler as the reference ---


def _continuous_prompts():
  """Token-id prompts of one width bucket (16): one refill and one decode compile per setting;
  as a batch, the SHARED shapes."""
  tokens, mask = hf_fixtures.ragged_batch([12, 9, 16, 10], 16, seed=8)
  return tokens, mask, [list(row[m.astype(bool)]) for row, m in zip(tokens, mask)]


def test_continuous_greedy_matches_fixed_batches(llama):
  config, params = llama
  tokens, mask, ids = _continuous_prompts()
  free = sampling.sample(config, params, tokens, mask, rng=jax.random.key(0), greedy=True,
                         eos_ids=(), **SHARED)
  # Prompt 0 stops at its third token, prompt 2 at its second (or earlier where the ids recur).
  eos = [int(free.tokens[0, 0, 2]), int(free.tokens[2, 0, 1])]
  want = sampling.sample(config, params, tokens, mask, rng=jax.random.key(0), greedy=True,
                         eos_ids=eos, **SHARED)
  # 3 slots (two groups of 2) for 8 rows: groups change prompts as their rows end.
  got = continuous.sample_continuous(config, params, ids, rng=jax.random.key(0), greedy=True,
                                     eos_ids=eos, slots=3, group=2, **SHARED)
  np.testing.assert_array_equal(got.tokens, np.asarray(want.tokens))
  np.testing.assert_array_equal(got.lengths, np.asarray(want.lengths))
  np.testing.assert_array_equal(got.finished, np.asarray(want.finished))
  np.testing.assert_allclose(got.logprobs, np.asarray(want.logprobs), atol=1e-5)
  assert got.lengths[0, 0] <= 3 and got.finished[0].all()
  assert not got.finished.all()  # Some rows ran to max_new_tokens.
  np.testing.assert_array_equal(got.lengths[~got.finished], SHARED["max_new_tokens"])
  # Poison a token prompt 1 emits: the first row, in (prompt, sample) order, to read it (in its
  # prompt: step 0; fed back after step k: step k + 1) is named, with the count of such rows.
  poison = int(got.tokens[1, 0, 2])
  steps = {}
  for p, row in enumerate(ids):
    for n in range(2):
      fed = np.flatnonzero(got.tokens[p, n, :got.lengths[p, n] - 1] == poison)
      if poison in row or fed.size:
        steps[p, n] = 0 if poison in row else int(fed[0]) + 1
  (p, n), step = next(iter(steps.items()))
  with pytest.raises(ValueError, match=rf"non-finite logits in prompt row {p} \(sample {n}\) at "
                     rf"step {step} \({len(steps)} row\(s\) in all\)"):
    continuous.sample_continuous(config, _nan_token_params(params, poison), ids,
                                 rng=jax.random.key(0), greedy=True, eos_ids=eos, slots=3,
                                 group=2, **SHARED)


def test_continuous_draws_do_not_depend_on_slots_groups_chunks_or_order(llama):
  config, params = llama
  ids = _continuous_prompts()[2]
  kw = dict(rng=jax.random.key(4), temperature=0.8, top_p=0.9, **SHARED)
  free = continuous.sample_continuous(config, params, ids, slots=3, group=1, eos_ids=(), **kw)
  before = dict(continuous.TRACE_COUNTS)
  # Row (0, 0) stops at its third token: its draws up to there do not depend on the eos ids.
  kw["eos_ids"] = (int(free.tokens[0, 0, 2]), int(free.tokens[3, 1, 4]))
  a = continuous.sample_continuous(config, params, ids, slots=3, group=1, **kw)
  assert dict(continuous.TRACE_COUNTS) == before  # One compile per setting.
  # Other slots, groups of 2 (each prompt's rows in one group), prompts prefilled 2 at a time
  # (the loop returns to the host between chunks), another serving order.
  b = continuous.sample_continuous(config, params, ids, slots=5, group=2, chunk=2,
                                   order=[3, 1, 0, 2], **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a.tokens[0, 0, :3], free.tokens[0, 0, :3])
  assert all((a.tokens[i, 0] != a.tokens[i, 1]).any() for i in range(len(ids)))
  # After a row's end: pad tokens and zero log-probs; it ended on an eos iff it is finished.
  t = SHARED["max_new_tokens"]
  after = np.arange(t)[None, None] >= a.lengths[..., None]
  assert (a.tokens[after] == 0).all() and (a.logprobs[after] == 0).all()
  last = np.take_along_axis(a.tokens, a.lengths[..., None] - 1, axis=-1)[..., 0]
  np.testing.assert_array_equal(np.isin(last, kw["eos_ids"]), a.finished)
  np.testing.assert_array_equal(a.lengths[~a.finished], t)
  assert a.lengths[0, 0] <= 3 and a.finished[0, 0] and not a.finished.all()


def test_sharded_continuous_matches_unsharded(llama):
  # Under a mesh the continuous sampler decodes on sharding.decode_mesh too (weights prepared
  # tensor parallel, 4 data x 2 tensor here): the same draws as on one device.
  config, params = llama
  mesh = sharding.make_mesh(1, 8, 1)
  placed = jax.device_put(params, sharding.param_shardings(config, mesh))
  ids = _continuous_prompts()[2]
  kw = dict(rng=jax.random.key(4), temperature=0.8, top_p=0.9, slots=8, group=2, **SHARED)
  want = continuous.sample_continuous(config, params, ids, **kw)
  before = sampling.TRACE_COUNTS["prepare"]
  got = continuous.sample_continuous(config, placed, ids, mesh=mesh, **kw)
  assert sampling.TRACE_COUNTS["prepare"] == before + 1
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_continuous_bad_input_is_a_clear_error(llama):
  config, params = llama
  ids = _continuous_prompts()[2]
  kw = dict(rng=jax.random.key(0), slots=2, **SHARED)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    continuous.sample_continuous(config, params, [ids[0], []], **kw)
  with pytest.raises(ValueError, match="order must be a permutation"):
    continuous.sample_continuous(config, params, ids, order=[0, 0, 1, 2], **kw)
  with pytest.raises(ValueError, match="slots must be an int >= 1"):
    continuous.sample_continuous(config, params, ids, **dict(kw, slots=0))
  with pytest.raises(ValueError, match="chunk must be an int >= 1"):
    continuous.sample_continuous(config, params, ids, **dict(kw, chunk=0))


def test_decode_walking_generated_blocks_matches_reading_every_slot(gemma, monkeypatch):
  """The TPU decode's walk over the generated cache (`attention.walks_generated_blocks`: only
  the blocks that hold tokens are read, an online softmax across them), forced on here with
  8-slot blocks: the same draws and log-probs as the one einsum over every slot, for fixed
  batches (one count for all rows) and continuous batching (a count per row). Window 5 and
  the soft-cap are crossed by the 20 new tokens (24 slots: 3 blocks)."""
  from eva_jax.models import attention
  config, params = gemma
  tokens, mask = hf_fixtures.ragged_batch([12, 3, 9], 12, seed=11)
  ids = [list(row[m.astype(bool)]) for row, m in zip(tokens, mask)]
  kw = dict(num_samples=2, max_new_tokens=20, eos_ids=(), temperature=0.8, top_p=0.9)

  def run():
    fixed = sampling.sample(config, params, tokens, mask, rng=jax.random.key(2), **kw)
    cont = continuous.sample_continuous(config, params, ids, rng=jax.random.key(2), slots=4,
                                        group=2, **kw)
    return fixed, cont

  want = run()
  walked = []
  walk = attention.SplitCache._attend_gen_blocks

  def spy(self, *args):
    walked.append(self.gen_layer.shape)  # Traced: the blocked path was compiled.
    return walk(self, *args)

  monkeypatch.setattr(attention, "GEN_BLOCK", 8)
  monkeypatch.setattr(attention, "walks_generated_blocks",
                      lambda platform, gen_len: gen_len > 8 and gen_len % 8 == 0)
  monkeypatch.setattr(attention.SplitCache, "_attend_gen_blocks", spy)
  jax.clear_caches()  # The programs above were compiled without the walk.
  try:
    got = run()
  finally:
    jax.clear_caches()
  assert walked
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g.tokens), np.asarray(w.tokens))
    np.testing.assert_array_equal(np.asarray(g.lengths), np.asarray(w.lengths))
    np.testing.assert_allclose(np.asarray(g.logprobs), np.asarray(w.logprobs), atol=1e-5)
