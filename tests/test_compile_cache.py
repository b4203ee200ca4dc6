"""The persistent compilation cache (`--compilation_cache_dir`, `tkre_jax.train.compile_cache`): it
sets JAX's cache options, and a second process that compiles the same step loads it from the cache
and computes the same bits."""

import json
import os
import subprocess
import sys

import jax
import pytest

from tkre_jax import config as config_lib
from tkre_jax.train import compile_cache

_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def restore_jax_cache_options():
  """Puts JAX's cache options back and forgets the initialised cache, so later tests of this
  process compile without a persistent cache."""
  from jax.experimental.compilation_cache import compilation_cache as jax_cc  # noqa: PLC0415
  old = {name: jax.config.values[name] for name in _OPTIONS}
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  jax_cc.reset_cache()


def test_enable_sets_the_jax_options(tmp_path, restore_jax_cache_options):
  assert compile_cache.enable("") is None and compile_cache.enable(None) is None
  folder = compile_cache.enable(str(tmp_path / "cache"))
  assert folder == (tmp_path / "cache").resolve() and folder.is_dir()
  assert jax.config.jax_compilation_cache_dir == str(folder)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # fast compiles cached too
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1    # small entries too
  assert compile_cache.is_enabled() and compile_cache.stats()["cache"] == str(folder)


def test_default_dir_is_the_environment_variable(monkeypatch):
  monkeypatch.setenv(compile_cache.ENV_VAR, "/some/where")
  assert compile_cache.default_dir() == "/some/where"
  monkeypatch.delenv(compile_cache.ENV_VAR)
  assert compile_cache.default_dir() == ""


# A fresh process compiles a small train-step-like program through runtime.CompiledStep with the
# cache at argv[1] (the way tkre_jax.main enables it: the flag, else $TKRE_COMPILATION_CACHE) and
# prints whether its compile was a cache hit, the process stats and the result's bytes.
_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from tkre_jax.train import compile_cache, runtime
compile_cache.track()
compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else compile_cache.default_dir())

def step(w, x):
  for _ in range(4):
    x = jnp.tanh(x @ w)
  return x.sum(0), jax.nn.softmax(x, axis=-1)

f = runtime.CompiledStep(step, "tiny_step")
w = jax.random.normal(jax.random.key(0), (64, 64)) / 8
x = jax.random.normal(jax.random.key(1), (32, 64))
out = jax.device_get(f(w, x))
print(json.dumps({"hit": list(f.cache_hits.values()), "stats": compile_cache.stats(),
                  "out": [np.asarray(o).tobytes().hex() for o in out]}))
"""


def _run(args, cache_env=None) -> dict:
  # Without conftest's session-wide cache (JAX_COMPILATION_CACHE_DIR and its settings): the child
  # caches exactly where this test says, or nowhere.
  env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV_VAR
         and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env["JAX_PLATFORMS"] = "cpu"
  if cache_env is not None:
    env[compile_cache.ENV_VAR] = cache_env
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, *args], env=env, capture_output=True,
                        text=True, timeout=300, cwd=str(config_lib.REPO_ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.subprocess
def test_second_process_loads_the_step_from_the_cache(tmp_path):
  cache = tmp_path / "jax_cache"
  first = _run([str(cache)])
  assert first["hit"] == [False] and first["stats"]["cache_hits"] == 0
  assert any(cache.iterdir()), "nothing was written to the cache"
  second = _run([str(cache)])
  assert second["hit"] == [True]
  assert second["stats"]["cache_hits"] == second["stats"]["compiles"] >= 1  # every program loaded
  assert second["out"] == first["out"]  # the same executable: the same bits
  # The environment variable is the default, and no cache means no hit.
  assert _run([], cache_env=str(cache))["hit"] == [True]
  off = _run([])
  assert off["hit"] == [False] and off["stats"]["cache"] is None and off["out"] == first["out"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_main_turns_the_cache_on_before_the_stage(tmp_path):
  """`--compilation_cache_dir` (else $TKRE_COMPILATION_CACHE) is set up before the stage starts:
  the folder exists even when the stage then fails on its input."""
  # Without conftest's session-wide cache (JAX_COMPILATION_CACHE_DIR and its settings): the child
  # caches exactly where this test says, or nowhere.
  env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV_VAR
         and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env["JAX_PLATFORMS"] = "cpu"
  for flag, cache_env, folder in (("--compilation_cache_dir={}", None, "a"),
                                  (None, "{}", "b"), ("--compilation_cache_dir=", "{}", "c")):
    where = str(tmp_path / folder)
    cmd = [sys.executable, "-m", "tkre_jax.main", "--stage=eval", f"--workdir={tmp_path / 'ev'}",
           f"--init_from={tmp_path / 'missing'}"] + ([flag.format(where)] if flag else [])
    run_env = dict(env, **({compile_cache.ENV_VAR: cache_env.format(where)} if cache_env else {}))
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300,
                          cwd=str(config_lib.REPO_ROOT))
    assert proc.returncode == 2, proc.stderr[-2000:]  # no run.json there: a user error
    # an explicit empty flag turns the cache off whatever the environment says
    assert (tmp_path / folder).is_dir() == (folder != "c"), (folder, proc.stderr[-2000:])
