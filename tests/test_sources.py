"""Prompt sources: held-out and training prompts disjoint by construction, a too-small set
refused with its numbers, dataset ids carried along, and the same prompts from a file and from
its prepared tfds set."""
import json

import pytest

from configs import default as default_config
from eva_jax import data, sources, synthetic

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
