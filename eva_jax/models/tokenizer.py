"""One tokenizer interface for real checkpoints and the embedded synthetic default.

`Tokenizer` wraps a transformers tokenizer loaded from a local folder (`load_tokenizer`) and adds
what the rest of eva_jax needs: chat-template rendering to token ids, the set of stop ids, and
padded int32 batches. `train_sentencepiece` trains a small sentencepiece BPE model on the fly,
converts it to a `tokenizers` tokenizer with a chat template, saves it as a local transformers
folder (cached by a hash of settings + corpus) and loads it through the same path.

A tokenizer folder is untrusted input. `load_tokenizer` refuses one that asks for its own Python
code (an `auto_map` in tokenizer_config.json, or an AutoTokenizer entry in config.json's) and
never lets transformers run remote code. Chat templates are jinja, which transformers renders in
a sandbox that caps `range` at 100000 items but not the work nested loops do, so every render
runs under a budget of `MAX_TEMPLATE_STEPS` Python trace events (a runaway template stops within
seconds); a template that raises, exceeds the budget or renders nothing gives one
`TokenizerError` naming the folder, already at load time, where it is rendered once on a probe
prompt. The budget does not bound a single huge C-level operation (e.g. `'x' * 10**10`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Sequence, Union

import numpy as np

Messages = Sequence[dict]

# Turn-end markers of the chat formats we meet; each one found in a vocabulary stops generation.
TURN_END_MARKERS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")

# Special pieces of the trained tokenizer; ids 0..3 in this order, then the chat markers.
_UNK, _BOS, _EOS, _PAD = "<unk>", "<bos>", "<eos>", "<pad>"
_CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Jinja chat template of the trained tokenizer: <bos><|role|>content<|end|>... <|assistant|>.
# No newlines, so that a prompt's content tokenises exactly as the bare text does.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Trace events (Python calls and lines) one chat render may take, the template's first
# compilation included: a long real template compiles in ~250k, renders in ~1k.
MAX_TEMPLATE_STEPS = 5_000_000
# The load-time probe: the rendered chat must contain this user prompt.
_PROBE_PROMPT = "Hello there"
# A cached tokenizer folder holds the hash of the settings and corpus it was trained from.
HASH_FILE = "eva_settings.sha256"
# Bump when the conversion below changes, so that cached tokenizers are rebuilt.
_FORMAT_VERSION = 1


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, *, pad_to_multiple: int = 1,
                  side: str = "right") -> tuple[np.ndarray, np.ndarray]:
  """Pads token lists into ids int32 [B, T] and mask int32 [B, T] (1 on real tokens).

  T is the longest length rounded up to a multiple of `pad_to_multiple` (at least 1);
  `side` "right" puts the padding after the tokens, "left" before.
  """
  if side not in ("right", "left"):
    raise ValueError(f"side must be 'right' or 'left', got {side!r}")
  if pad_to_multiple < 1:
    raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
  if not seqs:
    raise ValueError("pad_sequences needs at least one sequence")
  longest = max(1, max(len(s) for s in seqs))
  length = -(-longest // pad_to_multiple) * pad_to_multiple
  ids_BxT = np.full((len(seqs), length), pad_id, np.int32)
  mask_BxT = np.zeros((len(seqs), length), np.int32)
  for row, seq in enumerate(seqs):
    cols = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
    ids_BxT[row, cols] = np.asarray(seq, np.int32)
    mask_BxT[row, cols] = 1
  return ids_BxT, mask_BxT


class TokenizerError(ValueError):
  """A tokenizer folder or its chat template is refused (the message names the folder)."""


class _StepBudgetExceeded(BaseException):
  """Raised inside a runaway render; a BaseException so that no `except Exception` in the
  rendering code swallows it."""


def _run_bounded(fn, *args, **kwargs):
  """fn(*args, **kwargs), stopped with _StepBudgetExceeded after MAX_TEMPLATE_STEPS trace
  events in this thread (the previous trace function is restored afterwards)."""
  steps = 0

  def count(frame, event, arg):
    nonlocal steps
    steps += 1
    if steps > MAX_TEMPLATE_STEPS:
      raise _StepBudgetExceeded
    return count

  previous = sys.gettrace()
  sys.settrace(count)
  try:
    return fn(*args, **kwargs)
  finally:
    sys.settrace(previous)


def _read_json_object(file: str) -> dict:
  """The JSON object in `file` ({} when there is no such file)."""
  if not os.path.isfile(file):
    return {}
  try:
    with open(file, encoding="utf-8") as f:
      value = json.load(f)
  except (ValueError, RecursionError) as err:  # bad JSON or bad UTF-8
    raise TokenizerError(f"{file}: not valid JSON ({err})") from None
  if not isinstance(value, dict):
    raise TokenizerError(f"{file}: expected a JSON object, got {type(value).__name__}")
  return value


def _refuse_remote_code(path: str) -> None:
  """TokenizerError if the folder asks transformers to import Python code it ships."""
  tokenizer_config = os.path.join(path, "tokenizer_config.json")
  if "auto_map" in _read_json_object(tokenizer_config):
    raise TokenizerError(f"{tokenizer_config}: 'auto_map' asks for the folder's own Python "
                         "code (trust_remote_code); refused, use a tokenizer transformers "
                         "implements")
  model_config = os.path.join(path, "config.json")
  auto_map = _read_json_object(model_config).get("auto_map")
  if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
    raise TokenizerError(f"{model_config}: auto_map['AutoTokenizer'] asks for the folder's own "
                         "Python code (trust_remote_code); refused")


def _generation_config_eos(path: str | None) -> list[int]:
  """eos_token_id (an int or a list) of generation_config.json in `path`, if there is one."""
  file = os.path.join(path, "generation_config.json") if path else None
  if not file:
    return []
  eos = _read_json_object(file).get("eos_token_id")
  if eos is None:
    return []
  ids = eos if isinstance(eos, list) else [eos]
  if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
    raise TokenizerError(f"{file}: eos_token_id must be a token id or a list of them, "
                         f"got {eos!r:.80}")
  return ids


class Tokenizer:
  """A transformers tokenizer plus chat rendering, stop ids and batching.

  `hf` is the wrapped transformers tokenizer; `path` the folder it came from (its
  generation_config.json, if any, contributes stop ids).
  """

  def __init__(self, hf: Any, path: str | None = None):
    self.hf = hf
    self.path = path
    vocab = hf.get_vocab()
    eos = _generation_config_eos(path)
    if hf.eos_token_id is not None:
      eos.append(hf.eos_token_id)
    eos += [vocab[m] for m in TURN_END_MARKERS if m in vocab]
    self._eos_ids = tuple(dict.fromkeys(eos))
    if not self._eos_ids:
      raise TokenizerError(f"tokenizer at {path!r} has no eos token, no "
                           f"generation_config.json eos_token_id and none of the turn-end "
                           f"markers {TURN_END_MARKERS}")

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Ids that end a response: generation_config.json's eos, the tokenizer's eos, turn ends."""
    return self._eos_ids

  @property
  def bos_id(self) -> int | None:
    return self.hf.bos_token_id

  @property
  def pad_id(self) -> int:
    """The pad token, or the first stop id for tokenizers without one (masks mark padding)."""
    return self.hf.pad_token_id if self.hf.pad_token_id is not None else self._eos_ids[0]

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can emit, added tokens included (an embedding table may be
    larger)."""
    return len(self.hf)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text`, with no special tokens except a leading bos when `add_bos`."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self.hf.encode(text, add_special_tokens=False)
    if add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but this tokenizer has no bos token")
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of token ids ([T] list or array), dropping special tokens when `skip_special`."""
    ids_T = np.asarray(ids)
    if ids_T.ndim != 1:
      raise ValueError(f"decode expects one sequence [T], got shape {ids_T.shape}")
    return self.hf.decode([int(i) for i in ids_T], skip_special_tokens=skip_special)

  def render_chat(self, messages: Union[str, Messages], add_generation_prompt: bool = True) -> str:
    """The chat template applied to messages ([{"role", "content"}]) or to one user prompt."""
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    if not messages or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                               for m in messages):
      raise ValueError("messages must be a prompt string or a non-empty list of "
                       "{'role': ..., 'content': ...} dicts")
    if not self.hf.chat_template:
      raise TokenizerError(f"tokenizer at {self.path!r} has no chat template")
    try:
      rendered = _run_bounded(self.hf.apply_chat_template, list(messages), tokenize=False,
                              add_generation_prompt=add_generation_prompt)
    except _StepBudgetExceeded:
      raise TokenizerError(f"the chat template of {self.path!r} ran for more than "
                           f"{MAX_TEMPLATE_STEPS} steps (a runaway loop?)") from None
    except Exception as err:  # pylint: disable=broad-except  # the template is untrusted code
      raise TokenizerError(f"the chat template of {self.path!r} rejected the messages: "
                           f"{type(err).__name__}: {err}") from err
    if not isinstance(rendered, str) or not rendered:
      raise TokenizerError(f"the chat template of {self.path!r} rendered nothing "
                           f"({rendered!r:.80})")
    return rendered

  def apply_chat_template(self, messages: Union[str, Messages],
                          add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered chat; the template itself writes any bos token."""
    return self.hf.encode(self.render_chat(messages, add_generation_prompt),
                          add_special_tokens=False)

  def batch_encode(self, texts: Sequence[str], *, pad_to_multiple: int = 1, side: str = "right",
                   add_bos: bool = False,
                   allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and pads texts -> (ids int32 [B, T], mask int32 [B, T]); see `pad_sequences`.

    An empty text (or one that encodes to no tokens) is an error unless `allow_empty`.
    """
    seqs = []
    for index, text in enumerate(texts):
      seq = self.encode(text, add_bos=add_bos)
      if not allow_empty and (not text or len(seq) == int(add_bos)):
        raise ValueError(f"batch_encode: text {index} is empty ({text!r}); pass "
                         "allow_empty=True to keep it as an all-padding row")
      seqs.append(seq)
    return pad_sequences(seqs, self.pad_id, pad_to_multiple=pad_to_multiple, side=side)


def load_tokenizer(path: str) -> Tokenizer:
  """Loads the tokenizer of a local transformers folder (tokenizer.json or tokenizer.model).

  TokenizerError for a folder that asks for remote code, or whose chat template (if it has
  one) fails on a probe prompt: raises, runs away, renders nothing or drops the prompt.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
  _refuse_remote_code(path)
  import transformers  # Deferred: only tokenizer users pay for the import.
  hf = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                  trust_remote_code=False)
  tokenizer = Tokenizer(hf, path)
  if hf.chat_template:
    rendered = tokenizer.render_chat(_PROBE_PROMPT)
    if _PROBE_PROMPT not in rendered:
      raise TokenizerError(f"the chat template of {path!r} drops the user's message: "
                           f"{_PROBE_PROMPT!r} renders as {rendered!r:.200}")
  return tokenizer


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
  """Merge rules of a sentencepiece BPE vocabulary: every split of a piece into two pieces,
  ranked by the piece's id (sentencepiece numbers merged pieces in the order they were made)."""
  ranked = []
  for piece, piece_id in vocab.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        ranked.append((piece_id, vocab[left], vocab[right], left, right))
  return [(left, right) for *_, left, right in sorted(ranked)]


def _train_spm_bpe(texts: Sequence[str], vocab_size: int) -> Any:
  """A sentencepiece BPE model over `texts` -> SentencePieceProcessor.

  Identity normalisation keeps every character and space as written; digits are split into
  single pieces (arithmetic stays per digit); `vocab_size` is an upper bound.
  """
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
      vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
      split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=_UNK, bos_piece=_BOS, eos_piece=_EOS,
      pad_piece=_PAD, control_symbols=list(_CHAT_MARKERS), num_threads=1, minloglevel=2)
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _to_transformers(processor: Any) -> Any:
  """The sentencepiece model as a transformers fast tokenizer with our chat template."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers
  vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(vocab),
                                            unk_token=_UNK, fuse_unk=True))
  # Metaspace with prepend "always" mirrors sentencepiece's dummy prefix on every segment, so
  # text after a chat marker tokenises like the bare text; its decoder drops that prefix again.
  backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
  backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
  specials = [_UNK, _BOS, _EOS, _PAD, *_CHAT_MARKERS]
  backend.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token=_UNK, bos_token=_BOS, eos_token=_EOS, pad_token=_PAD)
  hf.chat_template = _CHAT_TEMPLATE
  return hf


def train_sentencepiece(texts: Sequence[str], workdir: str, vocab_size: int = 256,
                        name: str = "spm_tokenizer") -> Tokenizer:
  """Trains (or reloads from cache) a sentencepiece BPE tokenizer -> Tokenizer.

  The transformers folder `workdir/name` holds tokenizer.json, the chat template, the
  sentencepiece model (spm.model) and a hash of (settings, corpus); a later call with the same
  settings and texts loads the folder instead of training. Encode/decode round-trips any text
  made of characters seen in `texts` that has no leading whitespace.
  """
  if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
    raise ValueError("train_sentencepiece needs a non-empty list of strings")
  if vocab_size <= len(_CHAT_MARKERS) + 4:
    raise ValueError(f"vocab_size must exceed the {len(_CHAT_MARKERS) + 4} special tokens, "
                     f"got {vocab_size}")
  folder = os.path.join(workdir, name)
  settings = json.dumps({"vocab_size": vocab_size, "version": _FORMAT_VERSION,
                         "template": _CHAT_TEMPLATE, "specials": _CHAT_MARKERS})
  digest = hashlib.sha256(settings.encode())
  for text in texts:
    digest.update(text.encode() + b"\0")
  digest = digest.hexdigest()
  hash_file = os.path.join(folder, HASH_FILE)
  if os.path.isfile(hash_file):
    with open(hash_file) as f:
      if f.read().strip() == digest:
        return load_tokenizer(folder)
  processor = _train_spm_bpe(texts, vocab_size)
  os.makedirs(workdir, exist_ok=True)
  # Written under a temporary name and renamed, so a killed run never leaves half a tokenizer.
  tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=workdir)
  _to_transformers(processor).save_pretrained(tmp)
  # transformers 5 names its class TokenizersBackend; the older alias loads in 4.x and 5.x.
  config_file = os.path.join(tmp, "tokenizer_config.json")
  with open(config_file) as f:
    config = json.load(f)
  with open(config_file, "w") as f:
    json.dump(dict(config, tokenizer_class="PreTrainedTokenizerFast"), f, indent=2)
  with open(os.path.join(tmp, "spm.model"), "wb") as f:
    f.write(processor.serialized_model_proto())
  with open(os.path.join(tmp, HASH_FILE), "w") as f:
    f.write(digest)
  if os.path.isdir(folder):
    shutil.rmtree(folder)
  os.rename(tmp, folder)
  return load_tokenizer(folder)
