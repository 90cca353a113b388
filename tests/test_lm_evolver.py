"""Tests for the LM evolver: the method plan, then the whole path templates -> chat template ->
sampling -> decoding -> parsing -> filters -> buffer, once with a tiny random model (gibberish
text, but real shapes, chains and requests) and once with a scripted stand-in for the sampler
(known replies, so parsing, filtering and provenance can be checked exactly)."""
import collections
import contextlib
import logging
import os
import re
import types

import jax
import numpy as np
import pytest

from configs import default as default_config
from eva_jax import creator, lm_evolver, models, sampling, stages, templates
from eva_jax.buffer import PromptBuffer
from eva_jax.lm_evolver import LMEvolver
from eva_jax.models import tokenizer as tk

PROMPTS = ["How do I sort a list of numbers in Python?",
           "Write a short poem about the sea.",
           "Explain why the sky is blue to a child.",
           "Tell me a joke about cats."]
LONG_PROMPT = " ".join(["Please summarise the history of the printing press in Europe."] * 60)
REFUSAL = "I'm sorry, but I can't help with that."
OPEN, CLOSE = templates.PROMPT_OPEN, templates.PROMPT_CLOSE


# Distinct words for the scripted rewrites: each reply adds words no earlier reply used, so a
# chain's steps stay below the filters' near-duplicate threshold however its methods repeat.
WORD_BANK = sorted({w for t in templates.load_templates().values()
                    for w in re.findall(r"\b[a-z]{5,}\b", t)})


def harder(text, method, n):
  """The scripted creator's n-th rewrite: `text` plus a demand naming `method`."""
  fresh = " ".join(WORD_BANK[(6 * n + k) % len(WORD_BANK)] for k in range(6))
  return f"{text} Then do it the {method.replace('_', ' ')} way: {fresh}."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  # Trained on everything the tests will encode, so every text round-trips.
  corpus = list(templates.load_templates().values()) + PROMPTS + [LONG_PROMPT, REFUSAL]
  corpus += [f"Sure! {OPEN}{harder(p, m, 0)}{CLOSE}" for p in PROMPTS
             for m in templates.EVOLUTION_METHODS]
  return tk.train_sentencepiece(corpus, str(tmp_path_factory.mktemp("tok")), vocab_size=1000)


@pytest.fixture(scope="module")
def tiny_model(tok):
  config = models.tiny("llama", vocab_size=tok.vocab_size)
  # Jitted: one compile instead of op-by-op dispatch of the scanned init.
  return config, jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))


def make_buffer(texts):
  buffer = PromptBuffer()
  for text in texts:
    buffer.add(text, iteration=0)
  return buffer


def chains_of(candidates):
  chains = collections.defaultdict(list)
  for cand in candidates:
    chains[cand.parent_id].append(cand)
  return chains


# ------------------------------------------------------------------------------- the method plan


def test_method_probabilities_hand_computed():
  probs = dict(zip(templates.EVOLUTION_METHODS, lm_evolver.method_probabilities()))
  assert probs == pytest.approx({m: 0.1 for m in templates.EVOLUTION_METHODS})
  probs = dict(zip(templates.EVOLUTION_METHODS, lm_evolver.method_probabilities(
      0.8, {"deepen": 3, "expand": 1, "persona": 1})))
  # In-depth 0.8 split 3:1, in-breadth 0.2 all on persona.
  assert probs == pytest.approx({m: {"deepen": 0.6, "expand": 0.2, "persona": 0.2}.get(m, 0.0)
                                 for m in templates.EVOLUTION_METHODS})
  probs = dict(zip(templates.EVOLUTION_METHODS, lm_evolver.method_probabilities(allow_mix=False)))
  assert probs == pytest.approx({m: 0.1 if m in templates.IN_DEPTH_METHODS else
                                 0.0 if m == "mix" else 0.125 for m in templates.EVOLUTION_METHODS})
  # A group with no weight hands its share over.
  probs = lm_evolver.method_probabilities(0.0, {"deepen": 1})
  assert probs[templates.EVOLUTION_METHODS.index("deepen")] == 1.0 and probs.sum() == 1.0


@pytest.mark.parametrize("args, kwargs, match", [
    ((1.5,), {}, "depth_prob"),
    ((0.5, {"harder": 1}), {}, "unknown evolution methods"),
    ((0.5, {"deepen": -1}), {}, ">= 0"),
    ((0.5, {"deepen": 0}), {}, "no evolution method"),
    ((0.5, {"mix": 1}), {"allow_mix": False}, "mix needs two prompts"),
])
def test_method_probabilities_errors(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    lm_evolver.method_probabilities(*args, **kwargs)


def test_plan_frequencies_partners_and_determinism():
  weights = {"deepen": 3, "expand": 1, "persona": 1, "mix": 2}
  plan = lm_evolver.plan_chains(2000, 4, np.random.default_rng(0), depth_prob=0.7,
                                method_weights=weights)
  assert plan == lm_evolver.plan_chains(2000, 4, np.random.default_rng(0), depth_prob=0.7,
                                        method_weights=weights)
  steps = [(i, s) for i, chain in enumerate(plan) for s in chain]
  assert len(steps) == 8000
  expected = {"deepen": 0.525, "expand": 0.175, "persona": 0.1, "mix": 0.2}
  counts = collections.Counter(s.method for _, s in steps)
  assert set(counts) == set(expected)
  for method, p in expected.items():
    # Binomial count; 5 standard deviations makes a false failure about 1 in 10^6.
    assert abs(counts[method] / 8000 - p) < 5 * np.sqrt(p * (1 - p) / 8000), method
  partners = [(i, s.other) for i, s in steps if s.method == "mix"]
  assert all(0 <= other < 2000 and other != i for i, other in partners)
  assert all(s.other is None for _, s in steps if s.method != "mix")
  # With two prompts the partner is always the other one.
  two = lm_evolver.plan_chains(2, 50, np.random.default_rng(1), method_weights={"mix": 1})
  assert [{s.other for s in chain} for chain in two] == [{1}, {0}]


def test_constructor_errors(tok, tiny_model):
  config, params = tiny_model
  with pytest.raises(ValueError, match="num_chained"):
    LMEvolver(config, params, tok, num_chained=0)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    LMEvolver(config, params, tok, max_new_tokens=8000, max_prompt_tokens=1000)
  with pytest.raises(ValueError, match="leaves no room"):
    LMEvolver(config, params, tok, max_new_tokens=config.max_position_embeddings)
  with pytest.raises(ValueError, match="unknown evolution methods"):
    LMEvolver(config, params, tok, method_weights={"rewrite": 1.0})
  with pytest.raises(ValueError, match="top_p"):
    LMEvolver(config, params, tok, top_p=0.0)
  with pytest.raises(ValueError, match="reward model"):
    LMEvolver(models.tiny("llama", num_labels=1), params, tok)
  # Defaults fit the model's positions.
  small = models.tiny("llama", vocab_size=tok.vocab_size, max_position_embeddings=1500)
  assert LMEvolver(small, params, tok).max_prompt_tokens == 1500 - 1024
  evolver = LMEvolver(config, params, tok, method_weights={"mix": 1})
  with pytest.raises(ValueError, match="mix needs two prompts"):
    evolver.evolve(make_buffer(PROMPTS[:1]).base_records(), rng=0, iteration=1)
  with pytest.raises(ValueError, match="distinct ids"):
    evolver.evolve(make_buffer(PROMPTS[:1]).base_records() * 2, rng=0, iteration=1)


# ------------------------------------------------------------------ a tiny random creator model


def test_tiny_random_model_chains_requests_and_determinism(tok, tiny_model, monkeypatch):
  config, params = tiny_model
  calls = []
  real_sample = sampling.sample

  def spy(config, params, prompts, mask, **kwargs):
    out = real_sample(config, params, prompts, mask, **kwargs)
    calls.append((np.asarray(prompts), np.asarray(mask, bool), kwargs, out))
    return out

  monkeypatch.setattr(sampling, "sample", spy)
  records = make_buffer(PROMPTS[:3]).base_records()
  # Gibberish never closes a marker, so unfinished replies are kept to grow full chains.
  evolver = LMEvolver(config, params, tok, num_chained=3, max_new_tokens=8, batch_size=2,
                      keep_unfinished=True)
  assert isinstance(evolver, creator.Evolver)
  candidates = evolver.evolve(records, rng=7, iteration=1)

  # Chain structure: one chain per prompt, in prompt order, steps 1..3, every step parsed.
  assert [(c.parent_id, c.step, c.chain) for c in candidates] == [
      (r.id, s, 0) for r in records for s in (1, 2, 3)]
  assert all(c.method in templates.EVOLUTION_METHODS and c.text for c in candidates)
  by_chain = chains_of(candidates)

  # One sample call per chunk of at most 2 requests: steps x chunks (2 + 1).
  assert [len(p) for p, *_ in calls] == [2, 1] * 3
  vocab = tok.hf.get_vocab()
  for _, _, kwargs, out in calls:
    assert kwargs["num_samples"] == 1 and kwargs["max_new_tokens"] == 8
    assert kwargs["eos_ids"] == tok.eos_ids and kwargs["mesh"] is None
    assert (kwargs["temperature"], kwargs["top_p"]) == (0.7, 0.9)
    assert out.tokens.shape[1:] == (1, 8)
  keys = {tuple(np.asarray(jax.random.key_data(kw["rng"])).tolist()) for _, _, kw, _ in calls}
  assert len(keys) == len(calls)

  # Requests, step by step and chain by chain: the method's template around the previous
  # step's text, through the chat template; replies decoded up to their length and parsed.
  rows = [(p[m], tokens_T[:length]) for p_BxP, m_BxP, _, out in calls
          for p, m, tokens_T, length in zip(p_BxP, m_BxP, np.asarray(out.tokens)[:, 0],
                                            np.asarray(out.lengths)[:, 0])]
  expected = [(i, s) for s in (1, 2, 3) for i in range(3)]
  assert len(rows) == len(expected)
  for (request_ids, reply_ids), (i, s) in zip(rows, expected):
    cand = by_chain[records[i].id][s - 1]
    parent = records[i].text if s == 1 else by_chain[records[i].id][s - 2].text
    others = ([r.text for j, r in enumerate(records) if j != i] if cand.method == "mix"
              else [None])
    renderings = [
        tok.apply_chat_template(templates.render_evolution_request(cand.method, parent, o))
        for o in others]
    assert request_ids.tolist() in renderings, (i, s, cand.method)
    assert request_ids[:2].tolist() == [vocab["<bos>"], vocab["<|user|>"]]
    assert request_ids[-1] == vocab["<|assistant|>"]
    text = tok.decode(request_ids)
    assert parent in text and "<original>" in text and OPEN in text
    assert len(reply_ids) <= 8
    assert cand.text == templates.parse_evolved(tok.decode(reply_ids))

  # Deterministic for a seed, whatever form it takes; another seed gives another round.
  assert evolver.evolve(records, rng=7, iteration=1) == candidates
  assert evolver.evolve(records, rng=np.random.default_rng(7), iteration=1) == candidates
  assert evolver.evolve(records, rng=8, iteration=1) != candidates


# ----------------------------------------------------------------- a scripted creator "model"


class ScriptedSampler:
  """Stands in for `sampling.sample`: decodes each request, replies by a fixed rule.

  The method is read from the request's text (each template's closing instructions differ), so
  a reply says which template was really rendered. Rules by the text to rewrite:
    PROMPTS[1]  the first time, a copy of it; later, a normal rewrite;
    PROMPTS[2]  an unfinished reply (opening marker, no eos before max_new_tokens);
    PROMPTS[3]  a refusal without markers;
    otherwise   "Sure! <new_prompt>harder(text, method, n)</new_prompt>" and eos, n counting
                these rewrites.
  `requests` holds (text to rewrite, method, request text) and `replies` the reply texts.
  """

  def __init__(self, tok):
    self.tok = tok
    self.seen = collections.Counter()
    self.rewrites = 0
    self.requests, self.replies = [], []
    # The text after the last placeholder of each template tells the templates apart.
    self.endings = {name: text.rsplit("}", 1)[1].strip()
                    for name, text in templates.load_templates().items()}

  def method_of(self, request):
    names = [name for name, ending in self.endings.items() if ending in request]
    assert len(names) == 1, names
    return names[0]

  def reply(self, request):
    text, ends = self._reply(request)
    self.replies.append(text)
    return text, ends

  def _reply(self, request):
    original = request.split("<original>\n", 1)[1].split("\n</original>", 1)[0]
    method = self.method_of(request)
    self.requests.append((original, method, request))
    self.seen[original] += 1
    if original == PROMPTS[1] and self.seen[original] == 1:
      return f"{OPEN}{original}{CLOSE}", True
    if original == PROMPTS[2]:
      return OPEN + " ".join([original] * 20), False
    if original == PROMPTS[3]:
      return REFUSAL, True
    self.rewrites += 1
    return f"Sure! {OPEN}{harder(original, method, self.rewrites)}{CLOSE}", True

  def __call__(self, config, params, prompts, mask, *, rng, num_samples, max_new_tokens,
               eos_ids, **unused):
    assert num_samples == 1 and isinstance(rng, jax.Array)
    tokens = np.full((len(prompts), 1, max_new_tokens), self.tok.pad_id, np.int32)
    lengths = np.zeros((len(prompts), 1), np.int32)
    finished = np.zeros((len(prompts), 1), bool)
    for b, (ids, m) in enumerate(zip(prompts, mask)):
      text, ends = self.reply(self.tok.decode(ids[m.astype(bool)]))
      reply_ids = self.tok.encode(text) + ([eos_ids[-1]] if ends else [])
      assert len(reply_ids) <= max_new_tokens or not ends, "scripted reply longer than budget"
      reply_ids = reply_ids[:max_new_tokens]
      tokens[b, 0, :len(reply_ids)] = reply_ids
      lengths[b, 0], finished[b, 0] = len(reply_ids), ends
    return sampling.SampleOutput(tokens=tokens, lengths=lengths, finished=finished,
                                 logprobs=np.zeros(tokens.shape, np.float32))


def test_scripted_creator_through_filters_into_buffer(tok, tiny_model, monkeypatch, caplog,
                                                      tmp_path):
  config, params = tiny_model
  scripted = ScriptedSampler(tok)
  monkeypatch.setattr(sampling, "sample", scripted)
  buffer = make_buffer(PROMPTS + [LONG_PROMPT])
  assert len(tok.apply_chat_template(LONG_PROMPT)) > 512
  evolver = LMEvolver(config, params, tok, num_chained=3, max_new_tokens=96, batch_size=4,
                      max_prompt_tokens=512,
                      method_weights={m: 1.0 for m in templates.IN_DEPTH_METHODS})
  with caplog.at_level(logging.INFO):
    added = creator.evolve_round(buffer, [r.id for r in buffer], evolver, rng=3, iteration=1,
                                 tokenizer_len_fn=lambda t: len(tok.encode(t)))
  # The long prompt's request is skipped (its chain is empty); nothing else is.
  assert "skipped 1 request(s) longer than max_prompt_tokens=512" in caplog.text
  assert "'0-4'" in caplog.text and all(LONG_PROMPT != o for o, _, _ in scripted.requests)
  # 3 steps for sort, poem and cats; sky stops after its unfinished first reply.
  assert len(scripted.requests) == 10
  assert "kept 5 of 10 evolved prompts" in caplog.text
  for reason in ("'copy_of_parent': 1", "'empty': 1", "'refusal': 3"):
    assert reason in caplog.text

  # Provenance: sort keeps its whole chain; poem's copy is dropped, so its step 2 hangs off the
  # base prompt (whose text the copy repeated).
  assert [(r.id, r.parent_id, r.root_id, r.step, r.iteration) for r in added] == [
      ("1-0", "0-0", "0-0", 1, 1), ("1-1", "1-0", "0-0", 2, 1), ("1-2", "1-1", "0-0", 3, 1),
      ("1-3", "0-1", "0-1", 2, 1), ("1-4", "1-3", "0-1", 3, 1)]
  # Requests go step by step: (sort, poem, sky, cats), then (sort, poem, cats) twice. Each kept
  # text is the parsed reply to its request, which rewrote its parent's text with the template
  # of the method the record names.
  for record, k in zip(added, (0, 4, 7, 5, 8)):
    original, method, _ = scripted.requests[k]
    assert record.method == method and method in templates.IN_DEPTH_METHODS
    assert original == buffer.get(record.parent_id).text
    assert record.text == templates.parse_evolved(scripted.replies[k])
    assert record.text.startswith(original + " Then do it the")

  path = tmp_path / "buffer.jsonl"
  buffer.save(path)
  assert list(PromptBuffer.load(path)) == list(buffer)
  assert buffer.lineage_counts("root") == {"0-0": 3, "0-1": 2}


def test_scripted_mix_requests_hold_both_prompts(tok, tiny_model, monkeypatch):
  config, params = tiny_model
  scripted = ScriptedSampler(tok)
  monkeypatch.setattr(sampling, "sample", scripted)
  records = make_buffer([PROMPTS[0], "Write a short poem about cats.", PROMPTS[3][:-1] + "!"])
  evolver = LMEvolver(config, params, tok, num_chained=2, max_new_tokens=96, batch_size=8,
                      method_weights={"mix": 1.0})
  candidates = evolver.evolve(records.base_records(), rng=11, iteration=2)
  assert [(c.parent_id, c.step, c.method) for c in candidates] == [
      (r.id, s, "mix") for r in records for s in (1, 2)]
  by_chain = chains_of(candidates)
  texts = [r.text for r in records]
  for (original, method, request), (i, s) in zip(scripted.requests,
                                                 [(i, s) for s in (1, 2) for i in range(3)]):
    assert method == "mix"
    assert original == (texts[i] if s == 1 else by_chain[f"0-{i}"][0].text)
    second = request.split("<second>\n", 1)[1].split("\n</second>", 1)[0]
    assert second in texts and second != texts[i]
  assert [c.text for s in (1, 2) for c in (by_chain[f"0-{i}"][s - 1] for i in range(3))] == [
      harder(original, "mix", n) for n, (original, _, _) in enumerate(scripted.requests, 1)]


class FakeBars:
  """A progress factory (the `stages.no_progress` protocol) that records every bar."""

  def __init__(self):
    self.bars = []

  def __call__(self, desc, total, unit="it"):
    bar = types.SimpleNamespace(desc=desc, total=total, unit=unit, updates=[], postfix={},
                                closed=False)
    bar.update = bar.updates.append
    bar.set_postfix = lambda **kw: bar.postfix.update(kw)

    @contextlib.contextmanager
    def opened():
      yield bar
      bar.closed = True
    self.bars.append(bar)
    return opened()


def test_progress_one_bar_per_step_counts_requests(tok, tiny_model, monkeypatch):
  config, params = tiny_model
  monkeypatch.setattr(sampling, "sample", ScriptedSampler(tok))
  bars = FakeBars()
  # The long prompt's request is skipped, so step 1 sends 4 requests; the sky's reply is cut
  # off (its chain ends), so steps 2 and 3 send 3 (ScriptedSampler's rules).
  evolver = LMEvolver(config, params, tok, num_chained=3, max_new_tokens=96, batch_size=3,
                      max_prompt_tokens=512, progress=bars,
                      method_weights={m: 1.0 for m in templates.IN_DEPTH_METHODS})
  evolver.evolve(make_buffer(PROMPTS + [LONG_PROMPT]).base_records(), rng=3, iteration=1)
  assert [(b.desc, b.total, b.unit) for b in bars.bars] == [
      ("evolve 1/3", 4, "request"), ("evolve 2/3", 3, "request"), ("evolve 3/3", 3, "request")]
  assert [b.updates for b in bars.bars] == [[3, 1], [3], [3]]  # One update per sampled chunk.
  assert [b.postfix for b in bars.bars] == [{"parsed": 3, "cut_off": 1},
                                            {"parsed": 3, "cut_off": 0},
                                            {"parsed": 3, "cut_off": 0}]
  assert all(b.closed for b in bars.bars)


def test_from_config_reads_the_creator_sampling_fields(tok, tiny_model):
  config, params = tiny_model
  cfg = default_config.get_config().creator
  policy = stages.Policy(config, params, tok, None)
  evolver = lm_evolver.from_config(cfg, source=None, policy=policy)
  # The defaults the config file states: T 0.7, top-p 0.9, 1024 new tokens.
  assert (evolver.temperature, evolver.top_p, evolver.max_new_tokens) == (0.7, 0.9, 1024)
  assert evolver.progress is stages.no_progress and evolver.rules is policy.rules
  cfg.temperature, cfg.top_p, cfg.max_new_tokens = 0.88, 1.0, 666
  bars = FakeBars()
  evolver = lm_evolver.from_config(cfg, source=None, policy=policy, progress=bars)
  assert (evolver.temperature, evolver.top_p, evolver.max_new_tokens) == (0.88, 1.0, 666)
  assert evolver.progress is bars


# ------------------------------------------------------------------------------- template sets


EVOLINSTRUCT = ("add_constraints", "deepen", "concretize", "increase_reasoning", "breadth")


def test_evolinstruct_plan_draws_its_five_methods_uniformly():
  plan = lm_evolver.plan_chains(2000, 4, np.random.default_rng(0), template_set="evolinstruct")
  counts = collections.Counter(s.method for chain in plan for s in chain)
  assert set(counts) == set(EVOLINSTRUCT) and sum(counts.values()) == 8000
  assert all(s.other is None for chain in plan for s in chain)
  for method in EVOLINSTRUCT:
    # Binomial count at p = 1/5: sd = sqrt(0.2 * 0.8 / 8000) = 0.0045; 5 sd (0.022) makes a false
    # failure about 1 in 10^6 per method.
    assert abs(counts[method] / 8000 - 0.2) < 5 * np.sqrt(0.2 * 0.8 / 8000), method
  assert lm_evolver.method_probabilities(template_set="evolinstruct").tolist() == [0.2] * 5
  # depth_prob is still checked, but does not move a uniform set's draw.
  assert lm_evolver.method_probabilities(
      0.1, template_set="evolinstruct").tolist() == [0.2] * 5
  with pytest.raises(ValueError, match="draws its methods uniformly"):
    lm_evolver.method_probabilities(0.5, {"deepen": 1}, template_set="evolinstruct")
  with pytest.raises(ValueError, match="unknown template set 'wizardlm'"):
    lm_evolver.plan_chains(2, 1, np.random.default_rng(0), template_set="wizardlm")


def _todays_plan(num_prompts, num_chained, gen, probs_M):
  """The plan as drawn before template sets existed: one choice over the ten methods with the
  given probabilities, then for "mix" a uniform draw among the other prompts."""
  plan = []
  for prompt in range(num_prompts):
    chain = []
    for _ in range(num_chained):
      method = templates.EVOLUTION_METHODS[gen.choice(10, p=probs_M)]
      other = None
      if method == "mix":
        other = int(gen.integers(num_prompts - 1))
        other += other >= prompt
      chain.append(lm_evolver.PlannedStep(method, other))
    plan.append(chain)
  return plan


@pytest.mark.parametrize("num_prompts", [1, 3, 200])
def test_default_template_set_keeps_todays_plans(num_prompts):
  """The "eva" set (the default) draws exactly today's plans: the same steps, draw for draw,
  as the ten methods at 0.1 each (hand-computed; "mix" 0 and the other in-breadth 0.125 with a
  single prompt), and as the explicit arguments."""
  uniform = np.full(10, 0.1)
  if num_prompts == 1:
    uniform = np.array([0.1] * 5 + [0.125, 0.125, 0.125, 0.0, 0.125])
  default = lm_evolver.plan_chains(num_prompts, 4, np.random.default_rng(3))
  assert default == _todays_plan(num_prompts, 4, np.random.default_rng(3), uniform)
  assert default == lm_evolver.plan_chains(num_prompts, 4, np.random.default_rng(3),
                                           depth_prob=0.5, method_weights=None,
                                           template_set="eva")
  weights = {"deepen": 3, "expand": 1, "persona": 1, "mix": 2}
  assert lm_evolver.plan_chains(num_prompts, 4, np.random.default_rng(4), depth_prob=0.7,
                                method_weights=weights, template_set="eva") == \
      lm_evolver.plan_chains(num_prompts, 4, np.random.default_rng(4), depth_prob=0.7,
                             method_weights=weights)


@pytest.fixture(scope="module")
def evol_tok(tmp_path_factory):
  """`tok`, trained on every template set's templates and EvolInstruct's rewrites as well."""
  corpus = [text for name in templates.TEMPLATE_SETS.names()
            for text in templates.load_templates(name).values()] + PROMPTS + [LONG_PROMPT, REFUSAL]
  corpus += [f"Sure! {OPEN}{harder(p, m, 0)}{CLOSE}" for p in PROMPTS
             for m in templates.TEMPLATE_NAMES]
  return tk.train_sentencepiece(corpus, str(tmp_path_factory.mktemp("evol_tok")),
                                vocab_size=1000)


class FailsOnceSampler(ScriptedSampler):
  """`ScriptedSampler` for the EvolInstruct templates, where the sky prompt's first reply is cut
  off (unusable) and every later request to rewrite it gets a normal rewrite."""

  def __init__(self, tok):
    super().__init__(tok)
    self.endings = {name: text.rsplit("}", 1)[1].strip()
                    for name, text in templates.load_templates("evolinstruct").items()}

  def _reply(self, request):
    text, ends = super()._reply(request)
    original, method, _ = self.requests[-1]
    if original == PROMPTS[2] and self.seen[original] > 1:
      self.rewrites += 1
      return f"Sure! {OPEN}{harder(original, method, self.rewrites)}{CLOSE}", True
    return text, ends


@pytest.mark.parametrize("continue_after_unusable", [None, False])
def test_evolinstruct_chain_goes_on_from_the_last_usable_prompt(
    evol_tok, tiny_model, monkeypatch, caplog, continue_after_unusable):
  """EvolInstruct's chain (the set's default) sends all 3 requests of the sky chain: its cut-off
  first reply is "empty", step 2 rewrites the sky prompt again and step 3 rewrites step 2. With
  continue_after_unusable=False (our "eva" behaviour) the sky chain ends after step 1."""
  config, params = tiny_model
  scripted = FailsOnceSampler(evol_tok)
  monkeypatch.setattr(sampling, "sample", scripted)
  buffer = make_buffer([PROMPTS[0], PROMPTS[2]])
  evolver = LMEvolver(config, params, evol_tok, num_chained=3, max_new_tokens=96, batch_size=4,
                      template_set="evolinstruct",
                      continue_after_unusable=continue_after_unusable)
  assert evolver.continue_after_unusable is (continue_after_unusable is None)
  with caplog.at_level(logging.INFO):
    added = creator.evolve_round(buffer, ["0-0", "0-1"], evolver, rng=5, iteration=1,
                                 tokenizer_len_fn=lambda t: len(evol_tok.encode(t)))
  assert all(method in EVOLINSTRUCT for _, method, _ in scripted.requests)
  originals = [original for original, _, _ in scripted.requests]
  sort = [r for r in added if r.root_id == "0-0"]
  sky = [r for r in added if r.root_id == "0-1"]
  assert [r.step for r in sort] == [1, 2, 3]
  if continue_after_unusable is False:
    # Requests: (sort, sky), then sort alone twice.
    assert originals == [PROMPTS[0], PROMPTS[2], sort[0].text, sort[1].text]
    assert "kept 3 of 4 evolved prompts" in caplog.text and sky == []
    return
  # Requests: (sort, sky), (sort 1, sky again), (sort 2, sky 2).
  assert originals == [PROMPTS[0], PROMPTS[2], sort[0].text, PROMPTS[2], sort[1].text,
                       sky[0].text]
  assert "kept 5 of 6 evolved prompts" in caplog.text and "'empty': 1" in caplog.text
  # Sky's step 2 rewrote the sky prompt (its parent), step 3 rewrote step 2.
  assert [(r.parent_id, r.step) for r in sky] == [("0-1", 2), (sky[0].id, 3)]
  assert sky[0].text.startswith(PROMPTS[2] + " Then do it the")
  assert sky[1].text.startswith(sky[0].text + " Then do it the")


def test_from_config_reads_the_template_set(tok, tiny_model):
  config, params = tiny_model
  cfg = default_config.get_config().creator
  policy = stages.Policy(config, params, tok, None)
  evolver = lm_evolver.from_config(cfg, source=None, policy=policy)
  assert (evolver.template_set, evolver.continue_after_unusable) == ("eva", False)
  cfg.template_set = "evolinstruct"
  evolver = lm_evolver.from_config(cfg, source=None, policy=policy)
  assert (evolver.template_set, evolver.continue_after_unusable) == ("evolinstruct", True)
  cfg.template_set = "wizardlm"
  with pytest.raises(ValueError, match="unknown template set 'wizardlm'"):
    lm_evolver.from_config(cfg, source=None, policy=policy)


def test_from_config_loads_a_separate_creator_model(tok, tiny_model, tmp_path):
  """creator.model names an HF folder: the evolver samples with that model's weights and
  tokenizer (saved here by `hf.save` beside a copy of the tokenizer), not the policy's; it is
  read once and reused; a bad folder is one config error."""
  import shutil
  from eva_jax import config_check
  from eva_jax.models import hf
  config, params = tiny_model
  other = models.tiny("llama", vocab_size=tok.vocab_size, num_layers=1)
  other_params = jax.jit(models.init_params, static_argnums=0)(other, jax.random.key(7))
  folder = str(tmp_path / "creator")
  hf.save(folder, other, other_params)
  for name in os.listdir(tok.path):
    shutil.copy(os.path.join(tok.path, name), folder)
  cfg = default_config.get_config().creator
  cfg.evolver, cfg.model = "lm", folder
  policy = stages.Policy(config, params, tok, None)
  evolver = lm_evolver.from_config(cfg, source=None, policy=policy)
  assert evolver.config.num_layers == 1 and config.num_layers != 1
  for ours, saved in zip(jax.tree.leaves(evolver.params), jax.tree.leaves(other_params)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(saved))
  assert evolver.tokenizer.path == folder
  assert lm_evolver.from_config(cfg, source=None, policy=policy).params is evolver.params
  c = default_config.get_config()
  c.creator.model = str(tmp_path / "missing")
  c.creator.evolver = "lm"
  with pytest.raises(ValueError, match="creator.model: checkpoint folder .* does not exist"):
    config_check.validate(c)
