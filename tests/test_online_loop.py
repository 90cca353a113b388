"""The online loop: its buffer and schedule against hand-computed expectations, config checks,
and the smoke run end to end in subprocesses (logged fields; killed anywhere and resumed, the
same params bit for bit and the same metrics as an uninterrupted run).

The end-to-end runs share one persistent compilation cache, so only the first one compiles.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import online as online_config
from eva_jax import config_check, online_loop
from eva_jax.online_buffer import (EVICTION_REASONS, OnlineBuffer, SourceStream, is_evolve_step,
                                   slot_counts)
from tests import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- schedule and buffer ----------------------------------------------------------------------


def test_evolution_starts_after_the_warm_up_then_every_k_steps():
  got = [s for s in range(12) if is_evolve_step(s, warmup_steps=4, evolve_every=3)]
  assert got == [3, 6, 9]  # After 4, 7 and 10 steps.
  assert [s for s in range(5) if is_evolve_step(s, warmup_steps=0, evolve_every=2)] == [1, 3]


@pytest.mark.parametrize("num, ratio, available, expected", [
    (10, 0.5, 100, (5, 5)), (10, 0.25, 100, (3, 7)),  # round-half-up(2.5) = 3 base prompts.
    (10, 0.5, 2, (8, 2)),  # Fewer evolved prompts than slots: base prompts fill in.
    (4, 1.0, 10, (4, 0)), (4, 0.0, 0, (4, 0))])
def test_mix_proportions(num, ratio, available, expected):
  assert slot_counts(num, ratio, available) == expected


class _FakeSource:
  """Chunks of 4 prompts; chunk 1 repeats one of chunk 0 (a duplicate the stream must skip)."""

  def base_prompts(self, chunk):
    texts = [f"p{chunk}-{i}" for i in range(4)]
    if chunk == 1:
      texts[2] = "p0-1"
    return [type("Prompt", (), {"text": t}) for t in texts]


def _buffer(visits_info):
  """A buffer whose base pool holds one prompt per (visits, info) pair, in that order."""
  buf = OnlineBuffer()
  buf.refill(SourceStream(_FakeSource()), len(visits_info), step=0)
  for (visits, info), entry in zip(visits_info, buf.active.values()):
    entry.visits, entry.info = visits, info
  return buf


def test_refill_reads_the_source_in_order_and_skips_prompts_already_seen():
  buf = OnlineBuffer()
  stream = SourceStream(_FakeSource())
  buf.refill(stream, 3, step=0)
  assert [buf.records.get(i).text for i in buf.pool("base")] == ["p0-0", "p0-1", "p0-2"]
  buf.refill(stream, 7, step=1)
  assert [buf.records.get(i).text for i in buf.pool("base")][3:] == ["p0-3", "p1-0", "p1-1",
                                                                     "p1-3"]
  assert buf.cursor == 8
  assert buf.refill(stream, 7, step=2) == []  # Full: nothing drawn.


def test_unvisited_prompts_come_first_in_the_order_they_joined():
  buf = _buffer([(2, 1.0), (0, None), (1, 0.0), (0, None)])
  evolved = buf.records.add("child", iteration=1, method="m", parent_id="0-0", step=1)
  buf.add_evolved([evolved], step=1)
  rng = np.random.default_rng(0)
  ids = buf.draw(4, base_ratio=0.5, info_floor=0.1, rng=rng)
  # 2 evolved slots but one evolved prompt: 3 base prompts, the two unvisited first.
  assert ids[:2] == ["0-1", "0-3"] and ids[3] == evolved.id
  assert ids[2] in ("0-0", "0-2") and len(set(ids)) == 4


def test_visited_prompts_are_drawn_in_proportion_to_informativeness_plus_floor():
  # Weights 0 + 0.5, 0.5 + 0.5, 1.5 + 0.5: the first pick is 1/7, 2/7, 4/7; the second, given
  # the first, is each of the other two in proportion to its weight.
  buf = _buffer([(1, 0.0), (1, 0.5), (1, 1.5)])
  first, second = np.zeros(3), np.zeros(3)
  draws = 6000
  for seed in range(draws):
    ids = buf.draw(2, base_ratio=1.0, info_floor=0.5, rng=np.random.default_rng(seed))
    first[int(ids[0][2:])] += 1
    second[int(ids[1][2:])] += 1
  w = np.array([0.5, 1.0, 2.0])
  p_first = w / w.sum()
  p_second = np.array([sum(p_first[j] * w[i] / (w.sum() - w[j]) for j in range(3) if j != i)
                       for i in range(3)])
  np.testing.assert_allclose(first / draws, p_first, atol=0.02)
  np.testing.assert_allclose(second / draws, p_second, atol=0.02)


def test_eviction_rules():
  buf = _buffer([(0, None)] * 4)
  a, b, c, d = buf.active
  kw = dict(solved_reward=1.0, max_visits=3, max_zero_visits=2)
  buf.record([a, b, c, d], np.array([[1.0, 1.0], [0.3, 0.3], [0.0, 1.0], [0.0, 0.0]]),
             np.array([0.0, 0.0, 1.0, 0.0]))
  # a: all right (solved before its zero signal counts); b, d: one visit without signal.
  assert buf.evict([a, b, c, d], **kw) == {"solved": 1, "no_signal": 0, "max_visits": 0}
  buf.record([b, c, d], np.array([[0.5, 0.5], [0.0, 1.0], [0.0, 0.2]]),
             np.array([0.0, 1.0, 0.2]))
  # b: two visits in a row without signal; d's streak was broken.
  assert buf.evict([b, c, d], **kw) == {"solved": 0, "no_signal": 1, "max_visits": 0}
  buf.record([c], np.array([[0.0, 1.0]]), np.array([1.0]))
  assert buf.evict([c, d], **kw) == {"solved": 0, "no_signal": 0, "max_visits": 1}
  assert list(buf.active) == [d] and buf.active[d].visits == 2
  assert set(EVICTION_REASONS) == {"solved", "no_signal", "max_visits", "capacity"}


def test_capacity_trims_the_oldest_and_the_buffer_round_trips_through_json():
  buf = _buffer([(1, 0.5), (0, None)])
  parent = "0-0"
  for n in range(3):  # A chain: each child rewrites the previous one.
    record = buf.records.add(f"child {n}", iteration=n + 1, method="m", parent_id=parent,
                             step=1)
    buf.add_evolved([record], step=n + 1)
    parent = record.id
  assert [buf.depth(i) for i in buf.pool("evolved")] == [1, 2, 3]
  assert buf.trim("evolved", 2) == 1
  assert [buf.records.get(i).text for i in buf.pool("evolved")] == ["child 1", "child 2"]
  stats = buf.stats()
  assert (stats["buffer_size"], stats["buffer_evolved"], stats["lineage_depth_max"]) == (4, 2, 3)
  assert stats["lineage_depth_mean"] == 2.5 and stats["prompts_seen"] == 5
  back = OnlineBuffer.from_json(json.loads(json.dumps(buf.to_json())))
  assert back.to_json() == buf.to_json()
  assert back.has_text("child 0")  # Evicted prompts stay in the lineage (and the dedup).


# --- config checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("num_samples", 1, "online.num_samples: must be an int >= 2, got 1"),
    ("steps", 0, "online.steps: must be an int >= 1"),
    ("base_pool", 3, r"online.base_pool: \(3\) must hold at least online.prompts_per_step"),
    ("clip_eps", 1.5, r"online.clip_eps: must lie in \(0, 1\)"),
    ("beta", -0.1, "online.beta: must be a finite number >= 0"),
    ("base_ratio", 1.2, r"online.base_ratio: must lie in \[0, 1\]"),
    ("learning_rate", 0.0, "online.learning_rate: must be a positive number"),
    ("solved_reward", float("nan"), "online.solved_reward: must be a number"),
    ("token_budget", -1, "online.token_budget: must be an int >= 0"),
])
def test_bad_online_fields_are_refused_before_anything_is_written(tmp_path, key, value, message):
  c = online_config.get_config("smoke")
  c.online[key] = value
  with pytest.raises(ValueError, match=message):
    online_loop.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config_check.validate(online_config.get_config("smoke"))  # The smoke config itself is fine.


@pytest.mark.parametrize("field, value", [("protocol", "paper"), ("creator.evolve", False),
                                          ("creator.selection", "topic_weighted")])
def test_offline_only_fields_are_refused_online(field, value):
  c = online_config.get_config("smoke")
  section, _, key = field.rpartition(".")
  (c[section] if section else c)[key] = value
  with pytest.raises(ValueError, match=f"config field {field}: .* not supported with an `online`"):
    config_check.validate(c)


@pytest.mark.parametrize("arg, fsdp, prompts, chunk", [("paper", 4, "eva", 16),
                                                         ("paper,static,v5e-64", 64, "static", 32)])
def test_paper_scale_config_validates_with_its_sizes(arg, fsdp, prompts, chunk, tmp_path):
  c = online_config.get_config(arg)
  for name in ("policy", "reward"):
    (tmp_path / name).mkdir()
  (tmp_path / "prompts.jsonl").write_text('{"prompt": "Question?"}\n')
  c.model.path = c.tokenizer.path = str(tmp_path / "policy")
  c.reward.path, c.data.path = str(tmp_path / "reward"), str(tmp_path / "prompts.jsonl")
  config_check.validate(c)
  o = c.online
  assert (c.model.family, c.reward.kind, c.data.source) == ("gemma2", "armorm", "jsonl")
  assert c.creator.enabled == (prompts == "eva") and c.creator.evolver == "lm"
  assert (o.num_samples, o.prompts_per_step, o.max_new_tokens) == (4, 32, 2048)
  assert c.sampling.max_prompt_length == 1024 and c.sampling.batch_size == chunk
  # One rollout row per chip per micro-batch (the memory plan's rloo rows): 128 rows / fsdp.
  assert c.mesh.fsdp == fsdp and o.grad_accum == 128 // fsdp
  with pytest.raises(ValueError, match="slice in"):
    online_config.get_config("paper,v5e-32")


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_online(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")

  def run(workdir, *flags, env=None):
    run_env = dict(os.environ)
    run_env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT, **(env or {}))
    cmd = [sys.executable, "-m", "eva_jax.main", "--config=configs/online.py:smoke",
           f"--workdir={workdir}", "--config.checkpoint.use_async=True", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True,
                          timeout=600)
  return run


@pytest.fixture(scope="module")
def reference(run_online, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("online") / "run"
  proc = run_online(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def _online_rows(workdir):
  """The last metrics row of each online step, without the fields that measure time."""
  rows = {}
  for line in open(workdir / "metrics.jsonl"):
    row = json.loads(line)
    if row["kind"] == "online":
      rows[row["step"]] = {k: v for k, v in row.items()
                           if k not in online_loop.TIME_KEYS + ("total_wall_seconds",)}
  return rows


LOGGED = ("reward_base", "reward_evolved", "adv_abs", "no_signal", "kl", "entropy",
          "response_length", "truncated", "grad_norm", "sampler_trainer_logp_diff",
          "buffer_size", "buffer_evolved_share", "info_q10", "info_q50", "info_q90", "evicted",
          "lineage_depth_mean", "lineage_depth_max", "total_policy_tokens",
          "total_creator_tokens", "updates", "total_wall_seconds", "time_sample", "time_update",
          "time_create") + tuple(f"evicted_{r}" for r in EVICTION_REASONS)


def test_smoke_run_logs_every_field_and_reports(reference):
  workdir, proc = reference
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  online = [r for r in rows if r["kind"] == "online"]
  c = online_config.get_config("smoke").online
  assert [r["step"] for r in online] == list(range(1, c.steps + 1))
  for row in online:
    missing = [k for k in LOGGED if k not in row]
    assert not missing, f"step {row['step']} lacks {missing}"
  last = online[-1]
  assert last["updates"] == c.steps
  assert last["total_policy_tokens"] == sum(r["policy_tokens"] for r in online)
  # The creator ran after the warm-up and its prompts reached the batches.
  assert last["total_creator_tokens"] > 0 and last["lineage_depth_max"] >= 1
  assert all(r["batch_evolved_share"] == 0 for r in online[:c.warmup_steps])
  assert any(r["batch_evolved_share"] > 0 for r in online[c.warmup_steps:])
  # Shared weights: the trainer's log-probs of the samples are the sampler's, to rounding.
  assert max(r["sampler_trainer_logp_diff_max"] for r in online) < 1e-3
  assert online[0]["kl"] == 0.0  # Step 0 samples from θ_0, the reference itself.
  assert {r["step"] for r in rows if r["kind"] == "eval"} == {0, 3, 6}
  assert "done: held-out reward" in proc.stdout
  assert "## Online" in (workdir / "report.md").read_text()
  assert (workdir / "plots" / "online.png").exists()


# Each restart dies at the next point: inside the first (async) checkpoint write, mid-run, and
# at the end after the final evaluation and the buffer are written but before the checkpoint.
# (Two points keep the suite's time down; every other point is a case of these two: state on
# disk is either a committed checkpoint with its buffer, or files ahead of the checkpoint.)
KILL_CHAIN = ("checkpoint_write:1", "buffer_000006.json.written:1")


def test_killed_anywhere_resumes_bit_identically(run_online, reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / "run"
  for point in KILL_CHAIN:
    proc = run_online(workdir, env={"EVA_TEST_KILL_AT": point})
    assert proc.returncode == -9, f"{point} did not kill: {proc.stderr[-2000:]}"
  proc = run_online(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step, params = checkpoints.checkpoint_arrays(workdir / "online")
  ref_step, ref_params = checkpoints.checkpoint_arrays(ref_dir / "online")
  assert step == ref_step == 6 and len(params) == len(ref_params)
  for a, b in zip(params, ref_params):
    np.testing.assert_array_equal(a, b)  # Bit for bit, optimizer state included.
  assert _online_rows(workdir) == _online_rows(ref_dir)
  for s in (0, 3, 6):
    name = f"online/evaluate_{s:06d}.json"
    assert json.loads((workdir / name).read_text()) == json.loads((ref_dir / name).read_text())


def test_token_budget_ends_the_run_after_the_step_that_reaches_it(run_online, reference,
                                                                   tmp_path):
  ref_dir, _ = reference
  ref_rows = _online_rows(ref_dir)
  # The generated tokens after each step of the uninterrupted run, from its per-step logs: a
  # budget one above step 3's total ends the run after step 4.
  used = np.cumsum([ref_rows[s]["policy_tokens"] for s in sorted(ref_rows)])
  used += np.array([ref_rows[s]["total_creator_tokens"] for s in sorted(ref_rows)])
  budget = int(used[2]) + 1
  expected = int(np.argmax(used >= budget)) + 1
  assert expected == 4 and used[3] > used[2]
  workdir, flag = tmp_path / "run", f"--config.online.token_budget={budget}"
  # Killed after the last evaluation is written, before its buffer and checkpoint: the resume
  # redoes step 4 from checkpoint 3 and ends there again.
  proc = run_online(workdir, flag, env={"EVA_TEST_KILL_AT": "evaluate_000004.json.written"})
  assert proc.returncode == -9, proc.stderr[-2000:]
  proc = run_online(workdir, flag)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"token budget {budget} reached after step {expected}" in proc.stdout
  rows = _online_rows(workdir)
  assert sorted(rows) == list(range(1, expected + 1))
  assert rows == {s: ref_rows[s] for s in rows}  # The same steps as the run without a budget.
  evals = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert sorted({r["step"] for r in evals if r["kind"] == "eval"}) == [0, 3, expected]
  step, params = checkpoints.checkpoint_arrays(workdir / "online")
  assert step == expected
  # The uninterrupted run keeps its last two checkpoints, 4 and 6: the same params bit for bit.
  _, ref_params = checkpoints.checkpoint_arrays(ref_dir / "online", expected)
  assert len(params) == len(ref_params)
  for a, b in zip(params, ref_params):
    np.testing.assert_array_equal(a, b)
  assert "## Online" in (workdir / "report.md").read_text()
