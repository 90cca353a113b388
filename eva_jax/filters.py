"""Filters on evolved prompts: the checks the authors' creator lacks.

A rewriter LM returns empty strings, rambles past any sane prompt length, refuses ("I'm sorry, but
I can't help with that"), hands the prompt back unchanged, or produces a prompt the buffer already
holds. Each of these would waste a generate + score pass at best and teach the solver on junk at
worst, so `filter_candidates` drops them and says why.

Duplicates are found two ways: an exact hash set of normalised texts (O(1) per lookup), and the
Jaccard similarity of word n-gram sets ("shingles") through an inverted index shingle -> texts, so
a query touches only the buffer texts that share at least one shingle with it instead of the
whole buffer.
"""
from __future__ import annotations

import collections
import hashlib
import re
import unicodedata
from typing import Callable, Iterable, Optional, Sequence

# Phrases that mark a rewriter's refusal or meta-commentary, matched case-insensitively anywhere
# in a candidate. They are deliberately longer than bare "I cannot" / "As an AI": real user
# prompts often start "I cannot get my build to..." or "As an AI researcher, ...".
DEFAULT_REFUSAL_MARKERS = (
    "I'm sorry, but",
    "I am sorry, but",
    "I apologize, but",
    "I cannot help",
    "I can't help",
    "I cannot assist",
    "I can't assist",
    "I cannot fulfill",
    "I can't fulfill",
    "I cannot comply",
    "I can't comply",
    "I'm unable to",
    "I am unable to",
    "I won't be able to",
    "As an AI language model",
    "As an AI assistant",
    "As a language model",
)

# Rejection reasons, in the order the checks run; a candidate gets the first that applies.
EMPTY = "empty"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
REFUSAL = "refusal"
COPY_OF_PARENT = "copy_of_parent"
NEAR_DUPLICATE_OF_PARENT = "near_duplicate_of_parent"
DUPLICATE_IN_BUFFER = "duplicate_in_buffer"
NEAR_DUPLICATE_IN_BUFFER = "near_duplicate_in_buffer"
REASONS = (EMPTY, TOO_SHORT, TOO_LONG, REFUSAL, COPY_OF_PARENT, NEAR_DUPLICATE_OF_PARENT,
           DUPLICATE_IN_BUFFER, NEAR_DUPLICATE_IN_BUFFER)

_NON_WORD = re.compile(r"[\W_]+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def normalize_text(text: str) -> str:
  """Canonical form for duplicate checks: NFKC, casefolded, punctuation dropped, words joined by
  single spaces. Texts that differ only in case, spacing or punctuation normalise equal."""
  text = unicodedata.normalize("NFKC", text).casefold()
  return " ".join(_NON_WORD.sub(" ", text).split())


def shingles(normalized: str, n: int) -> frozenset:
  """The set of word n-grams of a normalised text; a text of fewer than n words is one shingle."""
  words = normalized.split()
  if len(words) < n:
    return frozenset([tuple(words)]) if words else frozenset()
  return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
  """|a ∩ b| / |a ∪ b|; 0.0 when both are empty."""
  union = len(a | b)
  return len(a & b) / union if union else 0.0


def _digest(normalized: str) -> bytes:
  # A fixed-size digest keeps the exact-duplicate set small for a buffer of long prompts.
  return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


class _ShingleIndex:
  """Exact-text hash set plus an inverted index shingle -> ids of the texts holding it."""

  def __init__(self, ngram_n: int):
    self._ngram_n = ngram_n
    self._digests: set[bytes] = set()
    self._postings: dict[tuple, list[int]] = collections.defaultdict(list)
    self._sizes: list[int] = []

  def add(self, normalized: str) -> None:
    self._digests.add(_digest(normalized))
    text_id = len(self._sizes)
    grams = shingles(normalized, self._ngram_n)
    self._sizes.append(len(grams))
    for gram in grams:
      self._postings[gram].append(text_id)

  def contains(self, normalized: str) -> bool:
    return _digest(normalized) in self._digests

  def max_similarity(self, normalized: str) -> float:
    """Largest Jaccard similarity to any indexed text, exact (no sketching)."""
    grams = shingles(normalized, self._ngram_n)
    shared = collections.Counter()
    for gram in grams:
      shared.update(self._postings.get(gram, ()))
    return max((count / (len(grams) + self._sizes[text_id] - count)
                for text_id, count in shared.items()), default=0.0)


def _check_options(tokenizer_len_fn, min_tokens, max_tokens, ngram_n, max_similarity):
  if not callable(tokenizer_len_fn):
    raise TypeError(f"tokenizer_len_fn must be a callable text -> token count, got "
                    f"{type(tokenizer_len_fn).__name__}")
  for name, value in (("min_tokens", min_tokens), ("max_tokens", max_tokens),
                      ("ngram_n", ngram_n)):
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{name} must be an int, got {value!r}")
  if not 0 <= min_tokens <= max_tokens:
    raise ValueError(f"need 0 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
  if ngram_n < 1:
    raise ValueError(f"ngram_n must be >= 1, got {ngram_n}")
  if not 0.0 < max_similarity <= 1.0:
    raise ValueError(f"max_similarity must be in (0, 1], got {max_similarity}")


def filter_candidates(
    candidates: Sequence[Optional[str]],
    parents: Sequence[str],
    buffer_texts: Iterable[str],
    *,
    tokenizer_len_fn: Callable[[str], int],
    min_tokens: int = 1,
    max_tokens: int = 1024,
    refusal_markers: Sequence[str] = DEFAULT_REFUSAL_MARKERS,
    ngram_n: int = 3,
    max_similarity: float = 0.85,
    max_parent_similarity: Optional[float] = None,
) -> tuple[list[int], list[tuple[int, str]]]:
  """Splits evolved prompts into kept and rejected.

  Args:
    candidates: C candidate texts; None (a reply the parser could not read) counts as empty.
    parents: C texts, parents[i] is the prompt candidates[i] was rewritten from.
    buffer_texts: every prompt already in the buffer (read once, indexed).
    tokenizer_len_fn: text -> number of tokens, so the bounds hold for any tokenizer.
    min_tokens, max_tokens: inclusive bounds on a kept candidate's token count.
    refusal_markers: phrases that reject a candidate wherever they occur (case-insensitive,
      curly apostrophes read as straight ones).
    ngram_n: words per shingle for the similarity check.
    max_similarity: a candidate whose shingle Jaccard similarity to its parent, to a buffer text,
      or to a candidate kept earlier in this call is >= this is a near-duplicate.
    max_parent_similarity: the threshold against the parent alone (None: `max_similarity`). A
      local edit of a long prompt (one added constraint) keeps most of its shingles, so a run
      that wants such rewrites can set this higher than the buffer threshold.

  Returns:
    (kept, rejected): kept is the ascending list of candidate indices that passed; rejected is a
    list of (candidate index, reason) with reason one of `REASONS`, the first check that failed.
    Kept candidates join the duplicate index as they pass, so two equal candidates in one call
    keep only the first.
  """
  if len(candidates) != len(parents):
    raise ValueError(f"{len(candidates)} candidates but {len(parents)} parents")
  if max_parent_similarity is None:
    max_parent_similarity = max_similarity
  _check_options(tokenizer_len_fn, min_tokens, max_tokens, ngram_n, max_similarity)
  if not 0.0 < max_parent_similarity <= 1.0:
    raise ValueError(f"max_parent_similarity must be in (0, 1], got {max_parent_similarity}")
  markers = [m.translate(_APOSTROPHES).casefold() for m in refusal_markers]
  index = _ShingleIndex(ngram_n)
  for text in buffer_texts:
    index.add(normalize_text(text))

  kept, rejected = [], []
  for i, (text, parent) in enumerate(zip(candidates, parents)):
    if text is not None and not isinstance(text, str):
      raise TypeError(f"candidate {i} must be a str or None, got {type(text).__name__}")
    normalized = normalize_text(text or "")
    reason = None
    if not normalized:
      reason = EMPTY
    else:
      num_tokens = tokenizer_len_fn(text)
      folded = text.translate(_APOSTROPHES).casefold()
      parent_normalized = normalize_text(parent)
      if num_tokens < min_tokens:
        reason = TOO_SHORT
      elif num_tokens > max_tokens:
        reason = TOO_LONG
      elif any(marker in folded for marker in markers):
        reason = REFUSAL
      elif normalized == parent_normalized:
        reason = COPY_OF_PARENT
      elif jaccard(shingles(normalized, ngram_n),
                   shingles(parent_normalized, ngram_n)) >= max_parent_similarity:
        reason = NEAR_DUPLICATE_OF_PARENT
      elif index.contains(normalized):
        reason = DUPLICATE_IN_BUFFER
      elif index.max_similarity(normalized) >= max_similarity:
        reason = NEAR_DUPLICATE_IN_BUFFER
    if reason is None:
      kept.append(i)
      index.add(normalized)
    else:
      rejected.append((i, reason))
  return kept, rejected
