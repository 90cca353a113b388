"""Filters on evolved prompts: the checks the authors' creator lacks.

A rewriter LM returns empty strings, rambles past any sane prompt length, refuses ("I'm sorry, but
I can't help with that"), hands the prompt back unchanged, or produces a prompt the buffer already
holds. Each of these would waste a generate + score pass at best and teach the solver on junk at
worst, so `filter_candidates` drops them and says why.

A small real creator (SmolLM2-135M-Instruct) fails in three more ways, which the guards catch:
- it echoes the meta-prompt: the template's own markers (<original>, <new_prompt>, ...) or long
  runs of its fixed wording ("I am collecting realistic requests ...") in the candidate;
- it replies to the requester instead of writing a prompt ("I'm ready to assist you with your
  request", "Sure! Here is a harder version of the request", "As an AI, ...");
- it answers the prompt instead of rewriting it: a text with no question and no request in it
  (opt-in, `reject_answers`: short task formats such as "add: 3 + 4" carry no request words).
`reason_counts` turns the rejections into counts for every reason, zeros included.

Duplicates are found two ways: an exact hash set of normalised texts (O(1) per lookup), and the
Jaccard similarity of word n-gram sets ("shingles") through an inverted index shingle -> texts, so
a query touches only the buffer texts that share at least one shingle with it instead of the
whole buffer.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import importlib.resources
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
META_ECHO = "meta_prompt_echo"
ASSISTANT_REPLY = "assistant_reply"
ANSWER = "answer_not_prompt"
COPY_OF_PARENT = "copy_of_parent"
NEAR_DUPLICATE_OF_PARENT = "near_duplicate_of_parent"
DUPLICATE_IN_BUFFER = "duplicate_in_buffer"
NEAR_DUPLICATE_IN_BUFFER = "near_duplicate_in_buffer"
REASONS = (EMPTY, TOO_SHORT, TOO_LONG, REFUSAL, META_ECHO, ASSISTANT_REPLY, ANSWER,
           COPY_OF_PARENT, NEAR_DUPLICATE_OF_PARENT, DUPLICATE_IN_BUFFER,
           NEAR_DUPLICATE_IN_BUFFER)

# Words per shingle when comparing a candidate with the meta-prompt's fixed wording; 4-word runs
# of that wording ("realistic requests that people") are rare in a real prompt.
TEMPLATE_NGRAM_N = 4
# A candidate sharing this many 4-word runs with the meta-prompt (about 10 consecutive words)
# echoes it, however long the rest of the candidate is.
MAX_SHARED_TEMPLATE_NGRAMS = 7

# A reply addressed to the requester. Openers are matched at the start of the candidate (after
# any markdown or quote characters); they never open a real prompt, which speaks to the
# assistant rather than answering it. "Here is ..." alone opens real prompts ("Here is my
# code: ..."), so only "here is the/a new/harder ... request/prompt" counts.
_REPLY_OPENERS = (
    r"(?:sure|certainly|absolutely|of course|okay|ok|alright|understood|got it|no problem|"
    r"great question|good question)\b\s*[!,.:]",
    r"(?:thank you|thanks) for\b",
    r"i(?:'d| would| will|'ll| am|'m) (?:be )?(?:happy|glad|delighted|ready|here) to\b",
    r"i can (?:help|assist)\b",
    r"let me (?:help|explain|rewrite|create|give|try|think|assist)\b",
    r"as an ai(?: language model| assistant| model)?\s*[,.]",
    # Commentary on the rewrite before the new prompt (SmolLM2: "To make this request more
    # challenging, I'll just modify the original to: ..."); "To make this function faster, ..."
    # opens real prompts, so only the meta-request's own objects count.
    r"to make (?:this|the|your) (?:original )?(?:request|prompt|question|task)\b",
)
# Phrases that place a reply to the meta-request anywhere in the text. Our templates call the
# prompt a "request"; real prompts about prompt writing talk of "the revised prompt".
_REPLY_PHRASES = (
    r"\bready to (?:assist|help)\b",
    r"\bhow (?:can|may) i (?:assist|help)\b",
    r"\b(?:i hope this helps|feel free to ask|let me know if you (?:need|have|want|would))\b",
    r"\b(?:your|the original|the new|the rewritten|the harder|the evolved) request\b",
    r"\b(?:rewritten|evolved) (?:request|prompt)\b",
    r"\b(?:rewritten|revised|evolved|harder|new|modified|updated) version of (?:the|your|this) "
    r"(?:request|prompt|question)\b",
    r"\bi(?:'ve| have)? (?:rewritten|rewrote|revised|modified|changed) (?:the|your|it)\b",
    r"\bi(?:'ll| will) (?:just )?(?:modify|rewrite|revise|change|rephrase) (?:the |your |this )?"
    r"(?:original|request|prompt)\b",
    r"\bhere(?:'s| is| are) (?:the|a|an|my|your) (?:new|rewritten|revised|harder|updated|"
    r"modified|improved|evolved|more \w+) (?:request|prompt|version)s?\b",
)
DEFAULT_REPLY_PATTERNS = tuple("^" + p for p in _REPLY_OPENERS) + _REPLY_PHRASES
_REPLY_LEAD = re.compile(r"^[\s>*_#\"'`\-]+")

# What a request to an assistant contains: a question, or a task verb / request phrase. A text
# with neither reads as a statement, e.g. an answer to the prompt it should have rewritten.
_REQUEST_CUE = re.compile(
    r"\?|\b(?:write|explain|describe|create|make|give|list|help|tell|show|find|generate|"
    r"design|develop|implement|build|compose|draft|summari[sz]e|compare|calculate|compute|"
    r"solve|prove|proof|derive|translate|convert|provide|suggest|recommend|propose|outline|"
    r"plan|analy[sz]e|evaluate|assess|discuss|identify|determine|estimate|rewrite|fix|debug|"
    r"optimi[sz]e|refactor|improve|review|classify|categori[sz]e|extract|predict|simulate|"
    r"act|pretend|imagine|consider|assume|suppose|use|add|modify|update|code|program|script|"
    r"output|return|answer|respond|reply|choose|pick|rank|sort|count|define|illustrate|"
    r"teach|guide|advise|walk|clarify|elaborate|detail|details|argue|justify|brainstorm|"
    r"prepare|craft|visuali[sz]e|get|include|example|problem|need|want|set up|install|"
    r"configure|deploy|test|check|verify|complete|continue|edit|format|download|"
    r"please|how|what|why|which|who|whom|whose|when|where|whether|can you|could you|"
    r"would you|will you|i need|i want|i'd like|i would like|i'm looking|i am looking|"
    r"i'm trying|i am trying|let's|your task|you are|you will|you should|you must|task)\b")
# Openers that mark a text as an answer whatever else it holds.
_ANSWER_OPENER = re.compile(
    r"^(?:answer|solution|response|output|result)\s*:|^the (?:answer|solution) is\b|"
    r"^step 1\b|^in (?:conclusion|summary)\b")

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


_TAG = re.compile(r"</?[A-Za-z_]+>")
_PLACEHOLDER = re.compile(r"\{\w+\}")


@functools.lru_cache(maxsize=1)
def template_texts() -> tuple[str, ...]:
  """The evolution meta-prompts (eva_jax/templates/*.txt), placeholders unfilled."""
  folder = importlib.resources.files("eva_jax") / "templates"
  return tuple(sorted(f.read_text(encoding="utf-8") for f in folder.iterdir()
                      if f.name.endswith(".txt")))


def template_markers(templates: Sequence[str]) -> frozenset:
  """Every <tag> and </tag> the templates use (<original>, <second>, <new_prompt>, ...)."""
  return frozenset(tag.casefold() for text in templates for tag in _TAG.findall(text))


def template_shingles(templates: Sequence[str], n: int = TEMPLATE_NGRAM_N) -> frozenset:
  """Word n-grams of the templates' fixed wording; none spans a placeholder or a marker, so
  the prompts inserted into a template never count as its wording."""
  grams = set()
  for text in templates:
    for piece in _PLACEHOLDER.split(_TAG.sub("\n", text)):
      normalized = normalize_text(piece)
      if len(normalized.split()) >= n:
        grams |= shingles(normalized, n)
  return frozenset(grams)


def template_overlap(normalized: str, wording: frozenset,
                     n: int = TEMPLATE_NGRAM_N) -> tuple[float, int]:
  """(share of the text's word n-grams found in `wording`, how many) of a normalised text."""
  grams = shingles(normalized, n) if len(normalized.split()) >= n else frozenset()
  shared = len(grams & wording)
  return (shared / len(grams) if grams else 0.0), shared


def is_assistant_reply(text: str, patterns: Sequence[str] = DEFAULT_REPLY_PATTERNS) -> bool:
  """True when `text` speaks to the requester ("Sure! Here is ...") instead of being a prompt.

  Patterns are regular expressions matched case-insensitively (curly apostrophes read as
  straight ones) against the text with leading markdown and quote characters removed.
  """
  folded = _REPLY_LEAD.sub("", text.translate(_APOSTROPHES).casefold())
  return any(re.search(p, folded) for p in patterns)


def is_answer(text: str) -> bool:
  """True when `text` reads as an answer rather than a request: it opens like one ("Answer:",
  "The answer is", "Step 1") or holds no question mark, task verb or request phrase."""
  folded = _REPLY_LEAD.sub("", text.translate(_APOSTROPHES).casefold())
  return bool(_ANSWER_OPENER.search(folded)) or not _REQUEST_CUE.search(folded)


def _echoes(folded: str, normalized: str, meta_markers: frozenset, wording: frozenset,
            max_overlap: float) -> bool:
  if any(marker in folded for marker in meta_markers):
    return True
  share, shared = template_overlap(normalized, wording)
  return share >= max_overlap or shared >= MAX_SHARED_TEMPLATE_NGRAMS


def reason_counts(rejected: Iterable[tuple[int, str]]) -> dict[str, int]:
  """Rejections (as `filter_candidates` returns them) -> {reason: count} over all `REASONS`."""
  counts = dict.fromkeys(REASONS, 0)
  for _, reason in rejected:
    counts[reason] += 1
  return counts


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
    templates: Optional[Sequence[str]] = None,
    max_template_overlap: float = 0.2,
    reply_patterns: Sequence[str] = DEFAULT_REPLY_PATTERNS,
    reject_answers: bool = False,
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
    templates: the meta-prompts the candidates answer (None: eva_jax/templates/*.txt). A
      candidate holding one of their <markers>, or whose word 4-grams fall in their fixed
      wording for a share >= `max_template_overlap` (or `MAX_SHARED_TEMPLATE_NGRAMS` of them),
      echoes the meta-prompt.
    reply_patterns: regular expressions of a reply addressed to the requester (see
      `is_assistant_reply`); () switches the check off.
    reject_answers: also reject candidates with no question and no request in them (`is_answer`);
      off by default because terse task formats ("add: 3 + 4") have none either.

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
  if not 0.0 < max_template_overlap <= 1.0:
    raise ValueError(f"max_template_overlap must be in (0, 1], got {max_template_overlap}")
  markers = [m.translate(_APOSTROPHES).casefold() for m in refusal_markers]
  templates = template_texts() if templates is None else tuple(templates)
  meta_markers = template_markers(templates)
  wording = template_shingles(templates)
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
      elif _echoes(folded, normalized, meta_markers, wording, max_template_overlap):
        reason = META_ECHO
      elif is_assistant_reply(text, reply_patterns):
        reason = ASSISTANT_REPLY
      elif reject_answers and is_answer(text):
        reason = ANSWER
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
