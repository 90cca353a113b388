"""The paper's protocol (eva_jax/protocol.py) and select-without-evolving, end to end in-process.

Under "paper" both arms train θ0 → θ1 on the same first chunk without the creator, so their
iteration-0 artifacts and checkpoint 1 must be identical; then eva re-samples that chunk and
evolves it while static takes new prompts.
"""
import hashlib
import json

import numpy as np
import pytest

from configs import default as default_config
from eva_jax import creator, protocol, runner, stages
from tests import checkpoints

@pytest.mark.parametrize("proto,enabled,expected", [
    # (chunk, creator on) for iterations 0, 1, 2, written out from the protocol's definition.
    ("fresh", True, [(0, True), (1, True), (2, True)]),
    ("fresh", False, [(0, False), (1, False), (2, False)]),
    ("paper", True, [(0, False), (0, True), (1, True)]),
    ("paper", False, [(0, False), (1, False), (2, False)]),
])
def test_iteration_plan(proto, enabled, expected):
  assert [protocol.iteration_plan(proto, t, enabled) for t in range(3)] == expected


def test_unknown_protocol_is_one_error():
  with pytest.raises(ValueError, match="protocol must be one of"):
    protocol.iteration_plan("continual", 0, True)


def _read(workdir, name):
  return json.loads((workdir / name).read_text())


def _run(workdir, fork_from=None, iterations=2, **overrides):
  c = default_config.get_config("smoke")
  c.iterations = iterations
  c.protocol = "paper"
  c.checkpoint.keep = 3  # θ0, θ1, θ2 all kept: a later arm can fork from θ1 (fork_theta1).
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    c[section][key] = value
  if fork_from is not None:
    protocol.fork_theta1(str(fork_from), str(workdir))
  runner.run(c, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
  """eva run whole (θ0 → θ1 → θ1̃), and static's θ0 → θ1 run on its own (iterations 1)."""
  tmp = tmp_path_factory.mktemp("paper")
  return _run(tmp / "eva"), _run(tmp / "static_theta1", iterations=1, creator__enabled=False)


def _digests(workdir, pattern="iter_*/*"):
  """{artifact: sha256} of the iteration artifacts (the run records differ by design)."""
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(workdir.glob(pattern))}


def test_paper_protocol_both_arms_share_theta1(arms):
  eva, static = arms
  # Static draws bigger chunks (it gets fresh prompts where eva evolves); its iteration 0 keeps
  # the first data.num_prompts of its chunk, which must be eva's whole chunk: so every artifact
  # of θ0 → θ1 is the same file in both arms, and θ1 is the same.
  assert _digests(eva, "iter_000/*") == _digests(static, "iter_000/*")
  assert len(_read(eva, "iter_000/prompts.json")) == 8
  assert not (eva / "iter_000" / "create.json").exists()  # No creator in θ0 → θ1.
  _, eva_theta1 = checkpoints.checkpoint_arrays(eva, 1)
  _, static_theta1 = checkpoints.checkpoint_arrays(static, 1)
  assert len(eva_theta1) == len(static_theta1)
  for a, b in zip(eva_theta1, static_theta1):
    np.testing.assert_array_equal(a, b)


def test_an_arm_forked_from_another_arms_theta1_equals_an_unforked_run(arms, tmp_path):
  eva, static = arms
  forked = _run(tmp_path / "eva_forked", fork_from=static)
  assert _digests(forked) == _digests(eva)
  _, a = checkpoints.checkpoint_arrays(forked, 2)
  _, b = checkpoints.checkpoint_arrays(eva, 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="is not empty"):
    protocol.fork_theta1(str(static), str(forked))
  with pytest.raises(ValueError, match="no finished"):
    protocol.fork_theta1(str(tmp_path / "nothing"), str(tmp_path / "dst"))


def test_paper_protocol_eva_evolves_x1_static_takes_x2(arms, tmp_path):
  eva, theta1 = arms
  x1 = [p["text"] for p in _read(eva, "iter_000/prompts.json")]
  assert [p["text"] for p in _read(eva, "iter_001/prompts.json")] == x1  # X1 re-sampled by θ1.
  created = _read(eva, "iter_001/create.json")
  assert created["evolved"] and set(created["parents"]) <= set(x1)
  assert "evolved" in {p["source"] for p in _read(eva, "iter_001/pairs.json")}
  static = _run(tmp_path / "static", fork_from=theta1, creator__enabled=False)
  x2 = [p["text"] for p in _read(static, "iter_001/prompts.json")]
  assert x2 and not set(x2) & set(x1)
  assert not (static / "iter_001" / "create.json").exists()
  assert {p["source"] for p in _read(static, "iter_001/pairs.json")} == {"base"}


def test_select_without_evolving_trains_on_the_subset_only(arms, tmp_path):
  workdir = _run(tmp_path / "subset", fork_from=arms[1], creator__evolve=False,
                 creator__fraction=0.5)
  selected = _read(workdir, "iter_001/subset.json")["selected"]
  prompts = _read(workdir, "iter_001/prompts.json")
  assert len(selected) == creator.num_selected(len(prompts), 0.5)
  keep = {prompts[i]["text"] for i in selected}
  pairs = _read(workdir, "iter_001/pairs.json")
  assert pairs and {p["prompt"] for p in pairs} <= keep
  assert not (workdir / "iter_001" / "create.json").exists()
  assert not (workdir / "iter_001" / "generate_evolved.npz").exists()
  # The selection is the creator's weighted draw on this iteration's informativeness.
  info = np.asarray(_read(workdir, "iter_001/evaluate.json")["informativeness"])
  expected = creator.select(info, fraction=0.5, method="weighted",
                            rng=stages.stage_rng(0, 1, "create"))
  assert selected == expected.tolist()
