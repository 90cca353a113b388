"""Benchmark answers from a run's checkpoint, in the files the public judges read.

    python -m eva_jax.answer --workdir=RUN --bench=alpaca_eval --questions=alpaca_eval.json \\
        --out=answers/my_model.json [--step=N] [--model_id=my_model]
    python -m eva_jax.answer --workdir=RUN --bench=arena_hard --questions=question.jsonl \\
        --out=model_answer/my_model.jsonl
    python -m eva_jax.answer --workdir=RUN --bench=mt_bench --questions=question.jsonl \\
        --out=model_answer/my_model.jsonl

The policy is checkpoint --step of the run in --workdir (default: its latest; 0 is the
warm-start; for an online run, t is online step t), set up from the run's saved config.json.
Generation settings default to those the eva authors ran (their repo's `benchmark/` folder):

- alpaca_eval: questions a JSON list (or JSONL) of {"instruction", "dataset"?}. Temperature
  0.7, top-p 0.9, 2048 new tokens (their alpaca_eval vLLM model configs). Judge
  gpt-4-1106-preview (their annotator `alpaca_eval_gpt4_turbo_fn`) against AlpacaEval 2's
  default baseline gpt4_turbo (gpt-4-1106-preview's outputs); length-controlled win rate.
- arena_hard: JSONL {"question_id", "turns": [{"content"}]}. Greedy, 4096 new tokens (their
  `gen_answer_config.yaml`). Judge gpt-4-1106-preview, pairwise against gpt-4-0314
  (`judge_config.yaml`).
- mt_bench: JSONL {"question_id", "category", "turns": [q1, q2]}. Temperature by category as
  FastChat's llm_judge (`MT_BENCH_TEMPERATURES`, others 0.7), top-p 1, 1024 new tokens
  (its `gen_model_answer.py`). GPT-4 grades each answer alone, 1-10 per turn.

MT-Bench's second turn is answered from the conversation [q1, the model's own first answer, q2]
rendered by the tokenizer's chat template. Temperature 0 samples greedily. Prompts keep their
last --max_prompt_length tokens (default: what the model's positions leave after the answer).

Sampling keys derive from --seed (and the turn, and the temperature of an MT-Bench category
group), chunks of --batch_size questions from those, and `tstamp` holds the checkpoint's step
(the judges never read it), so the same flags give the same bytes.
Bad question files raise one ValueError naming the file, line (or item) and field.
"""
from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from eva_jax import console, context, export, fileio, online_loop, stages, train_state
from eva_jax import workdir as wd

BENCHES = ("alpaca_eval", "arena_hard", "mt_bench")


@dataclasses.dataclass(frozen=True)
class Settings:
  temperature: Optional[float]  # None: by question category (MT-Bench).
  top_p: float
  max_new_tokens: int


DEFAULTS = {"alpaca_eval": Settings(0.7, 0.9, 2048), "arena_hard": Settings(0.0, 1.0, 4096),
            "mt_bench": Settings(None, 1.0, 1024)}
# FastChat llm_judge's temperature by MT-Bench category; other categories sample at 0.7.
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                         "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
MT_BENCH_OTHER_TEMPERATURE = 0.7


@dataclasses.dataclass(frozen=True)
class Question:
  id: Any  # question_id (the item's index for AlpacaEval, which has none).
  turns: tuple[str, ...]
  category: Optional[str] = None
  dataset: Optional[str] = None  # AlpacaEval's subset name.


def _field(row: Any, key: str, where: str, *, kinds=(str,), optional: bool = False) -> Any:
  if not isinstance(row, dict):
    raise ValueError(f"{where}: must be a JSON object, got {type(row).__name__}")
  if key not in row:
    if optional:
      return None
    raise ValueError(f"{where}: missing field {key!r}")
  value = row[key]
  if isinstance(value, bool) or not isinstance(value, kinds) or value in ("", []):
    names = " or ".join(t.__name__ for t in kinds)
    raise ValueError(f"{where}: field {key!r} must be a non-empty {names}, got {value!r:.80}")
  return value


def _rows(path: str) -> list[tuple[str, Any]]:
  """(where, item) of a JSON list file or of a JSONL file."""
  text = fileio.read_text(path)
  if text.lstrip().startswith("["):
    try:
      items = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    rows = [(f"{path}: item {i}", item) for i, item in enumerate(items)]
  else:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        rows.append((f"{path}:{number}", json.loads(line)))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
  if not rows:
    raise ValueError(f"{path}: no questions (empty file)")
  return rows


def read_questions(bench: str, path: str) -> list[Question]:
  """The questions of a benchmark's question file, in file order."""
  _check_bench(bench)
  if not fileio.exists(path):
    raise ValueError(f"{path}: question file does not exist")
  questions, first = [], {}
  for index, (where, row) in enumerate(_rows(path)):
    if bench == "alpaca_eval":
      q = Question(index, (_field(row, "instruction", where),),
                   dataset=_field(row, "dataset", where, optional=True))
    elif bench == "arena_hard":
      turns = _field(row, "turns", where, kinds=(list,))
      if len(turns) != 1:
        raise ValueError(f"{where}: field 'turns' must hold one turn, got {len(turns)}")
      q = Question(_field(row, "question_id", where), (_field(turns[0], "content",
                                                              f"{where}: turns[0]"),),
                   category=_field(row, "category", where, optional=True))
    else:
      turns = _field(row, "turns", where, kinds=(list,))
      if len(turns) != 2 or not all(isinstance(t, str) and t for t in turns):
        raise ValueError(f"{where}: field 'turns' must hold two non-empty strings, got "
                         f"{turns!r:.80}")
      q = Question(_field(row, "question_id", where, kinds=(int, str)), tuple(turns),
                   category=_field(row, "category", where))
    if q.id in first:
      raise ValueError(f"{where}: field 'question_id' {q.id!r} repeats {first[q.id]}")
    first[q.id] = where
    questions.append(q)
  with_dataset = [q.dataset is not None for q in questions]
  if any(with_dataset) and not all(with_dataset):
    where = _rows(path)[with_dataset.index(False)][0]
    raise ValueError(f"{where}: missing field 'dataset' (other items have one)")
  return questions


def _check_bench(bench: str) -> None:
  if bench not in BENCHES:
    raise ValueError(f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHES)}")


def load_policy(workdir: str, step: Optional[int] = None) -> tuple[stages.Policy, int]:
  """(the policy of checkpoint `step`, step) of the run in `workdir`; step None: the latest.

  The checkpoints are opened read-only: a run still going in the workdir is left alone."""
  config_path = fileio.join(workdir, "config.json")
  if not fileio.exists(config_path):
    raise ValueError(f"{workdir}: no run here (no config.json); pass the --workdir of a run")
  c = ml_collections.ConfigDict(json.loads(fileio.read_text(config_path)))
  # An online run keeps θ_0 (the warm-start) with the offline checkpoints, its steps apart.
  folders = [workdir] + ([fileio.join(workdir, "online")] if "online" in c else [])
  steps = {}
  for folder in folders:
    if fileio.exists(fileio.join(folder, "checkpoints")):
      ckpts = wd.Checkpoints(folder, read_only=True)
      steps.update({s: (folder, ckpts) for s in ckpts.manager.all_steps()})
  try:
    if not steps:
      raise ValueError(f"{workdir}: the run has no checkpoint yet")
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f"{workdir}: no checkpoint {step} (kept: "
                       f"{', '.join(map(str, sorted(steps)))})")
    folder, ckpts = steps[step]
    policy = context.load_policy(c, workdir, context.make_mesh(c.mesh))
    if folder == workdir:
      # Context.policy_at reads only the config, the policy and the checkpoints.
      run = context.Context(c, workdir, policy, source=None, scorer=None, metrics=None,
                            checkpoints=ckpts)
      return run.policy_at(step), step
    optimizer = train_state.make_optimizer(online_loop.optimizer_config(c))
    return policy.with_params(context.restore_state(ckpts, policy, optimizer, step).params), step
  finally:
    for _, ckpts in {id(v[1]): v for v in steps.values()}.values():
      ckpts.close()


def turn_key(seed: int, turn: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), turn)


def _temperatures(questions: Sequence[Question], settings: Settings) -> list[float]:
  if settings.temperature is not None:
    return [settings.temperature] * len(questions)
  return [MT_BENCH_TEMPERATURES.get(q.category, MT_BENCH_OTHER_TEMPERATURE) for q in questions]


def generate_turn(policy: stages.Policy, chats: Sequence[Any], temperatures: Sequence[float], *,
                  key, top_p: float, max_new_tokens: int, max_prompt_length: int,
                  batch_size: int, desc: str, progress=stages.no_progress) -> dict:
  """One answer per chat (a prompt string or a message list) -> {"texts" [P], "lengths" [P]
  (answer tokens, the stop token excluded), "finished" [P]}.

  Chats of one temperature sample together, with fold_in(key, 1000 x temperature)."""
  texts = [""] * len(chats)
  lengths, finished = np.zeros(len(chats), np.int64), np.zeros(len(chats), bool)
  for temperature in sorted(set(temperatures)):
    rows = [i for i, t in enumerate(temperatures) if t == temperature]
    settings = types.SimpleNamespace(
        num_samples=1, temperature=temperature, top_p=top_p, top_k=0,
        max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
        batch_size=batch_size)
    gen = stages.generate(policy, [chats[i] for i in rows],
                          key=jax.random.fold_in(key, round(1000 * temperature)),
                          sampling_cfg=settings, progress=progress, desc=desc)
    for j, i in enumerate(rows):
      texts[i] = gen["texts"][j][0]
      finished[i] = bool(gen["finished"][j, 0])
      lengths[i] = int(gen["lengths"][j, 0]) - int(finished[i])
  return {"texts": texts, "lengths": lengths, "finished": finished}


def answer(policy: stages.Policy, bench: str, questions: Sequence[Question], *, seed: int,
           settings: Settings, max_prompt_length: int, batch_size: int,
           progress=stages.no_progress) -> list[dict]:
  """Each turn's generate_turn output, in turn order (MT-Bench: two, the second from the
  conversation [q1, own answer 1, q2])."""
  temperatures = _temperatures(questions, settings)
  kw = dict(top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
            max_prompt_length=max_prompt_length, batch_size=batch_size, progress=progress)
  first = generate_turn(policy, [q.turns[0] for q in questions], temperatures,
                        key=turn_key(seed, 0), desc=f"{bench} turn 1", **kw)
  if bench != "mt_bench":
    return [first]
  chats = [[{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": a},
            {"role": "user", "content": q.turns[1]}]
           for q, a in zip(questions, first["texts"])]
  return [first, generate_turn(policy, chats, temperatures, key=turn_key(seed, 1),
                               desc=f"{bench} turn 2", **kw)]


def write(bench: str, path: str, questions: Sequence[Question], turns: Sequence[dict],
          model_id: str, *, tstamp: float) -> None:
  """The answers in `bench`'s answer format (eva_jax.export), written atomically."""
  ids = [q.id for q in questions]
  if bench == "alpaca_eval":
    datasets = [q.dataset for q in questions]
    export.write_alpaca_eval(path, [q.turns[0] for q in questions], turns[0]["texts"], model_id,
                             dataset=None if datasets[0] is None else datasets)
  elif bench == "arena_hard":
    export.write_arena_hard(path, ids, turns[0]["texts"], model_id,
                            [int(n) for n in turns[0]["lengths"]], tstamp=tstamp)
  else:
    export.write_mt_bench(path, ids, [list(t) for t in zip(*(turn["texts"] for turn in turns))],
                          model_id, tstamp=tstamp)


VALIDATORS = {"alpaca_eval": export.validate_alpaca_eval,
              "arena_hard": export.validate_arena_hard, "mt_bench": export.validate_mt_bench}


def run(workdir: str, bench: str, questions_path: str, out: str, *, step: Optional[int] = None,
        model_id: Optional[str] = None, limit: Optional[int] = None, seed: int = 0,
        temperature: Optional[float] = None, top_p: Optional[float] = None,
        max_new_tokens: Optional[int] = None, max_prompt_length: Optional[int] = None,
        batch_size: int = 16, progress=console.bar) -> dict:
  """Answers the questions with checkpoint `step` of the run in `workdir`, writes `out`;
  returns the summary {"answers", "step", "mean_length", "finished"}. None: the bench's
  default (DEFAULTS); model_id defaults to the out file's name without its extension."""
  _check_bench(bench)
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be >= 1, got {limit}")
  questions = read_questions(bench, questions_path)[:limit]
  default = DEFAULTS[bench]
  settings = Settings(default.temperature if temperature is None else temperature,
                      default.top_p if top_p is None else top_p,
                      default.max_new_tokens if max_new_tokens is None else max_new_tokens)
  if settings.temperature is not None and settings.temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {settings.temperature}")
  if not 0 < settings.top_p <= 1:
    raise ValueError(f"top_p must lie in (0, 1], got {settings.top_p}")
  if settings.max_new_tokens < 1 or batch_size < 1:
    raise ValueError(f"max_new_tokens and batch_size must be >= 1, got "
                     f"{settings.max_new_tokens} and {batch_size}")
  policy, step = load_policy(workdir, step)
  positions = policy.model_config.max_position_embeddings
  if max_prompt_length is None:
    max_prompt_length = positions - settings.max_new_tokens
  if max_prompt_length < 1 or max_prompt_length + settings.max_new_tokens > positions:
    raise ValueError(f"max_prompt_length {max_prompt_length} + max_new_tokens "
                     f"{settings.max_new_tokens} must fit the model's {positions} positions; "
                     "pass a smaller --max_new_tokens (or --max_prompt_length)")
  model_id = model_id or fileio.path(out).name.rsplit(".", 1)[0]
  turns = answer(policy, bench, questions, seed=seed, settings=settings,
                 max_prompt_length=max_prompt_length, batch_size=batch_size, progress=progress)
  # The checkpoint's step rather than the clock: a rerun writes the same bytes.
  write(bench, out, questions, turns, model_id, tstamp=float(step))
  VALIDATORS[bench](out)
  lengths = np.concatenate([t["lengths"] for t in turns])
  finished = np.concatenate([t["finished"] for t in turns])
  return {"answers": len(questions), "step": step, "mean_length": float(lengths.mean()),
          "finished": float(finished.mean())}


def main(argv) -> None:
  del argv
  from absl import flags
  f = flags.FLAGS
  console.quiet_logs(f["verbosity"].value if f["verbosity"].present else None)
  console.configure(progress={"auto": None, "on": True, "off": False}[f.progress])
  context.init_distributed()
  summary = run(f.workdir, f.bench, f.questions, f.out, step=f.step, model_id=f.model_id,
                limit=f.limit, seed=f.seed, temperature=f.temperature, top_p=f.top_p,
                max_new_tokens=f.max_new_tokens, max_prompt_length=f.max_prompt_length,
                batch_size=f.batch_size)
  console.say(f"{f.bench}: {summary['answers']} answers from checkpoint {summary['step']} "
              f"written to {f.out}; mean length {summary['mean_length']:.1f} tokens, "
              f"finished {summary['finished']:.3f}")


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "The run's workdir (holds config.json, checkpoints/).")
  flags.DEFINE_enum("bench", None, list(BENCHES), "Which benchmark's questions and format.")
  flags.DEFINE_string("questions", None, "The benchmark's question file (local path or gs://).")
  flags.DEFINE_string("out", None, "Answer file to write; name it <model_id>.jsonl (.json).")
  flags.DEFINE_integer("step", None, "Checkpoint to answer with (default: the latest).")
  flags.DEFINE_string("model_id", None, "Model name in the file (default: --out's stem).")
  flags.DEFINE_integer("limit", None, "Answer only the first K questions.")
  flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed writes the same file.")
  flags.DEFINE_float("temperature", None, "Override the bench's temperature (0: greedy).")
  flags.DEFINE_float("top_p", None, "Override the bench's top-p.")
  flags.DEFINE_integer("max_new_tokens", None, "Override the bench's answer length cap.")
  flags.DEFINE_integer("max_prompt_length", None,
                       "Prompt tokens kept (default: the model's positions - max_new_tokens).")
  flags.DEFINE_integer("batch_size", 16, "Questions per sampling call (bounds the KV cache).")
  flags.DEFINE_enum("progress", "auto", ["auto", "on", "off"],
                    "Progress bars on stderr: auto = only when it is a terminal.")
  flags.mark_flags_as_required(["workdir", "bench", "questions", "out"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
