"""A tiny end-to-end run on real FewRel sentences: prepare -> finetune -> eval (in a new process),
on the 8-device CPU mesh, with a 2-layer hidden-32 encoder."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import make_tiny_fewrel, make_tiny_hf_dir
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.parallel.mesh import make_mesh


@pytest.fixture(scope="module")
def tiny_run(shared_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  data_dir = make_tiny_fewrel(shared_data, root / "data", relations=4, per_relation=12, train=4, dev=4)
  hf_dir = make_tiny_hf_dir(root / "tiny_bert")
  c = config_lib.base_config()
  c.data.data_dir = str(data_dir)
  c.data.k = 4
  c.data.max_seq_len = 64
  c.model.hf_dir = str(hf_dir)
  c.train.epochs = 16
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.train.optim.learning_rate = 1e-2
  c.train.eval_every_epochs = 4
  c.train.log_every_steps = 1
  prep = stages.run("prepare", c, root / "prepared")
  c.data.prepared_dir = str(root / "prepared")
  mesh = make_mesh("cpu")
  ft = stages.run("finetune", c, root / "finetune", mesh=mesh)
  return root, c, prep, ft


def test_prepare_counts(tiny_run):
  _, _, prep, _ = tiny_run
  assert prep["splits"] == {"train": 16, "dev": 16, "test": 16}
  assert prep["num_relations"] == 4


def test_finetune_learns_and_selects(tiny_run):
  root, _, _, ft = tiny_run
  assert ft["steps"] == 32 and ft["num_train"] == 16
  assert ft["metrics"]["test"]["num_examples"] == 16 and ft["metrics"]["dev"]["num_examples"] == 16
  rows = [json.loads(l) for l in open(root / "finetune" / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 32
  assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
  dev_scores = [r["dev_micro_f1"] for r in rows if "dev_micro_f1" in r]
  assert len(dev_scores) == 4
  assert ft["selected_epoch"] == 4 * (1 + dev_scores.index(max(dev_scores)))
  assert (root / "finetune" / "best").is_dir() and (root / "finetune" / "checkpoints").is_dir()


def test_eval_in_new_process_reproduces(tiny_run):
  root, c, _, ft = tiny_run
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  # No --config flags: the finetune workdir describes its model, data and settings (run.json).
  cmd = [sys.executable, "-m", "tkre_jax.main", "--stage=eval", f"--workdir={root / 'eval'}",
         f"--init_from={root / 'finetune'}"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                        cwd=str(config_lib.REPO_ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  ev = json.load(open(root / "eval" / "summary.json"))
  assert ev["stage"] == "eval" and ev["selected_epoch"] == ft["selected_epoch"]
  for split in ("dev", "test"):
    for k in ("accuracy", "micro_f1", "macro_f1", "num_examples"):
      assert ev["metrics"][split][k] == pytest.approx(ft["metrics"][split][k], abs=1e-9), (split, k)


def test_finetune_resumes_instead_of_restarting(tiny_run):
  root, c, _, ft = tiny_run
  # The workdir holds a finished run: running again resumes at the last epoch, trains nothing more
  # and reports the same selected model.
  again = stages.run("finetune", c, root / "finetune", mesh=make_mesh("cpu"))
  assert again["steps"] == ft["steps"]
  assert again["metrics"]["test"] == ft["metrics"]["test"]
  assert "resumed" in again["encoder_from"]
