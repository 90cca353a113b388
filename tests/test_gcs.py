"""Workdirs on gs://, against a local GCS emulator (the gcs_emulator fixture in conftest.py).

Objects are read back with google-cloud-storage, a client independent of the gcsfs / epath
path the code writes through; checkpoints are compared bit for bit with what was saved.
"""
import io
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import buffer as buffer_lib
from eva_jax import export
from eva_jax import fileio
from eva_jax import report
from eva_jax import workdir as wd
from tests import checkpoints


def _blob(url: str) -> bytes:
  """An object's bytes through google-cloud-storage (not the gcsfs path under test)."""
  from google.cloud import storage
  bucket, _, name = url.removeprefix("gs://").partition("/")
  return storage.Client(project="test").bucket(bucket).blob(name).download_as_bytes()


def _names(url: str) -> list[str]:
  from google.cloud import storage
  bucket, _, prefix = url.removeprefix("gs://").partition("/")
  return sorted(b.name.removeprefix(prefix + "/")
                for b in storage.Client(project="test").list_blobs(bucket, prefix=prefix + "/"))


def test_json_and_npz_round_trip(gcs_workdir):
  path = f"{gcs_workdir}/iter_000/pairs.json"
  obj = {"a": [1, 2.5, None], "b": np.float32(0.25), "c": np.arange(3)}
  wd.write_json(path, obj)
  expected = {"a": [1, 2.5, None], "b": 0.25, "c": [0, 1, 2]}
  assert json.loads(_blob(path)) == expected
  assert wd.read_json(path) == expected

  arrays = {"rewards_PxN": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
            "ids_P": np.array([3, 1, 2], np.int32)}
  npz = f"{gcs_workdir}/iter_000/rewards.npz"
  wd.write_npz(npz, **arrays)
  independent = np.load(io.BytesIO(_blob(npz)))
  back = wd.read_npz(npz)
  for key, value in arrays.items():
    np.testing.assert_array_equal(independent[key], value)
    np.testing.assert_array_equal(back[key], value)
    assert back[key].dtype == value.dtype

  assert fileio.listdir(f"{gcs_workdir}/iter_000") == ["pairs.json", "rewards.npz"]
  fileio.remove(f"{gcs_workdir}/iter_000")
  assert not fileio.exists(path) and fileio.listdir(gcs_workdir) == []


def test_atomic_writer_that_raises_uploads_nothing(gcs_workdir):
  fileio.atomic_write(f"{gcs_workdir}/a.bin", b"old")
  with pytest.raises(RuntimeError, match="stop"):
    with fileio.atomic_writer(f"{gcs_workdir}/a.bin") as f:
      f.write(b"half")
      raise RuntimeError("stop")
  with pytest.raises(RuntimeError, match="stop"):
    with fileio.atomic_writer(f"{gcs_workdir}/b.bin") as f:
      f.write(b"half")
      raise RuntimeError("stop")
  assert _blob(f"{gcs_workdir}/a.bin") == b"old"
  assert _names(gcs_workdir) == ["a.bin"]


def test_corrupt_artifacts_on_gcs(gcs_workdir):
  fileio.atomic_write(f"{gcs_workdir}/empty.json", b"")
  with pytest.raises(wd.CorruptArtifact, match=r"empty.json: empty file \(0 bytes\)"):
    wd.read_json(f"{gcs_workdir}/empty.json")
  wd.write_npz(f"{gcs_workdir}/a.npz", x=np.arange(1000))
  raw = _blob(f"{gcs_workdir}/a.npz")
  fileio.atomic_write(f"{gcs_workdir}/a.npz", raw[:len(raw) // 2])
  with pytest.raises(wd.CorruptArtifact, match="a.npz: not a readable .npz"):
    wd.read_npz(f"{gcs_workdir}/a.npz")


def _tb_scalars(data: bytes) -> dict[str, list[tuple[int, float]]]:
  """Scalars of a TensorBoard event file, parsed here from its TFRecord framing (u64 length,
  u32 CRC, payload, u32 CRC) and the Event protobuf."""
  from tensorboardX.proto import event_pb2
  scalars: dict[str, list[tuple[int, float]]] = {}
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_metrics_jsonl_and_tensorboard(gcs_workdir):
  metrics = wd.Metrics(gcs_workdir, flush_secs=3600)
  metrics.log("train", 1, loss=np.float32(0.5), note="x")
  metrics.log("train", 2, loss=0.25)
  metrics.log("eval", 2, heldout_reward=1.5)
  assert [r["step"] for r in metrics.read("train")] == [1, 2]  # read() flushes.
  metrics.close()
  # A resumed run appends to the same object.
  resumed = wd.Metrics(gcs_workdir, flush_secs=3600)
  resumed.log("train", 3, loss=0.125)
  resumed.close()
  rows = [json.loads(line) for line in _blob(f"{gcs_workdir}/metrics.jsonl").splitlines()]
  assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("eval", 2),
                                                    ("train", 3)]
  assert rows[0]["loss"] == 0.5 and rows[0]["note"] == "x"

  events = [name for name in _names(gcs_workdir) if name.startswith("tb/events.out.tfevents")]
  assert len(events) == 2  # One event file per writer.
  scalars: dict[str, list] = {}
  for name in events:
    for tag, points in _tb_scalars(_blob(f"{gcs_workdir}/{name}")).items():
      scalars.setdefault(tag, []).extend(points)
  assert sorted(scalars["train/loss"]) == [(1, 0.5), (2, 0.25), (3, 0.125)]
  assert scalars["eval/heldout_reward"] == [(2, 1.5)]


def test_prompt_buffer_save_load(gcs_workdir):
  buf = buffer_lib.PromptBuffer()
  root = buf.add("What is 2+2?", iteration=0)
  child = buf.add("What is 2+2, in words\u2028please?", iteration=1, method="rewrite",
                  parent_id=root.id, step=1)
  buf.record_scores([child.id], [[0.0, 1.0]], [0.5])
  path = f"{gcs_workdir}/buffer.jsonl"
  buf.save(path)
  assert [json.loads(line)["id"] for line in _blob(path).decode().split("\n") if line] == \
      [root.id, child.id]
  loaded = buffer_lib.PromptBuffer.load(path)
  assert list(loaded) == list(buf)


def test_export_files(gcs_workdir):
  alpaca = f"{gcs_workdir}/exports/alpaca.json"
  export.write_alpaca_eval(alpaca, ["Say hi"], ["hi"], "eva")
  assert json.loads(_blob(alpaca)) == [{"instruction": "Say hi", "output": "hi",
                                        "generator": "eva"}]
  assert export.validate_alpaca_eval(alpaca)[0]["output"] == "hi"
  arena = f"{gcs_workdir}/exports/eva.jsonl"
  export.write_arena_hard(arena, ["q1", "q2"], ["a", "b"], "eva", [1, 1], tstamp=1.0)
  assert [r["question_id"] for r in export.validate_arena_hard(arena)] == ["q1", "q2"]
  mt = f"{gcs_workdir}/exports/mt.jsonl"
  export.write_mt_bench(mt, [81], [["t1", "t2"]], "eva", tstamp=1.0)
  assert json.loads(_blob(mt))["choices"][0]["turns"] == ["t1", "t2"]
  assert export.validate_mt_bench(mt)[0]["question_id"] == 81


def test_report(gcs_workdir):
  iterations = [{"iteration": 0, "rewards": np.array([0.1, 0.3]),
                 "informativeness": np.array([0.2]), "heldout_reward": 0.25,
                 "heldout_by_level": {"1": 0.2}},
                {"iteration": 1, "rewards": np.array([0.4, 0.6]),
                 "informativeness": np.array([0.3]), "heldout_reward": 0.5,
                 "heldout_by_level": {"1": 0.45}, "win_rate": 0.75}]
  path = report.write_report(gcs_workdir, iterations, {"rewrite": 3})
  assert path == f"{gcs_workdir}/report.md"
  text = _blob(path).decode()
  assert "| 1 | 0.5000 | 0.750 |" in text
  import matplotlib.image
  for name in ("rewards", "informativeness", "heldout", "lineage"):
    png = _blob(f"{gcs_workdir}/plots/{name}.png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert matplotlib.image.imread(io.BytesIO(png), format="png").ndim == 3
  assert _names(gcs_workdir) == ["plots/heldout.png", "plots/informativeness.png",
                                 "plots/lineage.png", "plots/rewards.png", "report.md"]


def test_orbax_checkpoints_bit_identical(gcs_workdir):
  key = jax.random.key(0)
  state = {"params": {"w_DxF": jax.random.normal(key, (4, 8), jnp.float32),
                      "b_F": jax.random.normal(key, (8,), jnp.bfloat16)},
           "step": jnp.array(7, jnp.int32)}
  later = jax.tree.map(lambda x: x + 1, state)
  checkpoints = wd.Checkpoints(gcs_workdir, keep=2)
  checkpoints.save(0, state)
  checkpoints.save(1, later)
  checkpoints.close()
  assert set(fileio.listdir(f"{gcs_workdir}/checkpoints")) >= {"0", "1"}

  reopened = wd.Checkpoints(gcs_workdir, keep=2)  # As a resumed run would.
  assert reopened.latest() == 1 and reopened.has(0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  for step, expected in ((0, state), (1, later)):
    restored = reopened.restore(step, abstract)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  reopened.close()


def test_check_writable(gcs_workdir):
  wd.check_writable(gcs_workdir)
  assert _names(gcs_workdir) == []  # The probe is gone.
  with pytest.raises(PermissionError, match="gs://no-such-bucket/run' is not writable"):
    wd.check_writable("gs://no-such-bucket/run")


# --- end to end: the smoke run on gs://, killed and resumed, against the local reference ---


@pytest.mark.xdist_group("smoke")  # Beside the smoke reference run (conftest.py).
def test_smoke_run_resumed_after_sigkill_on_gcs_matches_local(gcs_emulator, gcs_workdir,
                                                              smoke_reference, run_smoke,
                                                              tmp_path):
  """One iteration on gs://, killed mid-training and resumed: checkpoint 1 and every artifact
  of iteration 0 are those of the local reference run, and nothing was written locally (the
  tokenizer included: it is trained in a temp folder and cached in the bucket)."""
  # In its own folder, so that a gs:// URL handed to plain `os` calls shows up as a local "gs:".
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  killed = run_smoke(gcs_workdir, cwd=cwd, env=dict(gcs_emulator.env,
                                                    EVA_TEST_KILL_AT="train_step:2"))
  assert killed.returncode == -9, f"train_step:2 did not kill: {killed.stderr[-3000:]}"
  assert "cache/tokenizer/eva_settings.sha256" in _names(gcs_workdir)
  proc = run_smoke(gcs_workdir, cwd=cwd, env=gcs_emulator.env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(s for s in fileio.listdir(f"{gcs_workdir}/checkpoints") if s.isdigit()) == \
      ["0", "1"]
  _, params = checkpoints.checkpoint_arrays(gcs_workdir, 1)
  _, ref_params = checkpoints.checkpoint_arrays(str(smoke_reference), 1)
  assert len(params) == len(ref_params)
  for a, b in zip(params, ref_params):
    np.testing.assert_array_equal(a, b)  # Bit for bit.
  local = smoke_reference / "iter_000"
  artifacts = [name for name in _names(gcs_workdir) if name.startswith("iter_000/")]
  assert sorted(artifacts) == sorted(f"iter_000/{p.name}" for p in local.iterdir())
  for name in artifacts:
    assert _blob(f"{gcs_workdir}/{name}") == (smoke_reference / name).read_bytes(), name
  assert "held-out reward" in fileio.read_text(fileio.join(gcs_workdir, "report.md"))
  assert fileio.exists(fileio.join(gcs_workdir, "metrics.jsonl"))
  leaked = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
  assert not leaked, f"files meant for {gcs_workdir} were written locally: {leaked}"
