"""The real prompt files under ../shared/data (the 500 Arena-Hard questions), for tests.

Outside CI a checkout without ../shared skips these tests with the reason shown; in CI (the `CI`
environment variable is set) a missing file fails the test instead, so a green CI run always
includes them. EVA_SHARED_DATA points elsewhere.
"""
import os
from pathlib import Path

import pytest

ARENA_NAME = "arena_hard_v0.1_questions.jsonl"


def _find() -> tuple[Path, bool]:
  folder = os.environ.get("EVA_SHARED_DATA")
  folder = Path(folder) if folder else Path(__file__).resolve().parents[2] / "shared" / "data"
  path = folder / ARENA_NAME
  if not path.is_file() and os.environ.get("CI"):
    pytest.fail(f"{path} is absent (set EVA_SHARED_DATA to the folder holding {ARENA_NAME})")
  return path, path.is_file()


def arena_path() -> Path:
  """The Arena-Hard file; skips the test outside CI when it is absent."""
  path, present = _find()
  if not present:
    pytest.skip(f"{path} is absent (set EVA_SHARED_DATA to the folder holding {ARENA_NAME})")
  return path


def arena_path_or_none():
  """The Arena-Hard file, or None outside CI when it is absent (for optional extras)."""
  path, present = _find()
  return path if present else None
