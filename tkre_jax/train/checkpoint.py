"""Orbax checkpoints of a training stage's workdir.

Two managers per workdir:
  <workdir>/checkpoints/   the latest train state (params, optimizer state) and its JSON meta
                           (step, hook state), for exact resume. Saved when Orbax's save-decision
                           policy says so: every `every_seconds` of wall time (decided on the primary
                           host and broadcast, so all hosts agree), every `every_steps` steps, and
                           at the end of training (forced). One checkpoint is kept.
  <workdir>/best/          the parameters the next stage or `eval` should take: the selected model
                           of finetune (best dev score), the final parameters of mslm / scl. Orbax
                           keeps the one with the highest score (`best_fn`, `max_to_keep=1`) and
                           deletes the old one only after the new one is complete, so `best/` always
                           holds a whole checkpoint.
Orbax writes each checkpoint into a temporary folder and renames it when complete, so a kill never
leaves a half-written checkpoint that a restart would read. Restoring takes an abstract target
(`jax.ShapeDtypeStruct`s with shardings), so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

_policies = ocp.checkpoint_managers


def has_resume_checkpoint(workdir: pathlib.Path) -> bool:
  """Whether `<workdir>/checkpoints/` holds a step checkpoint (a rerun resumes from it)."""
  d = pathlib.Path(workdir) / "checkpoints"
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def _score(metrics: dict) -> float:
  return metrics["score"]


class StageCheckpoints:
  """The `checkpoints/` (resume) and `best/` (selected model) managers of one workdir.

  Args:
    workdir: the stage's workdir.
    every_seconds: save the latest state when at least this many seconds (wall time) have passed
      since the last save; 0: never by time.
    every_steps: save the latest state every this many steps; 0: never by step count.
    read_only: open existing checkpoints only (eval, `--init_from`).
  """

  def __init__(self, workdir: pathlib.Path, *, every_seconds: float = 0, every_steps: int = 0,
               read_only: bool = False):
    self.workdir = pathlib.Path(workdir).resolve()
    if read_only:  # only what reading needs (Orbax warns about every saving option it drops)
      latest_opts = dict(read_only=True, create=False, save_interval_steps=0)
      best_opts = dict(latest_opts, best_fn=_score, best_mode="max")
      policies = []
    else:
      policies = []
      if every_seconds and every_seconds > 0:
        policies.append(_policies.ContinuousCheckpointingPolicy(minimum_interval_secs=every_seconds))
      if every_steps and every_steps > 0:
        policies.append(_policies.FixedIntervalPolicy(int(every_steps)))
      common = dict(create=True, max_to_keep=1, enable_async_checkpointing=False)
      latest_opts = dict(common, save_decision_policy=(_policies.AnySavePolicy(policies)
                                                       if policies else None))
      best_opts = dict(common, best_fn=_score, best_mode="max",
                       keep_checkpoints_without_metrics=False)
    self._timed = bool(policies)
    self.latest = ocp.CheckpointManager(
        self.workdir / "checkpoints", item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(**latest_opts))
    self.best = ocp.CheckpointManager(
        self.workdir / "best", item_names=("params", "meta"),
        options=ocp.CheckpointManagerOptions(**best_opts))

  # ------------------------------------------------------------- saving
  def should_save(self, step: int) -> bool:
    """Whether the cadence (time / steps) asks for a resume checkpoint at `step` (all hosts agree)."""
    return self._timed and step not in self.latest.all_steps() and self.latest.should_save(step)

  def save_latest(self, step: int, state: Any, meta: dict) -> None:
    """Saves the resume state at `step` (a no-op when that step is already saved)."""
    if step in self.latest.all_steps():
      return
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
    self.latest.wait_until_finished()

  def save_best(self, step: int, params: Any, meta: dict, score: float = 0.0) -> bool:
    """Saves `params` as the selected model when `score` beats the kept one's (Orbax then deletes
    the older checkpoint). Returns whether it saved; a step already saved is not written again."""
    if step in self.best.all_steps():
      return False
    kept = self.best.best_step()
    if kept is not None and score <= self.best_score():
      return False
    meta = {**meta, "score": float(score)}
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                meta=ocp.args.JsonSave(meta)),
                   metrics={"score": float(score)}, force=True)
    self.best.wait_until_finished()
    return True

  # ------------------------------------------------------------- restoring
  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def best_step(self) -> Optional[int]:
    return self.best.best_step()

  def best_score(self) -> float:
    """The score the kept `best/` checkpoint was saved with (-inf when there is none)."""
    if self.best.best_step() is None:
      return float("-inf")
    return float(self.best_meta().get("score", float("-inf")))

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict]:
    """`(state, meta)` of the latest resume checkpoint, restored onto `abstract_state`."""
    return _restore(self.latest, "state", abstract_state, self.workdir / "checkpoints",
                    self.latest.latest_step())

  def restore_best(self, abstract_params: Any) -> tuple[Any, dict]:
    """`(params, meta)` of the selected model, restored onto `abstract_params`."""
    return _restore(self.best, "params", abstract_params, self.workdir / "best",
                    self.best.best_step())

  def best_meta(self) -> dict:
    step = self.best.best_step()
    if step is None:
      raise FileNotFoundError(f"no selected-model checkpoint in {self.workdir / 'best'}")
    return dict(self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _restore(mgr: ocp.CheckpointManager, item: str, target: Any, where: pathlib.Path,
             step: Optional[int]) -> tuple[Any, dict]:
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {where}")
  out = mgr.restore(step, args=ocp.args.Composite(
      **{item: ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}))
  return out[item], dict(out["meta"])


def unwrap_variable_values(tree):
  """An `nnx.State` saved by Orbax comes back with every Variable as `{"value": array}`; this turns
  such leaves back into plain arrays (a pure dict, as `nnx.to_pure_dict` gives)."""
  if isinstance(tree, dict):
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
      return tree["value"]
    return {k: unwrap_variable_values(v) for k, v in tree.items()}
  return tree


def restore_param_tree(workdir: pathlib.Path) -> tuple[dict, str]:
  """The whole parameter tree saved in a stage workdir (`best/`, else the latest `checkpoints/`),
  without a restore target: what `--init_from` reads from the previous stage.

  Returns:
    `(tree, where)`: nested dict of numpy arrays (e.g. `{"encoder": ..., "mlm_head": ...}`) and a
    description of the checkpoint read.

  Raises:
    FileNotFoundError: no Orbax checkpoint under `best/` or `checkpoints/`.
  """
  workdir = pathlib.Path(workdir).resolve()
  for sub, item in (("best", "params"), ("checkpoints", "state")):
    d = workdir / sub
    if not d.is_dir():
      continue
    mgr = ocp.CheckpointManager(d, item_names=(item, "meta"),
                                item_handlers={item: ocp.StandardCheckpointHandler(),
                                               "meta": ocp.JsonCheckpointHandler()},
                                options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                     save_interval_steps=0))
    step = mgr.latest_step()
    if step is None:
      mgr.close()
      continue
    # Restore into host numpy arrays (a target of np.ndarray leaves), not onto the shardings the
    # checkpoint was saved with: those name the devices of the run that wrote it, so another
    # topology (a pod slice's checkpoint read on one host, 2 processes' read by 1) would be refused,
    # and with several processes an array sharded over them could not be read back on one host.
    saved = mgr.item_metadata(step)[item]
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), getattr(saved, "tree", saved))
    restored = mgr.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(target)}))[item]
    mgr.close()
    tree = restored["params"] if item == "state" else restored
    return unwrap_variable_values(jax.tree.map(np.asarray, dict(tree))), f"{d} step {step}"
  raise FileNotFoundError(f"--init_from={workdir}: no Orbax checkpoint under best/ or checkpoints/")
