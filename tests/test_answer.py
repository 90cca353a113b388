"""Benchmark answers (eva_jax.answer) from the session's smoke run (conftest.py:
smoke_reference, checkpoints 1 and 2), checked against the export validators, the tokenizer's own
chat template, an independent Orbax restore and direct sampling."""
import json
import shutil
import types

import jax
import numpy as np
import pytest

from eva_jax import answer, export, sampling, stages
from tests import checkpoints, shared_data

pytestmark = pytest.mark.xdist_group("smoke")  # Beside the other users of the smoke run.

# Tiny shapes, every prompt in one width bucket (33-64 tokens, second turns included) and one
# batch bucket, and no greedy sampling (temperature values do not recompile): the whole file
# compiles one prefill and one decode.
SMALL = dict(limit=3, max_new_tokens=8, max_prompt_length=64, batch_size=4, top_p=0.9,
             progress=stages.no_progress)
MT_BENCH = [
    {"question_id": 81, "category": "writing",
     "turns": ["Write a short poem about the sea and sky.", "More?"]},
    {"question_id": 131, "category": "stem",
     "turns": ["Sort these numbers: 4 1 3 2 5 9 8 7.", "Why?"]},
    {"question_id": "x", "category": "other",
     "turns": ["Name a colour and say why you like it.", "Again?"]},
]
ALPACA = [{"instruction": "Count to three and then back down to one.", "dataset": "helpful_base"},
          {"instruction": "Sort 3 1 2 and add 4 5 to the list too.", "dataset": "koala"},
          {"instruction": "Say hi to the whole team in one short line.", "dataset": "oasst"}]
ARENA = [{"question_id": f"q{i}", "category": "arena-hard-v0.1", "cluster": "c",
          "turns": [{"content": f"Explain question {i} in one short line."}]} for i in range(4)]


@pytest.fixture(scope="module")
def run_dir(smoke_reference, tmp_path_factory):
  """A copy of the smoke run, so that nothing here can touch the shared reference."""
  return str(shutil.copytree(smoke_reference, tmp_path_factory.mktemp("answer") / "run"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("questions")
  (folder / "mt.jsonl").write_text("".join(json.dumps(q) + "\n" for q in MT_BENCH))
  (folder / "alpaca.json").write_text(json.dumps(ALPACA))
  (folder / "arena.jsonl").write_text("".join(json.dumps(q) + "\n" for q in ARENA))
  return {"mt_bench": str(folder / "mt.jsonl"), "alpaca_eval": str(folder / "alpaca.json"),
          "arena_hard": str(folder / "arena.jsonl")}


def _run(run_dir, files, bench, out, **kw):
  return answer.run(run_dir, bench, files[bench], str(out), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def answers(run_dir, files, tmp_path_factory):
  """Each bench answered once at the latest checkpoint: {bench: (path, summary)}, and the token
  ids of every prompt sampled for MT-Bench, in sampling order ("mt_bench_prompts")."""
  folder = tmp_path_factory.mktemp("answers")
  out = {}
  for bench, name in (("alpaca_eval", "m.json"), ("arena_hard", "m.jsonl"),
                      ("mt_bench", "m.jsonl")):
    seen, real = [], sampling.sample_batched

    def spy(config, params, prompt_ids, **kw):
      seen.extend(list(map(list, prompt_ids)))
      return real(config, params, prompt_ids, **kw)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(sampling, "sample_batched", spy)
      path = folder / bench / name
      # Arena-Hard's greedy default would compile a second decode.
      kw = dict(temperature=0.7) if bench == "arena_hard" else {}
      out[bench] = (path, _run(run_dir, files, bench, path, seed=3, **kw))
    out[f"{bench}_prompts"] = seen
  return out


def test_each_bench_validates_with_one_answer_per_question_in_order(answers, files):
  for bench, validate in (("alpaca_eval", export.validate_alpaca_eval),
                          ("arena_hard", export.validate_arena_hard),
                          ("mt_bench", export.validate_mt_bench)):
    path, summary = answers[bench]
    records = validate(str(path))
    assert summary["answers"] == len(records) == 3 and summary["step"] == 2
    assert 0 <= summary["finished"] <= 1 and 0 < summary["mean_length"] <= 8
    # Every prompt within its width bucket and untruncated (the premise of the cheap shapes).
    assert all(33 <= len(ids) <= 64 for ids in answers[f"{bench}_prompts"])
    if bench == "alpaca_eval":
      assert [(r["instruction"], r["dataset"], r["generator"]) for r in records] == [
          (q["instruction"], q["dataset"], "m") for q in ALPACA]
      continue
    questions = MT_BENCH if bench == "mt_bench" else ARENA
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions[:3]]
    assert all(r["model_id"] == "m" for r in records)
    turns = [len(r["choices"][0]["turns"]) for r in records]
    assert turns == [2 if bench == "mt_bench" else 1] * 3


def test_arena_hard_question_file_reads_in_order():
  path = shared_data.arena_path()
  lines = [json.loads(line) for line in open(path)]
  questions = answer.read_questions("arena_hard", str(path))
  assert [q.id for q in questions] == [q["question_id"] for q in lines] and len(lines) == 500
  assert [q.turns for q in questions] == [(q["turns"][0]["content"],) for q in lines]


def test_mt_bench_second_turn_is_the_templated_conversation_with_own_answer(answers, run_dir):
  records = export.validate_mt_bench(str(answers["mt_bench"][0]))
  policy, _ = answer.load_policy(run_dir, 2)
  hf = policy.tokenizer.hf
  first, second = [], []
  for q, r in zip(MT_BENCH, records):
    messages = [{"role": "user", "content": q["turns"][0]}]
    first.append(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    messages += [{"role": "assistant", "content": r["choices"][0]["turns"][0]},
                 {"role": "user", "content": q["turns"][1]}]
    second.append(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
  ids = lambda x: list(x["input_ids"] if hasattr(x, "keys") else x)  # noqa: E731
  # Questions of one temperature sample together, coldest first: stem (0.1), then writing and
  # "other" (0.7); the second turn samples the same groups.
  order = [1, 0, 2]
  assert answers["mt_bench_prompts"] == [ids(first[i]) for i in order] + [
      ids(second[i]) for i in order]


def test_same_seed_same_bytes_and_step_selects_its_checkpoint(answers, run_dir, files, tmp_path):
  again, step1 = tmp_path / "again" / "m.jsonl", tmp_path / "step1" / "m.jsonl"
  _run(run_dir, files, "arena_hard", again, seed=3, temperature=0.7)
  assert again.read_bytes() == answers["arena_hard"][0].read_bytes()
  _run(run_dir, files, "arena_hard", step1, seed=3, step=1, temperature=0.7)
  # Checkpoint 1's params, restored without a target tree (tests/checkpoints.py).
  policy, step = answer.load_policy(run_dir, 1)
  params = [np.asarray(p).tobytes() for p in jax.tree.leaves(policy.params)]
  restored = {a.tobytes() for a in checkpoints.checkpoint_arrays(run_dir, 1)[1]}
  latest = {a.tobytes() for a in checkpoints.checkpoint_arrays(run_dir, 2)[1]}
  assert step == 1 and all(p in restored for p in params)
  assert not all(p in latest for p in params)
  # The documented keys: turn 0 of the seed, folded with 1000 x temperature, sampled directly.
  settings = types.SimpleNamespace(num_samples=1, temperature=0.7, top_p=0.9, top_k=0,
                                   max_new_tokens=8, max_prompt_length=64, batch_size=4)
  gen = stages.generate(policy, [q["turns"][0]["content"] for q in ARENA[:3]],
                        key=jax.random.fold_in(answer.turn_key(3, 0), 700), sampling_cfg=settings)
  assert [r["choices"][0]["turns"][0]["content"] for r in export.validate_arena_hard(str(step1))] \
      == [t[0] for t in gen["texts"]]


@pytest.mark.parametrize("bench,text,message", [
    ("mt_bench", '{"question_id": 1, "category": "math", "turns": ["a"]}\n',
     r"q\.jsonl:1: field 'turns' must hold two"),
    ("mt_bench", '{"question_id": 1, "category": "math", "turns": ["a", "b"]}\n'
     '{"category": "math", "turns": ["a", "b"]}\n',
     r"q\.jsonl:2: missing field 'question_id'"),
    ("arena_hard", '{"question_id": "a", "turns": [{"text": "x"}]}\n',
     r"q\.jsonl:1: turns\[0\]: missing field 'content'"),
    ("arena_hard", '{"question_id": "a", "turns": [{"content": "x"}]}\nnot json\n',
     r"q\.jsonl:2: not valid JSON"),
    ("alpaca_eval", '[{"instruction": "x"}, {"instruction": ""}]',
     r"q\.jsonl: item 1: field 'instruction' must be a non-empty str"),
    ("alpaca_eval", '{"instruction": "x", "dataset": "d"}\n{"instruction": "y"}\n',
     r"q\.jsonl:2: missing field 'dataset'"),
])
def test_bad_question_file_is_one_clear_error(tmp_path, bench, text, message):
  path = tmp_path / "q.jsonl"
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    answer.read_questions(bench, str(path))


def test_bad_bench_workdir_or_step_is_one_clear_error(run_dir, files, tmp_path):
  with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
    answer.run(run_dir, "mmlu", files["mt_bench"], str(tmp_path / "m.jsonl"))
  with pytest.raises(ValueError, match="no run here"):
    answer.run(str(tmp_path), "mt_bench", files["mt_bench"], str(tmp_path / "m.jsonl"))
  with pytest.raises(ValueError, match=r"no checkpoint 7 \(kept: 1, 2\)"):
    answer.run(run_dir, "mt_bench", files["mt_bench"], str(tmp_path / "m.jsonl"), step=7)
  assert not (tmp_path / "m.jsonl").exists()
