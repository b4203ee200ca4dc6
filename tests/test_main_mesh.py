"""`python -m tkre_jax.main` and the mesh: a preset for other hardware fails fast and clearly, a CPU mesh
gets past it, `--parallelism=pmap` is checked before any data is read (and, on real data, trains like
the jit path), multi-host set-up happens before JAX starts a backend, and only process 0 writes logs.

The flag checks run main in this process (conftest's `main_cli`: the flags parsed from an argv list);
only the backend-order check needs a fresh process (this one's backends are started).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.helpers import subprocess_env
from tkre_jax import config as config_lib
from tkre_jax.train import runtime

REPO_ROOT = config_lib.REPO_ROOT


@pytest.mark.multidevice
@pytest.mark.parametrize("stage", ["finetune", "scl"])
def test_tpu_preset_on_cpu_fails_fast_with_what_was_found(stage, tmp_path, main_cli):
  # A prepared_dir that does not exist: had the stage read data first, it would fail on that.
  code, _, err = main_cli(f"--stage={stage}", "--mesh=tpu-v4-8", f"--workdir={tmp_path / 'run'}",
                          f"--config.data.prepared_dir={tmp_path / 'no_such_dir'}")
  assert code == 2
  assert "--mesh=tpu-v4-8: preset tpu-v4-8 expects 4 TPU devices (TPU v4)" in err, err[-2000:]
  assert "found 8 devices of platform cpu" in err, err[-2000:]
  assert "Traceback" not in err and "no_such_dir" not in err, err[-2000:]
  assert "tpu-v4-8   fsdp:4" in err  # the preset table, to pick the right one
  assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.multidevice
def test_cpu_mesh_gets_past_the_mesh(tmp_path, main_cli):
  code, _, err = main_cli("--stage=finetune", "--mesh=cpu", f"--workdir={tmp_path / 'run'}")
  assert code == 2
  assert "mesh cpu: {'data': 8, 'fsdp': 1, 'tensor': 1}; process 0 of 1" in err
  assert "set --config.data.prepared_dir" in err, err[-2000:]


@pytest.mark.multidevice
@pytest.mark.parametrize("args, message", [
    (("--stage=scl", "--mesh=cpu"),
     "error: --parallelism=pmap is not available for --stage=scl: the SCL in-batch negatives"),
    (("--stage=mslm", "--mesh=cpu"), "error: --parallelism=pmap is not available for --stage=mslm"),
    (("--stage=finetune", "--mesh=cpu", "--config.mesh.rules=fsdp"),
     "--parallelism=pmap replicates every parameter, but the sharding rules shard"),
    (("--stage=finetune", "--mesh=data:4,tensor:2"), "--parallelism=pmap is data parallelism only"),
    (("--stage=finetune", "--mesh=cpu"), "set --config.data.prepared_dir"),  # pmap + dp: accepted
])
def test_pmap_flag_is_checked_before_data(args, message, tmp_path, main_cli):
  code, _, err = main_cli(*args, "--parallelism=pmap", f"--workdir={tmp_path / 'run'}")
  assert code == 2
  assert message in err, err[-2000:]


@pytest.mark.subprocess
@pytest.mark.multidevice
def test_distributed_init_comes_before_any_backend(tmp_path):
  """main() calls maybe_initialize_distributed() before JAX has started a backend (required by
  jax.distributed.initialize) and before make_mesh; data loading (stages.run) comes last."""
  script = textwrap.dedent(f"""
      import json, sys
      from absl import flags
      from jax._src import xla_bridge
      import tkre_jax.main as main_lib
      from tkre_jax import stages
      from tkre_jax.parallel import mesh as mesh_lib
      calls = []
      real_make_mesh = mesh_lib.make_mesh
      mesh_lib.maybe_initialize_distributed = lambda: calls.append(
          ("distributed", xla_bridge.backends_are_initialized()))
      mesh_lib.make_mesh = lambda spec: calls.append(("mesh", spec)) or real_make_mesh(spec)
      stages.run = lambda stage, *a, **kw: calls.append(("run", stage, kw["parallelism"])) or {{}}
      flags.FLAGS(["main", "--stage=finetune", "--mesh=data:4,fsdp:2",
                   "--workdir={tmp_path / 'run'}"])
      main_lib.main([])
      print(json.dumps(calls))
  """)
  proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  calls = json.loads(proc.stdout.strip().splitlines()[-1])
  assert calls == [["distributed", False], ["mesh", "data:4,fsdp:2"], ["run", "finetune", "jit"]]


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
  runtime.MetricsWriter(tmp_path / "w1").write({"step": 1, "loss": 0.5})
  runtime.write_summary(tmp_path / "w1", {"stage": "finetune"})
  assert not (tmp_path / "w1").exists()
  monkeypatch.setattr(jax, "process_index", lambda *a, **k: 0)
  runtime.MetricsWriter(tmp_path / "w0").write({"step": 1, "loss": np.float32(0.5)})
  runtime.write_summary(tmp_path / "w0", {"stage": "finetune"})
  assert json.loads((tmp_path / "w0" / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}
  assert json.loads((tmp_path / "w0" / "summary.json").read_text()) == {"stage": "finetune"}


@pytest.mark.slow
@pytest.mark.multidevice
def test_finetune_pmap_trains_like_jit(tiny_config, tmp_path_factory):
  """The finetune stage end to end on real FewRel sentences (conftest's tiny set-up with a dropout-
  free encoder, on helpers.stage_mesh()'s 2 devices): --parallelism=pmap logs the same losses as the
  jit path, step for step, and evaluates the same."""
  from tests.helpers import make_tiny_hf_dir, stage_mesh
  from tkre_jax import stages
  root = tmp_path_factory.mktemp("pmap_e2e")
  c = tiny_config
  c.model.hf_dir = str(make_tiny_hf_dir(root / "tiny_bert", hidden_dropout=0.0,
                                        attention_dropout=0.0))
  c.model.dropout = 0.0
  c.train.optim.learning_rate = config_lib.base_config().train.optim.learning_rate
  c.train.epochs = 1
  c.train.eval_batch_size = 8
  c.train.eval_every_epochs = 1
  c.train.log_every_steps = 1  # also waits for every step (see test_sharded_steps' docstring)
  c.train.length_multiple = 0  # one batch shape: one compile per step function
  mesh = stage_mesh()
  summaries, losses = {}, {}
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates
  try:
    for parallelism in ("jit", "pmap"):
      summaries[parallelism] = stages.run("finetune", c, root / parallelism, mesh=mesh,
                                          parallelism=parallelism)
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
  for parallelism in ("jit", "pmap"):
    workdir = root / parallelism
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses[parallelism] = np.array([r["loss"] for r in rows if "loss" in r])
  assert len(losses["jit"]) == 2  # 16 train rows / 8 per batch: the second loss is after an update
  np.testing.assert_allclose(losses["pmap"], losses["jit"], rtol=1e-5)
  assert losses["jit"][-1] != losses["jit"][0]
  for split in ("dev", "test"):
    assert summaries["pmap"]["metrics"][split] == pytest.approx(summaries["jit"]["metrics"][split])
