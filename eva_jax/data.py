"""Prompt datasets: local prompt files, a tensorflow-datasets builder, per-process sharding.

Three file layouts are read, all into
`PromptExample(id, text, source, category, cluster)`:

- `jsonl`: one JSON object a line with the prompt under `prompt` (or `instruction`, or
  `turns[0]`), or a bare JSON string a line; a `.txt` file holds one plain-text prompt a line;
  a `.json` file holds a list of such objects (e.g. AlpacaEval's eval set, `instruction`).
- `arena_hard`: Arena-Hard questions, `{"question_id", "category", "cluster",
  "turns": [{"content"}]}`; MT-Bench's `question.jsonl` (`turns` a list of strings) reads the same.
  Only the first turn becomes the prompt.
- `ultrafeedback`: UltraFeedback prompts from a downloaded `.parquet` (needs pyarrow) or `.jsonl`,
  with `prompt` (HuggingFaceH4/ultrafeedback_binarized) or `instruction` (openbmb/UltraFeedback),
  and `prompt_id` / `source` when present.

Ids come from `id`, `prompt_id` or `question_id` (in that order); a row without one gets
`f"{file_stem}:{n}"`, n its 1-based line number (its 0-based row / item index in a parquet /
`.json` file). `source` is the row's own `source` field when it has one, else the layout's name;
`category` and `cluster` are the row's own fields or "" (Arena-Hard's `cluster` is its topic).

Prompt files are untrusted input; each of these is refused with a ValueError naming the file and
line (`.jsonl`, `.txt`), item (`.json`) or row (`.parquet`), never truncated or skipped: a
`.jsonl` / `.txt` line longer than `MAX_LINE_BYTES` (checked before it is parsed, so one huge
line never fills memory; the bound includes a JSONL row's other fields; `.json` and `.parquet`
files are read whole); bytes that are not UTF-8; a NUL byte in a line; a prompt longer than
`MAX_PROMPT_CHARS` characters; a prompt or id holding a NUL character or a lone surrogate
(JSON's "\\u0000", "\\ud800" escapes), which no tokenizer or UTF-8 writer takes.

`PromptSet` is a tfds builder over the same readers: its config names the layout and the file
patterns it reads from `manual_dir`; it writes `array_record` in file order (shuffling off,
integer keys) and is read back with `as_data_source` — no TensorFlow involved. Note that tfds
reuses a prepared dataset by (name, config, version) in `data_dir`: prepare a different file set
into a different `data_dir`, or pass `overwrite=True`.

`load_prompts` reads either a file or a prepared `prompt_set/<config>` and returns this process's
contiguous slice: process i of n gets items [P*i//n, P*(i+1)//n), so the slices are disjoint and
cover every prompt once, and every process computes the same split.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator, Optional, Sequence

import jax
from etils import epath
import tensorflow_datasets as tfds

FORMATS = ("jsonl", "arena_hard", "ultrafeedback")
_ID_KEYS = ("id", "prompt_id", "question_id")
_TEXT_KEYS = ("prompt", "instruction")
# A prompt longer than this (in characters) is an error: the longest prompts of the sets we read
# (Arena-Hard, UltraFeedback, AlpacaEval) are a few thousand characters.
MAX_PROMPT_CHARS = 100_000
# A .jsonl / .txt line longer than this (in bytes) is an error before it is decoded or parsed.
MAX_LINE_BYTES = 4 * 1024 * 1024
_PARQUET_COLUMNS = ("prompt", "instruction", "id", "prompt_id", "question_id", "source",
                    "category")
# A tfds spec for a prepared prompt set: "prompt_set/<config>" with an optional ":<version>".
_SPEC = re.compile(r"prompt_set/[a-z0-9_]+(:\d+\.\d+\.\d+)?")


@dataclasses.dataclass(frozen=True)
class PromptExample:
  """One prompt.

  Attributes:
    id: unique id within its prompt set (Arena-Hard `question_id`, UltraFeedback `prompt_id`...).
    text: the prompt (the first user turn).
    source: where it came from (the row's `source` field, else the layout name).
    category: the row's `category` ("" when it has none).
    cluster: the row's `cluster` (Arena-Hard's topic cluster; "" when it has none).
  """

  id: str
  text: str
  source: str
  category: str = ""
  cluster: str = ""


def _check_text(text: str, what: str, where: str) -> str:
  """`text`, or ValueError if it holds a NUL character or a lone surrogate."""
  if "\0" in text:
    raise ValueError(f"{where}: the {what} contains a NUL character (at {text.index(chr(0))})")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{where}: the {what} is not valid Unicode ({e.reason} at "
                     f"{e.start})") from None
  return text


def _scalar_id(value: Any, where: str) -> Optional[str]:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
    raise ValueError(f"{where}: id must be a non-empty string or an integer, got {value!r:.80}")
  return _check_text(str(value), "id", where)


def _first_turn(turns: Any, where: str) -> Any:
  if not isinstance(turns, (list, tuple)) or not turns:
    raise ValueError(f"{where}: 'turns' must be a non-empty list, got {turns!r:.80}")
  turn = turns[0]
  if isinstance(turn, dict):  # Arena-Hard: [{"content": ...}]; MT-Bench: plain strings.
    if "content" not in turn:
      raise ValueError(f"{where}: 'turns[0]' has no 'content' field")
    return turn["content"]
  return turn


def example_from_row(row: Any, *, fmt: str, fallback_id: str, where: str) -> PromptExample:
  """Normalises one parsed row (a dict, or a bare string prompt) of layout `fmt`.

  `where` ("file:line") names the row in errors; `fallback_id` is used when the row has no id.
  """
  if isinstance(row, str):
    if fmt == "arena_hard":
      raise ValueError(f"{where}: an Arena-Hard row must be an object, got a string")
    row = {"prompt": row}
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object or string, got {type(row).__name__}")
  if fmt == "arena_hard":
    missing = [k for k in ("question_id", "turns") if k not in row]
    if missing:
      raise ValueError(f"{where}: Arena-Hard row without {missing}")
    text = _first_turn(row["turns"], where)
  else:
    key = next((k for k in _TEXT_KEYS if row.get(k) is not None), None)
    if key is not None:
      text = row[key]
    elif fmt == "jsonl" and "turns" in row:
      text = _first_turn(row["turns"], where)
    else:
      keys = list(_TEXT_KEYS) + (["turns"] if fmt == "jsonl" else [])
      raise ValueError(f"{where}: no prompt field (expected one of {keys}); "
                       f"fields are {sorted(row)}")
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"{where}: the prompt must be a non-empty string, got {text!r:.80}")
  if len(text) > MAX_PROMPT_CHARS:
    raise ValueError(f"{where}: the prompt has {len(text)} characters, more than "
                     f"MAX_PROMPT_CHARS={MAX_PROMPT_CHARS}")
  _check_text(text, "prompt", where)
  prompt_id = next((_scalar_id(row[k], where) for k in _ID_KEYS if row.get(k) is not None),
                   fallback_id)
  source = row.get("source")
  category, cluster = row.get("category"), row.get("cluster")
  return PromptExample(id=prompt_id, text=text,
                       source=source if isinstance(source, str) and source else fmt,
                       category=category if isinstance(category, str) else "",
                       cluster=cluster if isinstance(cluster, str) else "")


def _lines(path: epath.Path) -> Iterator[tuple[int, str]]:
  """(1-based line number, text) of every line of a UTF-8 file; ValueError naming file:line for
  a line over MAX_LINE_BYTES, a NUL byte or bytes that are not UTF-8."""
  with path.open("rb") as f:
    line_number = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
      line_number += 1
      where = f"{path}:line {line_number}"
      if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
        raise ValueError(f"{where}: longer than MAX_LINE_BYTES={MAX_LINE_BYTES} bytes")
      if b"\0" in raw:
        raise ValueError(f"{where}: contains a NUL byte (at byte {raw.index(0) + 1})")
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start + 1})") from None
      yield line_number, line


def _jsonl_rows(path: epath.Path) -> Iterator[tuple[int, Any]]:
  for line_number, line in _lines(path):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
      raise ValueError(f"{path}:line {line_number}: not valid JSON "
                       f"({getattr(e, 'msg', 'nested too deeply')})") from None
    yield line_number, row


def _text_rows(path: epath.Path) -> Iterator[tuple[int, Any]]:
  for line_number, line in _lines(path):
    if line.strip():
      yield line_number, line.rstrip("\r\n")


def _json_array_rows(path: epath.Path) -> Iterator[tuple[int, Any]]:
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line_number = raw.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}:line {line_number}: not valid UTF-8 ({e.reason})") from None
  try:
    rows = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  except RecursionError:
    raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
  if not isinstance(rows, list):
    raise ValueError(f"{path}: a .json prompt file must hold a list, got {type(rows).__name__}")
  yield from enumerate(rows)


def _parquet_rows(path: epath.Path) -> Iterator[tuple[int, Any]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading {path} needs pyarrow (`pip install pyarrow`); or convert the "
                      "file to JSONL, which needs nothing extra") from None
  names = pq.read_schema(path).names
  # Read only the prompt-level columns: UltraFeedback also carries whole responses.
  columns = [c for c in _PARQUET_COLUMNS if c in names]
  if not any(c in names for c in _TEXT_KEYS):
    raise ValueError(f"{path}: no prompt column (expected one of {list(_TEXT_KEYS)}); "
                     f"columns are {names}")
  yield from enumerate(pq.read_table(path, columns=columns).to_pylist())


# suffix -> (row reader, how errors name a row, layouts that read it)
_READERS = {
    ".jsonl": (_jsonl_rows, "line ", FORMATS),
    ".json": (_json_array_rows, "item ", FORMATS),
    ".txt": (_text_rows, "line ", ("jsonl",)),
    ".parquet": (_parquet_rows, "row ", ("ultrafeedback",)),
}


def _iter_file(path: epath.Path, fmt: str) -> Iterator[tuple[str, PromptExample]]:
  """Yields ("file:line N", example) for every prompt in `path`, in file order."""
  suffix = path.suffix.lower()
  reader, row_name, formats = _READERS.get(suffix, (None, "", ()))
  if fmt not in formats:
    allowed = [s for s, (_, _, fmts) in _READERS.items() if fmt in fmts]
    raise ValueError(f"{path}: layout {fmt!r} reads {allowed} files, not {suffix or 'no suffix'!r}")
  for n, row in reader(path):
    where = f"{path}:{row_name}{n}"
    yield where, example_from_row(row, fmt=fmt, fallback_id=f"{path.stem}:{n}", where=where)


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"unknown prompt layout {fmt!r}; expected one of {FORMATS}")


def infer_format(path: str | os.PathLike) -> str:
  """Layout of a prompt file: parquet -> ultrafeedback; a JSONL whose first row has
  `question_id` and `turns` -> arena_hard; anything else -> jsonl."""
  path = epath.Path(path)
  if path.suffix.lower() == ".parquet":
    return "ultrafeedback"
  if path.suffix.lower() in (".jsonl", ".json"):
    for _, row in _READERS[path.suffix.lower()][0](path):
      if isinstance(row, dict) and "question_id" in row and "turns" in row:
        return "arena_hard"
      break
  return "jsonl"


def read_prompt_files(paths: Sequence[str | os.PathLike], fmt: str) -> list[PromptExample]:
  """Reads every prompt of `paths` (in order) as layout `fmt`; ValueError on a bad row, on
  duplicate ids (naming both rows) and when there is no prompt at all."""
  _check_format(fmt)
  paths = [epath.Path(p) for p in paths]
  if not paths:
    raise ValueError(f"no prompt files given for layout {fmt!r}")
  first_seen: dict[str, str] = {}
  examples = []
  for path in paths:
    if not path.is_file():
      raise FileNotFoundError(f"prompt file not found (or not a file): {path}")
    for where, example in _iter_file(path, fmt):
      if example.id in first_seen:
        raise ValueError(f"duplicate prompt id {example.id!r} at {where} "
                         f"(first at {first_seen[example.id]})")
      first_seen[example.id] = where
      examples.append(example)
  if not examples:
    raise ValueError(f"no prompts in {', '.join(map(str, paths))} (empty file)")
  return examples


def read_prompt_file(path: str | os.PathLike, fmt: Optional[str] = None) -> list[PromptExample]:
  """Reads one prompt file; `fmt=None` infers the layout (see `infer_format`)."""
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"prompt file not found (or not a file): {path}")
  return read_prompt_files([path], fmt or infer_format(path))


@dataclasses.dataclass(eq=False)
class PromptSetConfig(tfds.core.BuilderConfig):
  """A `PromptSet` config: the layout and the glob patterns read from `manual_dir`."""

  fmt: str = "jsonl"
  patterns: tuple[str, ...] = ("*.jsonl",)


class PromptSet(tfds.core.GeneratorBasedBuilder):
  """Prompt sets from local files, one split "train"; see the module docstring.

  Configs: "jsonl" (`*.jsonl`, `*.txt`), "arena_hard" (`*.jsonl`), "ultrafeedback"
  (`*.parquet`, `*.jsonl`); matching files are read in sorted order. For another file set pass
  `config=PromptSetConfig(name=..., fmt=..., patterns=(...))`.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Keeps each prompt's `cluster` (Arena-Hard's topic)."}
  BUILDER_CONFIGS = [
      PromptSetConfig(name="jsonl", fmt="jsonl", patterns=("*.jsonl", "*.txt"),
                      description="JSONL with a `prompt` field per line, or plain text lines."),
      PromptSetConfig(name="arena_hard", fmt="arena_hard", patterns=("*.jsonl",),
                      description="Arena-Hard question.jsonl (question_id, category, turns)."),
      PromptSetConfig(name="ultrafeedback", fmt="ultrafeedback",
                      patterns=("*.parquet", "*.jsonl"),
                      description="UltraFeedback prompts (prompt / instruction, prompt_id)."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the prompt files in `manual_dir` (one prompt set per folder): e.g. Arena-Hard's
  data/arena-hard-v0.1/question.jsonl for "arena_hard", a train_prefs parquet of
  HuggingFaceH4/ultrafeedback_binarized for "ultrafeedback", any JSONL with a `prompt` field
  for "jsonl".
  """

  def _info(self) -> tfds.core.DatasetInfo:
    # `DatasetInfo` directly: `dataset_info_from_configs` wants metadata files beside the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Prompts for eva's solver and creator.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "prompt": tfds.features.Text(),
            "source": tfds.features.Text(),
            "category": tfds.features.Text(),
            "cluster": tfds.features.Text(),
        }),
        # Keep file order: integer keys, no hash shuffling, so the data source matches the file.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    patterns = self.builder_config.patterns
    paths = sorted({p for pattern in patterns for p in manual_dir.glob(pattern)})
    if not paths:
      raise FileNotFoundError(f"no files matching {list(patterns)} in "
                              f"{manual_dir}")
    return {"train": self._generate_examples(paths)}

  def _generate_examples(self, paths):
    examples = read_prompt_files(paths, self.builder_config.fmt)
    for index, example in enumerate(examples):
      yield index, {"id": example.id, "prompt": example.text, "source": example.source,
                    "category": example.category, "cluster": example.cluster}


def prepare_prompt_set(manual_dir: str | os.PathLike, *, config: str | PromptSetConfig = "jsonl",
                       data_dir: str | os.PathLike, overwrite: bool = False) -> PromptSet:
  """Builds `prompt_set/<config>` from the files in `manual_dir` into `data_dir` (array_record).

  Returns the builder; read it with `builder.as_data_source(split="train")` or `load_prompts`.
  An already prepared dataset is reused unless `overwrite`.
  """
  manual_dir = epath.Path(manual_dir)
  if not manual_dir.is_dir():
    raise FileNotFoundError(f"manual_dir is not a folder: {manual_dir}")
  builder = PromptSet(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                                   download_mode=mode))
  return builder


def process_range(num_items: int, process_index: int, process_count: int) -> range:
  """Indices of process `process_index`'s contiguous share of `num_items` items.

  Shares differ in size by at most one; a process may get none when items < processes.
  """
  for name, value in (("num_items", num_items), ("process_index", process_index),
                      ("process_count", process_count)):
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{name} must be an int, got {value!r}")
  if num_items < 0 or process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need num_items >= 0 and 0 <= process_index < process_count, got "
                     f"{num_items}, {process_index}, {process_count}")
  return range(num_items * process_index // process_count,
               num_items * (process_index + 1) // process_count)


def _decode(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_prepared(spec: str, data_dir: Optional[str | os.PathLike], process_index: int,
                   process_count: int) -> list[PromptExample]:
  builder = tfds.builder(spec, data_dir=None if data_dir is None else os.fspath(data_dir))
  if not builder.is_prepared():
    raise FileNotFoundError(f"{spec} is not prepared in {builder.data_dir}; build it first with "
                            "eva_jax.data.prepare_prompt_set(manual_dir, config=..., data_dir=...)")
  source = builder.as_data_source(split="train")
  # Random access: a process reads only its own records.
  indices = list(process_range(len(source), process_index, process_count))
  rows = source.__getitems__(indices) if indices else []
  return [PromptExample(id=_decode(r["id"]), text=_decode(r["prompt"]),
                        source=_decode(r["source"]), category=_decode(r["category"]),
                        cluster=_decode(r["cluster"]))
          for r in rows]


def load_prompts(path_or_spec: str | os.PathLike, *, data_dir: Optional[str | os.PathLike] = None,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> list[PromptExample]:
  """This process's share of a prompt set, in dataset order.

  Args:
    path_or_spec: a prompt file (`.jsonl`, `.json`, `.txt`, `.parquet`; layout inferred) or a
      prepared tfds dataset "prompt_set/<config>[:<version>]" in `data_dir`.
    data_dir: tfds data folder for a spec (tfds' default when None); ignored for a file.
    process_index, process_count: which share to return; default `jax.process_index()` and
      `jax.process_count()`. Process i gets the contiguous slice `process_range(P, i, n)`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  process_range(0, process_index, process_count)  # validates the pair before any reading
  spec = os.fspath(path_or_spec)
  if os.path.exists(spec):
    examples = read_prompt_file(spec)
    share = process_range(len(examples), process_index, process_count)
    return examples[share.start:share.stop]
  if _SPEC.fullmatch(spec):
    return _read_prepared(spec, data_dir, process_index, process_count)
  raise FileNotFoundError(f"no prompt file {spec!r} (and not a tfds spec "
                          "'prompt_set/<config>[:<version>]')")
