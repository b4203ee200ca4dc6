"""A tiny end-to-end run on real FewRel sentences: prepare -> finetune -> eval (in a new process),
on a 2-device CPU mesh (helpers.STAGE_DEVICES), with a 2-layer hidden-32 encoder (conftest's shared
`tiny_prepared` and `tiny_finetune`: 16 epochs, dev every 4)."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import STAGE_DEVICES, main_command, stage_mesh, subprocess_env
from tkre_jax import config as config_lib
from tkre_jax import stages

# Every run here compiles as the shared finetune run did (XLA's optimisations off); the new process
# too (helpers.subprocess_env).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fewer_compiler_optimizations")]


def test_prepare_counts(tiny_prepared):
  prep = json.load(open(tiny_prepared / "summary.json"))
  assert prep["splits"] == {"train": 16, "dev": 16, "test": 16}
  assert prep["num_relations"] == 4


def test_finetune_learns_and_selects(tiny_finetune):
  workdir, _, ft, _ = tiny_finetune
  assert ft["steps"] == 32 and ft["num_train"] == 16
  assert ft["metrics"]["test"]["num_examples"] == 16 and ft["metrics"]["dev"]["num_examples"] == 16
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 32
  assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
  dev_scores = [r["dev_micro_f1"] for r in rows if "dev_micro_f1" in r]
  assert len(dev_scores) == 4
  assert ft["selected_epoch"] == 4 * (1 + dev_scores.index(max(dev_scores)))
  assert (workdir / "best").is_dir() and (workdir / "checkpoints").is_dir()


@pytest.mark.subprocess
def test_eval_in_new_process_reproduces(tiny_finetune, tmp_path):
  workdir, _, ft, _ = tiny_finetune
  # No --config flags: the finetune workdir describes its model, data and settings (run.json).
  cmd = main_command(["--stage=eval", f"--workdir={tmp_path / 'eval'}", f"--init_from={workdir}"],
                     devices=STAGE_DEVICES)
  proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300,
                        cwd=str(config_lib.REPO_ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  ev = json.load(open(tmp_path / "eval" / "summary.json"))
  assert ev["stage"] == "eval" and ev["selected_epoch"] == ft["selected_epoch"]
  # a CPU run tunes the allocator (--host_malloc=auto) and still scores the same as the finetune
  # process, which ran in the test process with glibc's defaults
  assert ev["process"]["host_malloc"]["applied"] is (sys.platform == "linux"), ev["process"]
  for split in ("dev", "test"):
    for k in ("accuracy", "micro_f1", "macro_f1", "num_examples"):
      assert ev["metrics"][split][k] == pytest.approx(ft["metrics"][split][k], abs=1e-9), (split, k)


def test_finetune_resumes_instead_of_restarting(tiny_finetune, tmp_path):
  workdir, c, ft, _ = tiny_finetune
  # The workdir holds a finished run (a copy of it here): running again resumes at the last epoch,
  # trains nothing more and reports the same selected model.
  again_dir = shutil.copytree(workdir, tmp_path / "finetune")
  again = stages.run("finetune", c.copy_and_resolve_references(), again_dir, mesh=stage_mesh())
  assert again["steps"] == ft["steps"]
  assert again["metrics"]["test"] == ft["metrics"]["test"]
  assert "resumed" in again["encoder_from"]
