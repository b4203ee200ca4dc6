"""The shared trainer, end to end on a tiny encoder: a stage SIGKILLed after a mid-stage checkpoint and
rerun with the same command ends with the parameters of an uninterrupted run and each step once in
metrics.jsonl (mslm, scl, finetune); an exception mid-run resumes the same way and a finished
workdir's rerun trains nothing (mslm; the finetune case is test_end_to_end's); a NaN stops the run at its step with the latest checkpoint
finite; restores onto another encoder shape or label map fail naming both sides; known errors are
one line with exit status 2.

The uninterrupted runs (mslm, scl from it, finetune from that) run once, in this process, and serve
every test here; only the runs to be killed are separate processes (they load the steps the
uninterrupted runs compiled from the session's compilation cache, conftest.py), and the reruns run
`tkre_jax.main` with the same flags in this process. Every run is on a mesh of 2 CPU devices
(helpers.STAGE_DEVICES), the first 2 of the process's 8."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from tests.helpers import (STAGE_DEVICES, main_command, make_tiny_fewrel, make_tiny_hf_dir,
                           stage_mesh, subprocess_env)
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import runtime, trainer
from tkre_jax.train import workdir as workdir_lib

REPO_ROOT = config_lib.REPO_ROOT


# Each test compares runs made with the same compiler settings (killed ones included, see
# helpers.subprocess_env): XLA's optimisations off make the compiles several times faster.
pytestmark = pytest.mark.usefixtures("fewer_compiler_optimizations")


@pytest.fixture(scope="module")
def tiny(tiny_fewrel, tiny_hf_dir, tiny_prepared, tmp_path_factory):
  """The prepared tiny FewRel (conftest: 4 relations, K = 4: 16 train rows) and the overrides of
  every run."""
  root = tmp_path_factory.mktemp("trainer")
  overrides = {
      "data.data_dir": str(tiny_fewrel), "data.k": 4, "data.max_seq_len": 64,
      "model.hf_dir": str(tiny_hf_dir), "data.prepared_dir": str(tiny_prepared),
      # pre-training on the train split (no LLM files here): 2 batches of 8 per epoch
      "mslm.split": "train", "mslm.steps": 12, "mslm.batch_size": 8, "mslm.log_every_steps": 1,
      "mslm.optim.learning_rate": 2e-3, "mslm.max_predictions": 8,
      "mslm.checkpoint_every_seconds": 0, "mslm.checkpoint_every_steps": 5,
      "scl.split": "train", "scl.steps": 12, "scl.batch_size": 8, "scl.log_every_steps": 1,
      "scl.optim.learning_rate": 2e-3, "scl.checkpoint_every_seconds": 0, "scl.checkpoint_every_steps": 5,
      # finetune: 2 steps per epoch, 6 epochs; the checkpoint at step 5 is mid-epoch
      "train.epochs": 6, "train.batch_size": 8, "train.eval_batch_size": 16,
      "train.optim.learning_rate": 1e-2, "train.eval_every_epochs": 2, "train.log_every_steps": 1,
      "train.checkpoint_every_seconds": 0, "train.checkpoint_every_steps": 5,
  }
  return root, overrides


class Straight:
  """The uninterrupted runs of a chain of stages (each from the one before), made on first use in
  this process with the configuration and mesh `python -m tkre_jax.main` builds from the same
  overrides on a machine with `STAGE_DEVICES` devices."""

  def __init__(self, root: pathlib.Path, overrides: dict, chain: dict[str, str]):
    self.root, self.overrides, self.chain = root, overrides, chain

  def init_from(self, stage: str) -> str:
    return str(self.workdir(self.chain[stage])) if self.chain.get(stage) else ""

  def workdir(self, stage: str) -> pathlib.Path:
    path = self.root / f"straight_{stage}"
    if not (path / "summary.json").exists():
      stages.run(stage, config_with(self.overrides), path, mesh=stage_mesh(),
                 init_from=self.init_from(stage))
    return path


@pytest.fixture(scope="module")
def straight(tiny) -> Straight:
  root, overrides = tiny
  return Straight(root, overrides, {"mslm": "", "scl": "mslm", "finetune": "scl"})


def config_with(overrides: dict):
  c = config_lib.base_config()
  for key, value in overrides.items():
    c.update_from_flattened_dict({key: value})
  return c


def flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def main_args(stage: str, workdir: pathlib.Path, overrides: dict, init_from: str = "") -> list[str]:
  """The flags of `python -m tkre_jax.main` for a run of `stage`."""
  return [f"--stage={stage}", f"--workdir={workdir}", "--mesh=cpu",
          *([f"--init_from={init_from}"] if init_from else []), *flags(overrides)]


def command(stage: str, workdir: pathlib.Path, overrides: dict, init_from: str = "",
            slow: bool = False) -> list[str]:
  """The `python -m tkre_jax.main` command of a run on `STAGE_DEVICES` devices; `slow`: with every
  train step slowed by 0.4 s (so the test can kill it between two checkpoints)."""
  return main_command(main_args(stage, workdir, overrides, init_from), devices=STAGE_DEVICES,
                      step_sleep=0.4 if slow else 0.0)


def kill_after_checkpoint(cmd: list[str], workdir: pathlib.Path, step: int) -> int:
  """Starts `cmd`, SIGKILLs it as soon as `checkpoints/<step>` is complete; returns the exit code."""
  proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO_ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  ckpt = workdir / "checkpoints" / str(step)
  deadline = time.time() + 240
  while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  if proc.poll() is not None:
    pytest.fail(f"the run ended before its step-{step} checkpoint: {proc.stderr.read()[-3000:]}")
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  return proc.returncode


def assert_same_params(a: pathlib.Path, b: pathlib.Path, atol: float = 1e-6) -> None:
  ta, _ = ckpt_lib.restore_param_tree(a)
  tb, _ = ckpt_lib.restore_param_tree(b)
  la, lb = jax.tree_util.tree_leaves_with_path(ta), jax.tree_util.tree_leaves_with_path(tb)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def train_steps(workdir: pathlib.Path, stage: str) -> list[int]:
  rows = runtime.MetricsWriter(workdir).records(stage)
  return [r["step"] for r in rows if "loss" in r]


@pytest.mark.subprocess
@pytest.mark.parametrize("stage", ["mslm", "scl", "finetune"])
def test_sigkill_after_a_checkpoint_then_rerun_equals_an_uninterrupted_run(tiny, straight, stage,
                                                                          main_cli):
  root, overrides = tiny
  init_from = straight.init_from(stage)  # scl from the uninterrupted mslm, finetune from scl
  reference = straight.workdir(stage)
  killed = root / f"killed_{stage}"
  code = kill_after_checkpoint(command(stage, killed, overrides, init_from, slow=True), killed, 5)
  assert code == -signal.SIGKILL
  assert not (killed / "summary.json").exists()
  assert 5 <= max(train_steps(killed, stage)) < 12  # killed mid-stage, after step 5
  ckpts = ckpt_lib.StageCheckpoints(killed, read_only=True)
  latest = ckpts.latest_step()
  ckpts.close()
  code, _, err = main_cli(*main_args(stage, killed, overrides, init_from),  # the same command again
                          devices=STAGE_DEVICES)
  assert code == 0, err[-3000:]
  summary = json.load(open(killed / "summary.json"))
  want = json.load(open(reference / "summary.json"))
  assert summary["resumed"] and summary["start_step"] == latest >= 5 and not want["resumed"]
  assert_same_params(reference, killed)
  assert train_steps(killed, stage) == list(range(1, 13))  # each step once
  if stage == "finetune":
    assert summary["selected_step"] == want["selected_step"]
    for split in ("dev", "test"):
      assert summary["metrics"][split] == pytest.approx(want["metrics"][split], abs=1e-9)
  else:
    assert summary["last_logged"]["loss"] == pytest.approx(want["last_logged"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_a_crash_resumes_from_its_last_checkpoint_and_a_finished_run_trains_nothing(
    tiny, straight, monkeypatch):
  """mslm, in this process: an exception while drawing the 6th batch (after the step-5 checkpoint),
  then the same run again resumes after step 5 and ends with the uninterrupted run's parameters; a
  third run of the finished workdir trains nothing and keeps them. (Before the tests were tiered,
  test_pretrain.py's test_resume_continues_exactly, on the real FewRel corpus.)"""
  from tkre_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  root, overrides = tiny
  c = config_with(overrides)
  workdir = root / "crashed_mslm"
  real = pipeline.pretrain_batches

  def crashing(*args, **kwargs):
    for i, b in enumerate(real(*args, **kwargs)):
      if i == 5:
        raise KeyboardInterrupt("simulated crash")
      yield b

  monkeypatch.setattr(pipeline, "pretrain_batches", crashing)
  with pytest.raises(KeyboardInterrupt):
    stages.run("mslm", c, workdir, mesh=stage_mesh())
  assert not (workdir / "summary.json").exists()
  monkeypatch.setattr(pipeline, "pretrain_batches", real)
  resumed = stages.run("mslm", c, workdir, mesh=stage_mesh())
  want = json.load(open(straight.workdir("mslm") / "summary.json"))
  assert resumed["resumed"] and resumed["start_step"] == 5 and not want["resumed"]
  assert_same_params(straight.workdir("mslm"), workdir)
  assert resumed["last_logged"]["loss"] == pytest.approx(want["last_logged"]["loss"], rel=1e-4)
  assert train_steps(workdir, "mslm") == list(range(1, 13))
  # A finished workdir: running again trains nothing and keeps the parameters.
  before, _ = ckpt_lib.restore_param_tree(workdir)
  again = stages.run("mslm", c, workdir, mesh=stage_mesh())
  assert again["start_step"] == 12 and again["steps"] == 12
  after, _ = ckpt_lib.restore_param_tree(workdir)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_nan_stops_at_its_step_and_the_latest_checkpoint_is_finite(tiny, main_cli):
  root, overrides = tiny
  c = config_with({**overrides, "mslm.checkpoint_every_steps": 2})
  c.debug.nan_at_step = 7
  workdir = root / "nan_mslm"
  with pytest.raises(trainer.NonFiniteError, match=r"non-finite loss \(nan\).* at step 7"):
    stages.run("mslm", c, workdir, mesh=stage_mesh())
  assert train_steps(workdir, "mslm") == list(range(1, 7))
  ckpts = ckpt_lib.StageCheckpoints(workdir, read_only=True)
  assert ckpts.latest_step() == 6 and ckpts.best_step() is None
  ckpts.close()
  tree, _ = ckpt_lib.restore_param_tree(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(tree))
  # From the command line: one line naming the step, exit status 2, no traceback.
  code, _, err = main_cli(*main_args("finetune", root / "nan_ft", overrides),
                          "--config.debug.nan_at_step=3", devices=STAGE_DEVICES)
  assert code == 2, err[-3000:]
  assert "Traceback" not in err
  assert "error: finetune: non-finite loss (nan) or gradient norm (nan) at step 3" in err


@pytest.mark.slow
def test_restore_onto_another_encoder_or_label_map_names_both_sides(tiny, straight, shared_data):
  """From the uninterrupted mslm run (hidden 32) onto a wider encoder; an eval of the uninterrupted
  finetune run on prepared data with another label map."""
  root, overrides = tiny
  mesh = stage_mesh()
  # finetune from it onto a wider encoder
  wide = make_tiny_hf_dir(root / "tiny_bert_h48", hidden_size=48, num_heads=4)
  c = config_with({**overrides, "model.hf_dir": str(wide)})
  with pytest.raises(workdir_lib.MismatchError, match=r"hidden_size 48 vs 32"):
    stages.run("finetune", c, root / "ft_wide", mesh=mesh, init_from=str(straight.workdir("mslm")))
  assert not (root / "ft_wide").exists()  # refused before anything was written
  # eval of a finetune model on prepared data with another label map
  other = make_tiny_fewrel(shared_data, root / "data3", relations=3, per_relation=12,
                           train=4, dev=4)
  c3 = config_with({**overrides, "data.data_dir": str(other), "data.prepared_dir": ""})
  stages.run("prepare", c3, root / "prepared3")
  c3.data.prepared_dir = str(root / "prepared3")
  with pytest.raises(workdir_lib.MismatchError, match=r"label map of the model in .* differs"):
    stages.run("eval", c3, root / "eval3", mesh=mesh, init_from=str(straight.workdir("finetune")))


def test_known_errors_are_one_line_with_exit_status_2(tmp_path, main_cli):
  code, _, err = main_cli("--stage=finetune", f"--workdir={tmp_path / 'ft'}",
                          f"--config.data.prepared_dir={tmp_path / 'missing'}")
  assert code == 2
  assert "Traceback" not in err
  assert f"error: {tmp_path / 'missing' / 'meta.json'} not found" in err
  assert not (tmp_path / "ft").exists()


def test_metrics_truncate_after_keeps_each_step_once(tmp_path):
  writer = runtime.MetricsWriter(tmp_path)
  for step in range(1, 8):
    writer.write({"stage": "mslm", "step": step, "loss": 1.0 / step})
  assert writer.truncate_after(4) == 3
  for step in range(5, 9):
    writer.write({"stage": "mslm", "step": step, "loss": 1.0 / step})
  assert [r["step"] for r in writer.records()] == list(range(1, 9))


def test_best_keeps_the_highest_score_only(tmp_path):
  params = {"w": np.arange(3, dtype=np.float32)}
  ckpts = ckpt_lib.StageCheckpoints(tmp_path)
  assert ckpts.save_best(2, params, {"epoch": 1}, score=0.5)
  assert ckpts.save_best(4, {"w": params["w"] + 1}, {"epoch": 2}, score=0.7)
  assert not ckpts.save_best(6, {"w": params["w"] + 2}, {"epoch": 3}, score=0.6)
  assert not ckpts.save_best(4, params, {"epoch": 2}, score=0.9)  # step already saved
  assert ckpts.best.all_steps() == [4] and ckpts.best_score() == pytest.approx(0.7)
  got, meta = ckpts.restore_best({"w": jax.ShapeDtypeStruct((3,), np.float32)})
  np.testing.assert_array_equal(np.asarray(got["w"]), params["w"] + 1)
  assert meta == {"epoch": 2, "score": pytest.approx(0.7)}
  ckpts.close()
