"""Test set-up: 8 fake CPU devices (so every mesh path runs here), the shared data location, a
persistent compilation cache shared by this process and the processes it starts, the markers' rules,
the tiny model and data every stage test uses, and `main_cli` (tkre_jax.main in this process).

Markers (declared in pytest.ini, `--strict-markers`): `slow` (over ~3 s, or starts processes),
`subprocess` (starts Python processes; implies `slow`), `multiprocess` (several cooperating JAX
processes; implies `slow`), `multidevice` (needs more than one JAX device). `bash launch/test.sh -m
"not slow"` is the quick tier.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# JAX's persistent compilation cache, on before JAX is imported: every executable this session
# compiles (here or in a `python -m tkre_jax.main` it starts, which inherits the environment) is
# written to one folder, so the next process that compiles the same step loads it instead. A folder
# of this session's own unless JAX_COMPILATION_CACHE_DIR is set (then it is kept between sessions).
_OWN_CACHE_DIR = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="tkre_jax_test_compilation_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # default 1 s: most miss

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("TKRE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

_PROCESS_MARKERS = ("subprocess", "multiprocess")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE_DIR:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Tests that start processes are slow, whether or not they say so."""
  del config
  for item in items:
    if any(item.get_closest_marker(m) for m in _PROCESS_MARKERS) and not item.get_closest_marker(
        "slow"):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _python_processes_need_a_marker(request, monkeypatch):
  """A test that starts a Python process without a `subprocess` (or `multiprocess`) marker fails:
  `-m "not slow"` must not start any."""
  if any(request.node.get_closest_marker(m) for m in _PROCESS_MARKERS):
    yield
    return
  real = subprocess.Popen

  class Guarded(real):  # pylint: disable=too-few-public-methods

    def __init__(self, args, *a, **kw):
      head = args[0] if isinstance(args, (list, tuple)) and args else args
      if isinstance(head, (str, os.PathLike)) and os.path.basename(str(head)).startswith(
          ("python", os.path.basename(sys.executable))):
        pytest.fail(f"{request.node.nodeid} starts a Python process ({args!r}) but is not "
                    "marked `subprocess`")
      super().__init__(args, *a, **kw)

  monkeypatch.setattr(subprocess, "Popen", Guarded)
  yield


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


# ------------------------------------------------------------------------------------------------
# The tiny set-up of the stage tests: a 2-layer, hidden-32 BERT with random weights and the MiniLM
# tokenizer (helpers.make_tiny_hf_dir) on 4 relations x 12 real FewRel sentences (K = 4: 16 train,
# 16 dev, 16 test rows), 64 tokens.


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> pathlib.Path:
  """The tiny encoder's HF folder (seed 0). Read-only: tests that need another one make it."""
  from tests.helpers import make_tiny_hf_dir  # pylint: disable=import-outside-toplevel
  return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_fewrel(shared_data, tmp_path_factory) -> pathlib.Path:
  """The tiny FewRel data folder (helpers.make_tiny_fewrel: 4 relations x 12, train 4, dev 4)."""
  from tests.helpers import make_tiny_fewrel  # pylint: disable=import-outside-toplevel
  return make_tiny_fewrel(shared_data, tmp_path_factory.mktemp("tiny_fewrel"))


@pytest.fixture(scope="session")
def tiny_prepared(tiny_fewrel, tiny_hf_dir, tmp_path_factory) -> pathlib.Path:
  """`--stage=prepare` of the tiny set-up (read-only for the tests)."""
  from tests.helpers import tiny_base_config  # pylint: disable=import-outside-toplevel
  from tkre_jax import stages  # pylint: disable=import-outside-toplevel
  out = tmp_path_factory.mktemp("tiny_prepared") / "prepared"
  stages.run("prepare", tiny_base_config(tiny_fewrel, tiny_hf_dir), out)
  return out


@pytest.fixture
def tiny_config(tiny_fewrel, tiny_hf_dir, tiny_prepared):
  """A fresh config of the tiny set-up, prepared_dir included (tests change it freely)."""
  from tests.helpers import tiny_base_config  # pylint: disable=import-outside-toplevel
  return tiny_base_config(tiny_fewrel, tiny_hf_dir, tiny_prepared)


@pytest.fixture(scope="session")
def tiny_finetune(tiny_fewrel, tiny_hf_dir, tiny_prepared, tmp_path_factory):
  """`--stage=finetune` of the tiny set-up on `helpers.stage_mesh()`: 16 epochs of 2 steps, dev
  evaluated every 4 epochs, XLA's optimisations off (use `fewer_compiler_optimizations` where a test
  compares its own evaluation with this run's). Shared, read-only (the config too): copy the workdir to change it.
  Returns (workdir, config, summary, evaluated): `evaluated` holds the number of rows of each
  `classifier.evaluate` call the run made, in order."""
  import jax  # pylint: disable=import-outside-toplevel
  from tkre_jax import stages  # pylint: disable=import-outside-toplevel
  from tkre_jax.tasks import classifier  # pylint: disable=import-outside-toplevel
  from tests.helpers import stage_mesh, tiny_base_config  # pylint: disable=import-outside-toplevel
  c = tiny_base_config(tiny_fewrel, tiny_hf_dir, tiny_prepared)
  c.train.update(epochs=16, eval_every_epochs=4, checkpoint_every_seconds=0)
  workdir = tmp_path_factory.mktemp("tiny_finetune") / "finetune"
  evaluated = []
  evaluate = classifier.evaluate

  def counting(predict_fn, params, arrays, *args, **kw):
    evaluated.append(len(arrays["label"]))
    return evaluate(predict_fn, params, arrays, *args, **kw)

  fewer = jax.config.values["jax_disable_most_optimizations"]
  classifier.evaluate = counting
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    summary = stages.run("finetune", c, workdir, mesh=stage_mesh())
  finally:
    classifier.evaluate = evaluate
    jax.config.update("jax_disable_most_optimizations", fewer)
  return workdir, c, summary, evaluated


@pytest.fixture
def main_cli(monkeypatch, capsys, caplog):
  """Runs `python -m tkre_jax.main ARGS` in this process (flags parsed from ARGS, then main()):
  returns (exit code, stdout, stderr with the log messages appended). See helpers.run_main."""
  from tests.helpers import run_main  # pylint: disable=import-outside-toplevel

  def run(*args: str, devices: int | None = None):
    return run_main(list(args), monkeypatch, capsys, caplog, devices)
  return run
