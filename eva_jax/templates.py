"""The LM evolver's evolution templates: the named template sets, the meta-prompt that asks the
creator model for one evolution (`render_evolution_request`) and the reading of its reply
(`parse_evolved`).

Each template is a text file eva_jax/templates/<name>.txt holding the placeholder {prompt} ("mix":
{prompt} and {other}) and naming the markers the new prompt goes between (`PROMPT_OPEN`,
`PROMPT_CLOSE`). A `TemplateSet` names the templates a run draws from (`TEMPLATE_SETS`, picked by
`creator.template_set`); `eva_jax.lm_evolver` draws, renders and parses.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from typing import Optional

from eva_jax import registry

IN_DEPTH_METHODS = ("add_constraints", "deepen", "concretize", "increase_reasoning", "expand")
IN_BREADTH_METHODS = ("persona", "shift_in", "shift_out", "mix", "abstract")
EVOLUTION_METHODS = IN_DEPTH_METHODS + IN_BREADTH_METHODS
# The evolution request asks for the new prompt between these markers.
PROMPT_OPEN, PROMPT_CLOSE = "<new_prompt>", "</new_prompt>"

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class TemplateSet:
  """A named set of evolution templates and how a chain step draws one of them.

  Attributes:
    in_depth, in_breadth: the template names of each group (files eva_jax/templates/<name>.txt).
    uniform: True draws every template with the same probability (depth_prob and method_weights
      do not apply); False splits depth_prob / 1 - depth_prob between the groups, then weighs
      within a group (`eva_jax.lm_evolver.method_probabilities`).
    continue_after_unusable: what an LM chain does after a reply that gives no prompt: False ends
      the chain, True goes on rewriting the chain's last usable prompt (`eva_jax.lm_evolver`).
  """
  in_depth: tuple[str, ...]
  in_breadth: tuple[str, ...]
  uniform: bool
  continue_after_unusable: bool

  @property
  def methods(self) -> tuple[str, ...]:
    return self.in_depth + self.in_breadth


TEMPLATE_SETS = registry.Registry("template set")
# Ours: ten templates, depth_prob between the groups; a chain ends at its first unusable reply.
TEMPLATE_SETS.register("eva", TemplateSet(IN_DEPTH_METHODS, IN_BREADTH_METHODS, uniform=False,
                                          continue_after_unusable=False))
# EvolInstruct as the eva authors ran it (distilabel's EvolInstruct task behind their
# src/evolve_prompt.py): WizardLM's four in-depth mutations and its in-breadth one, one drawn
# uniformly per step, every step rewriting the previous step's output.
TEMPLATE_SETS.register("evolinstruct", TemplateSet(
    ("add_constraints", "deepen", "concretize", "increase_reasoning"), ("breadth",),
    uniform=True, continue_after_unusable=True))
# Every template file any set names, each once, in set order.
TEMPLATE_NAMES = tuple(dict.fromkeys(
    name for set_name in TEMPLATE_SETS.names() for name in TEMPLATE_SETS.get(set_name).methods))


@functools.lru_cache(maxsize=1)
def _template_items() -> tuple[tuple[str, str], ...]:
  folder = importlib.resources.files("eva_jax") / "templates"
  items = []
  for name in TEMPLATE_NAMES:
    text = (folder / f"{name}.txt").read_text(encoding="utf-8").strip()
    expected = ["other", "prompt"] if name == "mix" else ["prompt"]
    if sorted(_PLACEHOLDER.findall(text)) != expected:
      raise ValueError(f"template {name}.txt must hold the placeholders {expected} once each, got "
                       f"{_PLACEHOLDER.findall(text)}")
    if PROMPT_OPEN not in text or PROMPT_CLOSE not in text:
      raise ValueError(f"template {name}.txt must name the markers {PROMPT_OPEN} {PROMPT_CLOSE}")
    items.append((name, text))
  return tuple(items)


def load_templates(template_set: str = "eva") -> dict[str, str]:
  """Evolution method name -> meta-prompt text (eva_jax/templates/<name>.txt) of one set."""
  templates = dict(_template_items())
  return {name: templates[name] for name in TEMPLATE_SETS.get(template_set).methods}


def render_evolution_request(template_name: str, prompt: str,
                             other: Optional[str] = None) -> str:
  """The user message asking the creator model to evolve `prompt` with one method.

  `other` is the second prompt for "mix" (required there, refused elsewhere). The texts are
  inserted verbatim (stripped); braces in them are never read as placeholders.
  """
  templates = dict(_template_items())
  if template_name not in templates:
    raise ValueError(f"unknown evolution template {template_name!r}; expected one of "
                     f"{TEMPLATE_NAMES}")
  if (other is not None) != (template_name == "mix"):
    raise ValueError(f"template {template_name!r}: `other` is required for 'mix' and only there")
  values = {"prompt": prompt} if other is None else {"prompt": prompt, "other": other}
  for key, value in values.items():
    if not isinstance(value, str) or not value.strip():
      raise ValueError(f"{key} must be a non-empty string, got {value!r:.80}")
  return _PLACEHOLDER.sub(lambda m: values[m.group(1)].strip(), templates[template_name])


_MARKED = re.compile(re.escape(PROMPT_OPEN) + r"(.*?)" + re.escape(PROMPT_CLOSE), re.DOTALL)
_NOUN = r"(?:prompt|request|question|instruction)"
_ADJECTIVE = r"(?:new|rewritten|evolved|revised|harder|updated|final)"
_HERE_IS = rf"here(?:'s|\s+is)\s+(?:the|a|my|your)\s+(?:{_ADJECTIVE}\s+)?{_NOUN}"
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course)\b[!.,]?\s*)?(?:\*\*)?"
    rf"(?:{_HERE_IS}|{_ADJECTIVE}\s+{_NOUN})\s*(?:\*\*)?\s*:\s*(?:\*\*)?", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}


def parse_evolved(text: str) -> Optional[str]:
  """Reads the new prompt from the creator model's reply; None when there is none.

  Takes the last non-empty <new_prompt>...</new_prompt> span (a reply that echoes the instruction
  first still parses); with only an opening marker, what follows the last one (the model hit EOS
  without closing; the LM evolver may drop unfinished samples itself); with only a closing marker,
  what precedes it (the opening marker was put in the generation prompt); with no marker, the
  whole reply. Then strips a preamble like "Here is the rewritten prompt:" and enclosing quotes.
  """
  if not isinstance(text, str):
    raise TypeError(f"expected the reply text as a str, got {type(text).__name__}")
  spans = [span.strip() for span in _MARKED.findall(text)]
  if any(spans):
    body = [span for span in spans if span][-1]
  elif spans:
    return None
  elif PROMPT_OPEN in text:
    body = text.rsplit(PROMPT_OPEN, 1)[1]
  elif PROMPT_CLOSE in text:
    body = text.split(PROMPT_CLOSE, 1)[0]
  else:
    body = text
  body = _PREAMBLE.sub("", body.strip(), count=1).strip()
  # Enclosing quotes go only when they wrap the whole text ('"a" or "b"' keeps its quotes).
  if (len(body) >= 2 and _QUOTES.get(body[0]) == body[-1]
      and body[0] not in body[1:-1] and body[-1] not in body[1:-1]):
    body = body[1:-1].strip()
  return body or None
