"""Prompt sources: held-out and training prompts disjoint by construction, a too-small set
refused with its numbers, dataset ids carried along, and the same prompts from a file and from
its prepared tfds set."""
import json

import pytest

from configs import default as default_config
from eva_jax import data, sources, synthetic
from tests import shared_data

# 30 prompts with Arena-Hard style ids.
ROWS = [{"question_id": f"q{i:02d}", "prompt": f"prompt number {i}"} for i in range(30)]


def _config(path, *, source="jsonl", num_prompts=8, iterations=3, heldout=6, enabled=True):
  c = default_config.get_config("smoke")
  c.data.source, c.data.path = source, str(path)
  c.data.num_prompts, c.data.heldout_per_level = num_prompts, heldout
  c.iterations, c.creator.enabled = iterations, enabled
  return c


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  return path


def test_heldout_and_training_chunks_are_disjoint_and_cover_the_file(prompt_file):
  # 6 held out + 3 iterations x 8 = 30: exactly the file, no prompt used twice.
  source = sources.make(_config(prompt_file))
  held = source.heldout()
  chunks = [source.base_prompts(t) for t in range(3)]
  assert len(held) == 6 and [len(ch) for ch in chunks] == [8, 8, 8]
  ids = [p.id for p in held] + [p.id for ch in chunks for p in ch]
  assert sorted(ids) == [r["question_id"] for r in ROWS]
  # Ids travel with their own text; the order is the seed's (a new seed, a new split).
  assert all(p.text == f"prompt number {int(p.id[1:])}" for p in held + chunks[0])
  other = sources.make(_config(prompt_file, iterations=1))
  assert other.heldout() == held and other.base_prompts(0) == chunks[0]


@pytest.mark.parametrize("iterations,num_prompts,enabled,needed", [
    (4, 8, True, 38),    # one iteration too many
    (3, 9, True, 33),    # one prompt per iteration too many
    # The static baseline draws 8 + round(8 x 0.25 x 1) = 10 prompts per iteration.
    (3, 8, False, 36),
])
def test_too_small_a_file_is_refused_with_the_numbers(prompt_file, iterations, num_prompts,
                                                      enabled, needed):
  c = _config(prompt_file, iterations=iterations, num_prompts=num_prompts, enabled=enabled)
  count = (needed - 6) // iterations
  with pytest.raises(ValueError, match=(
      rf"data.path: prompt file .* has 30 prompts, but 6 held-out \(data.heldout_per_level\) "
      rf"\+ {iterations} iterations x {count} prompts per iteration need {needed}")):
    sources.make(c)


def test_tfds_source_gives_the_file_source_prompts(prompt_file, tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "prompts.jsonl").write_text(prompt_file.read_text())
  data.prepare_prompt_set(manual, config="jsonl", data_dir=tmp_path / "tfds")
  c = _config("prompt_set/jsonl", source="tfds")
  c.data.data_dir = str(tmp_path / "tfds")
  from_tfds, from_file = sources.make(c), sources.make(_config(prompt_file))
  assert from_tfds.heldout() == from_file.heldout()
  assert from_tfds.base_prompts(2) == from_file.base_prompts(2)


def test_synthetic_source_is_the_synthetic_module():
  c = default_config.get_config("smoke")
  source = sources.make(c)
  assert [p.text for p in source.base_prompts(1)] == synthetic.base_prompts(
      c.data.num_prompts, c.seed * 1000 + 1, max_level=c.data.max_level)
  held = source.heldout()
  assert [(p.text, p.level) for p in held] == [
      (t, lv) for t, lv, _ in synthetic.heldout_set(c.seed + 10_000, c.data.heldout_per_level)]
  assert all(p.id is None for p in held)
  assert source.checker is synthetic.reward
  assert source.sft_examples(4, 2) == synthetic.sft_examples(4, c.seed, max_level=2)


def test_file_source_has_no_sft_examples_checker_or_evolver(prompt_file):
  source = sources.make(_config(prompt_file))
  assert source.sft_examples(10, 3) == [] and source.checker is None
  assert source.evolver(default_config.get_config().creator) is None


# --- topics (creator.selection "topic_weighted") ---


def test_synthetic_prompts_carry_their_task_name_as_topic():
  c = default_config.get_config("smoke")
  c.data.num_prompts = 64
  source = sources.make(c)
  prompts = source.base_prompts(0)
  for p in prompts:
    # The task name is the prompt's head: "sort then inc: 3 9 1", "count 3: 3 9 3 1".
    head = p.text.split(":")[0]
    assert p.topic in synthetic.TASK_NAMES
    assert p.topic == ("count" if head.startswith("count ") else head)
  assert len({p.topic for p in prompts}) > 3
  held = source.heldout()
  assert [p.topic for p in held] == [
      task for _, _, task in synthetic.heldout_set(c.seed + 10_000, c.data.heldout_per_level)]


@pytest.fixture(scope="module")
def topic_file(tmp_path_factory):
  """30 prompts: `source` s0 / s1 / s2 by i mod 3; `category` only on even rows."""
  rows = [{"prompt_id": f"p{i:02d}", "prompt": f"prompt number {i}", "source": f"s{i % 3}",
           **({"category": f"c{i % 4}"} if i % 2 == 0 else {})} for i in range(30)]
  path = tmp_path_factory.mktemp("topics") / "prompts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_file_prompts_take_their_topic_from_data_topic_field(topic_file):
  c = _config(topic_file)
  number = lambda p: int(p.text.split()[-1])  # noqa: E731
  every = lambda s: s.heldout() + [p for t in range(3) for p in s.base_prompts(t)]  # noqa: E731
  assert all(p.topic is None for p in every(sources.make(c)))  # "" by default: no topics
  c.data.topic_field = "source"
  by_source = every(sources.make(c))
  assert [p.topic for p in by_source] == [f"s{number(p) % 3}" for p in by_source]
  c.data.topic_field = "category"
  by_category = every(sources.make(c))
  assert [p.topic for p in by_category] == [
      f"c{number(p) % 4}" if number(p) % 2 == 0 else None for p in by_category]
  # The topic does not change which prompts are drawn.
  assert [p.text for p in by_category] == [p.text for p in by_source]


def test_a_bad_topic_field_is_refused(prompt_file, topic_file):
  c = _config(topic_file)
  c.data.topic_field = "topic"
  with pytest.raises(ValueError, match=r"data.topic_field: 'topic' is not a prompt field; "
                     r"expected one of \('source', 'category', 'cluster'\)"):
    sources.make(c)
  c = _config(prompt_file)  # No row has a category.
  c.data.topic_field = "category"
  with pytest.raises(ValueError, match=r"no prompt has a 'category' \(data.topic_field\)"):
    sources.make(c)


def test_arena_hard_prompts_take_their_cluster_as_topic():
  path = shared_data.arena_path()
  rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
  cluster_of = {r["turns"][0]["content"]: r["cluster"] for r in rows}
  c = _config(path, num_prompts=16, iterations=2, heldout=8)
  c.data.topic_field = "cluster"
  source = sources.make(c)
  prompts = source.heldout() + source.base_prompts(0) + source.base_prompts(1)
  assert [p.topic for p in prompts] == [cluster_of[p.text] for p in prompts]
  assert len({p.topic for p in prompts}) > 5


def test_prompt_topic_is_last_and_optional():
  assert sources.Prompt._fields == ("text", "id", "level", "topic")
  assert sources.Prompt("x", "q1", 2) == ("x", "q1", 2, None)
