"""Test set-up: 8 fake CPU devices (so every mesh path runs here) and the shared data location."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("TKRE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real data folder `../shared/data`; skips the test when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (set TKRE_SHARED_DATA or place shared/ "
                "beside the checkout)")
  return SHARED_DATA


def require(path: pathlib.Path) -> pathlib.Path:
  """Skips the calling test with a clear reason when `path` does not exist."""
  if not path.exists():
    pytest.skip(f"required data file missing: {path}")
  return path


@pytest.fixture(scope="module")
def fewer_compiler_optimizations():
  """XLA's optimisations mostly off for every compile of the module that asks for it (faster
  compiles; results that do not depend on optimisation, e.g. row structure or FLOP counts).
  Use as `pytestmark = pytest.mark.usefixtures("fewer_compiler_optimizations")`."""
  import jax  # pylint: disable=import-outside-toplevel
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def pytest_configure(config):
  """The markers of the long tests (`-m "not slow"` leaves them out)."""
  config.addinivalue_line("markers", "slow: a long test (minutes on a 2-core machine)")
  config.addinivalue_line("markers", "multiprocess: starts several JAX processes on localhost")
