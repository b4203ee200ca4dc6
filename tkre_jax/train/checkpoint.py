"""Orbax checkpoints of a stage's workdir.

Two managers per workdir:
  <workdir>/checkpoints/   the latest train state (params, optimizer state, step) for resuming;
  <workdir>/best/          the parameters with the best dev score (model selection), which `eval`
                           and the next stage's `--init_from` restore.
Restoring takes an abstract target (`jax.ShapeDtypeStruct`s with shardings), so a checkpoint saved
on one mesh restores onto another.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class StageCheckpoints:
  """The `checkpoints/` (resume) and `best/` (selected model) managers of one workdir."""

  def __init__(self, workdir: pathlib.Path, *, read_only: bool = False):
    self.workdir = pathlib.Path(workdir).resolve()
    opts = dict(create=not read_only, read_only=read_only, enable_async_checkpointing=False)
    self.latest = ocp.CheckpointManager(
        self.workdir / "checkpoints", item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts))
    self.best = ocp.CheckpointManager(
        self.workdir / "best", item_names=("params", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts))

  # ------------------------------------------------------------- saving
  def save_latest(self, step: int, state: Any, meta: dict) -> None:
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
    self.latest.wait_until_finished()

  def save_best(self, step: int, params: Any, meta: dict) -> None:
    """Replaces the kept best checkpoint with `params` (the caller decides what is best)."""
    for old in self.best.all_steps():
      if old != step:
        self.best.delete(old)
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                meta=ocp.args.JsonSave(meta)), force=True)
    self.best.wait_until_finished()

  # ------------------------------------------------------------- restoring
  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def best_step(self) -> Optional[int]:
    return self.best.latest_step()

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict]:
    step = self.latest.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.workdir / 'checkpoints'}")
    out = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_best(self, abstract_params: Any) -> tuple[Any, dict]:
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(f"no selected-model checkpoint in {self.workdir / 'best'}")
    out = self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
    return out["params"], dict(out["meta"])

  def best_meta(self) -> dict:
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(f"no selected-model checkpoint in {self.workdir / 'best'}")
    return dict(self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def restore_param_tree(workdir: pathlib.Path) -> tuple[dict, str]:
  """The whole parameter tree saved in a stage workdir (`best/`, else the latest `checkpoints/`),
  without a restore target: what `--init_from` reads from the previous stage.

  Returns:
    `(tree, where)`: nested dict of numpy arrays (e.g. `{"encoder": ..., "mlm_head": ...}`) and a
    description of the checkpoint read.

  Raises:
    FileNotFoundError: no Orbax checkpoint under `best/` or `checkpoints/`.
  """
  from tkre_jax.train.runtime import unwrap_variable_values
  workdir = pathlib.Path(workdir).resolve()
  for sub, item in (("best", "params"), ("checkpoints", "state")):
    d = workdir / sub
    if not d.is_dir():
      continue
    mgr = ocp.CheckpointManager(d, item_names=(item, "meta"),
                                options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    step = mgr.latest_step()
    if step is None:
      mgr.close()
      continue
    restored = mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))[item]
    mgr.close()
    tree = restored["params"] if item == "state" else restored
    return unwrap_variable_values(jax.tree.map(np.asarray, dict(tree))), f"{d} step {step}"
  raise FileNotFoundError(f"--init_from={workdir}: no Orbax checkpoint under best/ or checkpoints/")
