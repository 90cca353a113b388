"""Creator guards (eva_jax/filters.py) on hand-written texts and on the real prompts they must keep.

The first two cases are the two survivors of the old filters in a real run with
SmolLM2-135M-Instruct as creator (issue 18): an echo of the meta-prompt with its <original>
markers and a reply addressed to the requester.
"""
import json

import pytest

from eva_jax import filters, templates
from tests import shared_data

PARENT = "Write a Python function that merges two sorted lists into one sorted list."
# The old filters: no template markers or wording, no reply patterns, no answer check.
OLD = dict(templates=("",), reply_patterns=())

REAL_ECHO = ("Here is one request:\n<original>\nWrite a Python function that merges two sorted "
             "lists into one sorted list.\n</original>\n\nMake it harder by adding one or two "
             "specific requirements that the answer has to meet.")
REAL_REPLY = ("I'm ready to assist you with your request. Please go ahead and share the text "
              "you would like me to work on.")


def words(text):
  return len(text.split())


def run(candidates, **kwargs):
  kwargs.setdefault("tokenizer_len_fn", words)
  return filters.filter_candidates(candidates, [PARENT] * len(candidates), [], **kwargs)


def test_the_two_real_failures_are_caught_and_were_kept_before():
  kept, rejected = run([REAL_ECHO, REAL_REPLY])
  assert kept == [] and rejected == [(0, "meta_prompt_echo"), (1, "assistant_reply")]
  kept, rejected = run([REAL_ECHO, REAL_REPLY], **OLD)
  assert kept == [0, 1] and rejected == []


def test_markers_are_the_templates_and_the_prompt_wrappers():
  markers = filters.template_markers(filters.template_texts())
  assert {templates.PROMPT_OPEN, templates.PROMPT_CLOSE, "<original>", "</original>", "<second>",
          "</second>"} == markers
  # Each marker alone, in any case, rejects an otherwise fine prompt.
  for marker in sorted(markers):
    text = f"Explain how merge sort splits a list {marker.upper()} and why it is stable."
    assert run([text])[1] == [(0, "meta_prompt_echo")], marker


def test_echo_of_the_template_wording_without_markers():
  # 12 words, 9 four-word runs, all of them in the templates' fixed wording.
  echo = "I am collecting realistic requests that people send to an AI assistant"
  share, shared = filters.template_overlap(filters.normalize_text(echo),
                                           filters.template_shingles(filters.template_texts()))
  assert (share, shared) == (1.0, 9)
  # Ten template words (seven runs) before 30 others: share 7 / 37 < 0.2, yet 7 runs reject.
  tail = ("Make it harder by asking for more depth on the " +
          " ".join(f"w{i}" for i in range(30)))
  assert run([tail])[1] == [(0, "meta_prompt_echo")]
  # One short template phrase in a real prompt is not an echo: "keep it about as long as" holds
  # 3 of the text's 17 four-word runs (0.18).
  kept, _ = run(["Summarise this chapter for my class, and keep it about as long as a tweet "
                 "please, thanks a lot."])
  assert kept == [0]


@pytest.mark.parametrize("reply", [
    REAL_REPLY,
    "Sure, here is a harder version of the request: write a merge function in Rust.",
    "Certainly! Write a function that merges k sorted lists using a heap.",
    "**Of course!** Merge two sorted linked lists in place without extra memory.",
    "As an AI, I would make it harder: merge two sorted lists in O(1) extra space.",
    "Thank you for the request. Merge two sorted arrays of 10^9 elements on disk.",
    "I'd be happy to help! How do I merge two sorted lists in Haskell?",
    "Write a function that merges sorted lists. I hope this helps!",
    "I have rewritten the request to ask for a streaming merge of sorted files.",
    "Merge sorted lists lazily in Python. Let me know if you need anything else.",
    "Here\u2019s the rewritten prompt: merge two sorted lists without using sort().",
    # Seen on SmolLM2-135M-Instruct (configs/real_small.py): commentary, then the prompt.
    "To make this request more challenging, I'll just modify the original to: merge k lists.",
    "Merge k sorted lists in Go; I'll just rewrite the original with a memory bound.",
])
def test_replies_to_the_requester(reply):
  assert run([reply])[1] == [(0, "assistant_reply")]


@pytest.mark.parametrize("prompt", [
    "Here is my python code: def merge(a, b): return sorted(a + b). Why is it slow?",
    "As an AI researcher, how should I evaluate a sorting model on adversarial inputs?",
    "Given the user's initial prompt 'merge lists', write the revised prompt with examples.",
    "Sure-fire ways to merge two sorted lists in C without allocating: what are they?",
    "Certainly the fastest merge is linear, but can you prove it needs n - 1 comparisons?",
    "To make this function more efficient, how would you rewrite it? def f(a): return a[::-1]",
    "I'll modify the schedule next week; which merge order minimises the total cost?",
])
def test_real_prompts_that_look_like_replies_are_kept(prompt):
  kept, rejected = run([prompt], reject_answers=True)
  assert kept == [0], rejected


def test_answers_are_rejected_only_when_asked():
  answers = [
      "Paris is the capital of France and has about two million inhabitants.",
      "The answer is 42 because six times seven equals forty-two.",
      "Step 1: split the list in half. Step 2: sort each half. Step 3: merge them.",
      "Autumn leaves descend / golden whispers on the wind / the old oak lets go",
  ]
  prompts = ["What is the capital of France, and how many people live there?",
             "Explain why merge sort is stable",
             "I need a haiku about autumn leaves for my daughter's school project."]
  kept, rejected = run(answers + prompts, reject_answers=True)
  assert kept == [4, 5, 6]
  assert rejected == [(i, "answer_not_prompt") for i in range(4)]
  assert run(answers + prompts)[0] == list(range(7))  # off by default


def test_reason_counts_cover_every_reason():
  kept, rejected = run([REAL_ECHO, REAL_REPLY, "", PARENT, "Paris is a city in France.",
                        "I'm sorry, but I can't help with that."], reject_answers=True)
  counts = filters.reason_counts(rejected)
  assert list(counts) == list(filters.REASONS) and kept == []
  assert {k: v for k, v in counts.items() if v} == {
      "meta_prompt_echo": 1, "assistant_reply": 1, "empty": 1, "copy_of_parent": 1,
      "answer_not_prompt": 1, "refusal": 1}


def test_bad_template_overlap_option():
  with pytest.raises(ValueError, match="max_template_overlap"):
    run(["a b c"], max_template_overlap=0.0)


def test_real_arena_hard_prompts_pass_the_guards():
  """The 500 Arena-Hard questions are real prompts: the echo and reply guards keep them all;
  the answer guard rejects at most 1 % (a statement of a problem with no request in it)."""
  with open(shared_data.arena_path()) as f:
    prompts = [json.loads(line)["turns"][0]["content"] for line in f]
  _, rejected = filters.filter_candidates(
      prompts, ["an unrelated parent"] * len(prompts), [], tokenizer_len_fn=words,
      max_tokens=10**6, max_similarity=1.0, reject_answers=True)
  counts = filters.reason_counts(rejected)
  print({k: v for k, v in counts.items() if v})
  assert counts["meta_prompt_echo"] == counts["assistant_reply"] == 0
  assert counts["answer_not_prompt"] <= len(prompts) // 100
