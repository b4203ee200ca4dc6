"""A real multi-process run: `python -m tkre_jax.main` as two JAX processes on localhost.

Two processes (`--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i`), 2 CPU
devices each, gloo CPU collectives, one `fsdp:4` mesh over both with the `fsdp` sharding rules (each
weight matrix split over the 4 devices: half of it lives in each process), run on a tiny FewRel (5
relations, K = 3: a 15-row train split in 3 TFRecord files, a 2-layer hidden-32 encoder, dropout on):

  1. mslm, 4 steps (one epoch of the streamed split: each host reads its own shard,
     `tfds.split_for_jax_process`), a resume checkpoint every 2 steps and the time policy on (the
     save decision is made on process 0 and broadcast), and a NaN injected at step 3: both processes
     stop there with exit status 2 and the step-2 checkpoint (Orbax, written by both processes) is
     the latest;
  2. the same command without the NaN: both processes restore step 2 and finish (Orbax
     multi-process restore; the streaming pipeline starts each host at step 2 of its shard);
  3. finetune `--init_from` the mslm workdir (its `best/`, read by both processes), 4 steps with a
     mid-way checkpoint, dev evaluation and model selection.

The reference is one process with 4 CPU devices running the same commands straight through. The
batch of a pre-training step is a function of (seed, step, process count), so the reference reads
the 2-host layout: its `pipeline.pretrain_batches` is the concatenation of the two hosts' local
batches (host 0's rows first, as `host_local_to_global` places them). The final mslm and finetune
parameters must agree within 1e-5 (max abs difference), the logged losses within 1e-5 relative, and
each host must have decoded exactly its own shard: 8 and 7 of the 15 rows.

Every child runs in its own session with a deadline (`TIMEOUT`): a hung collective fails the test
and the children are killed. The children get their own XLA_FLAGS (the tests' 8 fake devices do not
leak into them) and share a persistent compilation cache.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import make_tiny_fewrel, make_tiny_hf_dir
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.train import checkpoint as ckpt_lib

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO_ROOT = config_lib.REPO_ROOT
TIMEOUT = 300      # seconds for all processes of one command together
GRACE = 30         # seconds the others get once one process has failed
TOLERANCE = 1e-5   # max abs difference of the final parameters
# Environment variables that would make a child look like part of some other cluster.
_CLUSTER_VARS = ("XLA_FLAGS", "JAX_", "TPU_", "SLURM_", "OMPI_", "TKRE_DISTRIBUTED", "CUDA_VISIBLE")

# The reference run: one process reading the 2-host data layout (see the module docstring).
TWO_HOST_LAYOUT_MAIN = """
import numpy as np
from tkre_jax.data import pipeline
real = pipeline.pretrain_batches
def two_hosts(*args, process_index=None, process_count=None, **kwargs):
  hosts = [real(*args, process_index=h, process_count=2, **kwargs) for h in range(2)]
  for parts in zip(*hosts):
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
pipeline.pretrain_batches = two_hosts
from tkre_jax import main
main.run()
"""


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: pathlib.Path) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARS)}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             # compile time dominates these runs; both sides compile the same way
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return env


def launch(name: str, args: list[str], *, processes: int, logs: pathlib.Path,
           cache: pathlib.Path) -> list[tuple[int, str]]:
  """Runs `python -m tkre_jax.main ARGS` as `processes` processes (4 CPU devices in all) and
  returns each one's (exit status, output). Every process is killed by the deadline, and the
  others `GRACE` seconds after one fails."""
  port = _free_port()
  env = _env(4 // processes, cache)
  if processes > 1:
    env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"  # not every interface
    main = ["-m", "tkre_jax.main"]
  else:
    main = ["-c", TWO_HOST_LAYOUT_MAIN]
  procs, files = [], []
  try:
    for i in range(processes):
      dist = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
               f"--process_id={i}"] if processes > 1 else [])
      files.append(open(logs / f"{name}.{i}.log", "w"))
      procs.append(subprocess.Popen([sys.executable, *main, *args, *dist], env=env, cwd=REPO_ROOT,
                                    stdout=files[-1], stderr=subprocess.STDOUT,
                                    start_new_session=True))
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        deadline = min(deadline, time.monotonic() + GRACE)
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for f in files:
      f.close()
  return [(p.returncode, (logs / f"{name}.{i}.log").read_text()) for i, p in enumerate(procs)]


def check_ok(name: str, results: list[tuple[int, str]]) -> None:
  for i, (rc, out) in enumerate(results):
    assert rc == 0, f"{name}: process {i} exited with {rc}:\n{out[-4000:]}"


def _losses(workdir: pathlib.Path) -> list[float]:
  return [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")
          if '"loss"' in line]


def _max_abs_diff(a: dict, b: dict) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
  paths_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for (_, x), (_, y) in zip(paths_a, paths_b))


@pytest.fixture(scope="module")
def tiny(shared_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  c = config_lib.base_config()
  c.data.data_dir = str(make_tiny_fewrel(shared_data, root / "data", relations=5, per_relation=12,
                                         train=4, dev=4))
  c.data.k = 3
  c.data.max_seq_len = 64
  c.data.num_shards = 3  # 15 rows in files of 5: host 0's shard ends inside the second file
  c.model.hf_dir = str(make_tiny_hf_dir(root / "tiny_bert"))
  prepared = stages.run("prepare", c, root / "prepared")
  assert prepared["splits"]["train"] == 15
  common = [f"--config.data.data_dir={c.data.data_dir}", "--config.data.k=3",
            "--config.data.max_seq_len=64", f"--config.model.hf_dir={c.model.hf_dir}",
            f"--config.data.prepared_dir={root / 'prepared'}",
            # FSDP: every matrix split over the 4 devices, so half of each lives in each process
            "--mesh=fsdp:4", "--config.mesh.rules=fsdp"]
  mslm = ["--stage=mslm", "--config.mslm.split=train", "--config.mslm.steps=4",
          "--config.mslm.batch_size=4", "--config.mslm.head_warmup_steps=0",
          "--config.mslm.max_predictions=8", "--config.mslm.log_every_steps=1",
          "--config.mslm.length_multiple=0", "--config.mslm.checkpoint_every_steps=2"]
  finetune = ["--stage=finetune", "--config.train.epochs=1", "--config.train.batch_size=4",
              "--config.train.eval_batch_size=8", "--config.train.log_every_steps=1",
              "--config.train.length_multiple=0", "--config.train.checkpoint_every_steps=2",
              "--config.train.final_eval_splits=dev"]
  (root / "logs").mkdir()
  return root, common, mslm, finetune


@pytest.fixture(scope="module")
def runs(tiny):
  """The 2-process runs (mslm crashed at step 3 and resumed, then finetune) and the 1-process
  reference; returns the workdirs and the per-command outputs."""
  root, common, mslm, finetune = tiny
  logs, cache = root / "logs", root / "jax_cache"
  two, one = root / "two_processes", root / "one_process"
  out = {}
  t0 = time.monotonic()
  out["mslm_crash"] = launch("mslm_crash", [*common, *mslm, f"--workdir={two / 'mslm'}",
                                            "--config.debug.nan_at_step=3"],
                             processes=2, logs=logs, cache=cache)
  out["mslm_ckpt_steps"] = sorted(int(p.name) for p in (two / "mslm" / "checkpoints").iterdir()
                                  if p.name.isdigit())
  out["mslm"] = launch("mslm", [*common, *mslm, f"--workdir={two / 'mslm'}"], processes=2,
                       logs=logs, cache=cache)
  check_ok("mslm (resumed, 2 processes)", out["mslm"])
  out["finetune"] = launch("finetune", [*common, *finetune, f"--workdir={two / 'finetune'}",
                                        f"--init_from={two / 'mslm'}"],
                           processes=2, logs=logs, cache=cache)
  check_ok("finetune (2 processes)", out["finetune"])
  out["ref_mslm"] = launch("ref_mslm", [*common, *mslm, f"--workdir={one / 'mslm'}"],
                           processes=1, logs=logs, cache=cache)
  check_ok("mslm (1 process)", out["ref_mslm"])
  out["ref_finetune"] = launch("ref_finetune", [*common, *finetune, f"--workdir={one / 'finetune'}",
                                                f"--init_from={one / 'mslm'}"],
                               processes=1, logs=logs, cache=cache)
  check_ok("finetune (1 process)", out["ref_finetune"])
  print(f"multi-process runs: {time.monotonic() - t0:.0f} s")
  return two, one, out


def test_nan_stops_both_processes_at_the_step_with_a_checkpoint(runs):
  two, _, out = runs
  for i, (rc, text) in enumerate(out["mslm_crash"]):
    assert rc == 2, f"process {i} exited with {rc}:\n{text[-4000:]}"
    assert "non-finite loss" in text and "at step 3" in text, text[-4000:]
  assert out["mslm_ckpt_steps"] == [2]  # one kept: the step-2 save (both processes wrote it)
  for i, (_, text) in enumerate(out["mslm"]):
    assert "resuming after step 2" in text, text[-4000:]
    assert f"process {i} of 2, 2 local / 4 global devices" in text
  # each step logged once (by process 0): 1-2 before the stop, 3-4 after the resume
  steps = [json.loads(line)["step"] for line in open(two / "mslm" / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4]


def test_each_host_reads_only_its_shard(runs):
  two, one, _ = runs
  s2 = json.loads((two / "mslm" / "summary.json").read_text())
  s1 = json.loads((one / "mslm" / "summary.json").read_text())
  assert s2["resumed"] and s2["start_step"] == 2 and s2["num_sequences"] == 15
  # tfds.split_for_jax_process: rows [0, 8) for host 0, [8, 15) for host 1; 4 steps of 2 rows a
  # host are one epoch, and the resumed run decodes its (only) window whole.
  assert s2["rows_read_per_process"] == [8, 7]
  assert s1["rows_read_per_process"] == [15]  # both hosts' streams in the one process
  assert s2["mesh"] == s1["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}


def test_final_parameters_match_one_process(runs):
  two, one, _ = runs
  for stage in ("mslm", "finetune"):
    a, where_a = ckpt_lib.restore_param_tree(two / stage)
    b, where_b = ckpt_lib.restore_param_tree(one / stage)
    assert where_a.endswith("step 4") and where_b.endswith("step 4"), (where_a, where_b)
    diff = _max_abs_diff(a, b)
    print(f"{stage}: max abs difference of the final parameters, 2 processes vs 1: {diff:.3g}")
    assert diff <= TOLERANCE, f"{stage}: max abs difference {diff} (2 processes vs 1)"
    np.testing.assert_allclose(_losses(two / stage), _losses(one / stage), rtol=1e-5)
  ft2 = json.loads((two / "finetune" / "summary.json").read_text())
  ft1 = json.loads((one / "finetune" / "summary.json").read_text())
  assert ft2["encoder_from"].startswith("stage checkpoint") and str(two / "mslm") in ft2["encoder_from"]
  assert ft2["metrics"]["dev"] == pytest.approx(ft1["metrics"]["dev"])
