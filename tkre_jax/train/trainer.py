"""The one training loop of every training stage (mslm, scl, finetune).

A stage describes its training as a `TrainTask` (how to build the model, its loss, its batch
source, where its starting weights come from, what to do at some steps) and calls `train(task,
mesh, workdir)`, which:

  1. builds the model and the optimizer state directly in their sharded layout;
  2. starts from, in order: the workdir's own checkpoint (exact resume: parameters, optimizer
     state, step, hook state), or `task.init_weights` (the previous stage's `--init_from`
     checkpoint, or the HF checkpoint);
  3. runs the ahead-of-time compiled, guarded step (`tkre_jax.train.step`) on batches that are a
     pure function of (seed, step), with the dropout / masking key `fold_in(key(seed, salt), step)`,
     so a resumed run repeats exactly the steps an uninterrupted run would take;
  4. logs window means to `metrics.jsonl` and TensorBoard event files (`tkre_jax.train.tensorboard`;
     records after the resume point are dropped from both first, so each step appears once), with
     an ETA in the log line, runs the hooks (finetune's dev evaluation and model selection), and
     saves a resume checkpoint when Orbax's policy asks (every `checkpoint_every_seconds` of wall
     time, default 300, and/or every `checkpoint_every_steps`) and at the end;
  5. stops at the first step whose loss or gradient norm is not finite (`NonFiniteError` naming the
     step). That step's update is skipped inside the step and every save checks finiteness first,
     so no non-finite state is ever saved and the last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from tkre_jax.data import pipeline
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.progress import format_eta
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import optim, runtime, tensorboard
from tkre_jax.train.step import LossFn, make_train_step

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient norm; the message names the step."""


class Hook(Protocol):
  """Something a stage runs after some train steps (e.g. dev evaluation and model selection).

  `due(step)` says whether it runs after step `step` (1-based count of steps done); `run(step,
  params, ckpts)` returns fields for a `metrics.jsonl` record (or None); `state()` / `load_state()`
  carry what it must remember across a resume (saved in the checkpoint's JSON meta).

  A hook may also define `observe(step, batch, metrics) -> metrics`: called after every train
  step with the host batch (numpy) and the step's metrics (device arrays); it returns the metrics
  to log, without any per-row entries it consumed (e.g. FineCL's batch-based learning order).
  """

  def due(self, step: int) -> bool: ...

  def run(self, step: int, params: Any, ckpts: ckpt_lib.StageCheckpoints) -> Optional[dict]: ...

  def state(self) -> dict: ...

  def load_state(self, state: Mapping[str, Any]) -> None: ...


@dataclasses.dataclass
class TrainTask:
  """What a training stage hands to `train`.

  Attributes:
    stage: the stage name (log lines, records, checkpoint meta).
    section: a training section of the config (`config.training_section`): `optim` (read by
      `optim.adamw`), `log_every_steps`, `checkpoint_every_seconds`, `checkpoint_every_steps`.
    seed: the run's seed; `salt` (None: none) separates the random streams of stages sharing a
      seed: the step key is `fold_in(fold_in(key(seed), salt), step)`, or `fold_in(key(seed), step)`.
    total_steps: optimizer steps of the whole run.
    build: `() -> nnx.Module` with random initialisation (traced abstractly, then created sharded).
    loss_fn: `graphdef -> LossFn` (see `tkre_jax.train.step`).
    batches: `start_step -> iterator` of numpy batches (dict of arrays with a leading batch axis and
      `weight: float32[batch]`), the batch of step s a pure function of (seed, s).
    init_weights: `(model) -> (source, loaded names)`: loads the starting weights of a fresh run
      into `model.params` (in place).
    global_batches: True when every host holds the same global batch (`runtime.to_global`); False
      for host-local batches (`sharding.host_local_to_global`).
    on_fresh_start: `(model, loaded) -> dict`, run after `init_weights` on a fresh start (e.g. SCL
      anchors from relation descriptions); its dict is kept in the checkpoint meta (`extra`).
    hooks: `Hook`s run after steps.
    step_fields: `step -> dict` of extra fields for each logged record (e.g. the epoch).
    log_keys: metric names shown in the progress line besides the loss.
    pmap_loss_sum_fn: set for `--parallelism=pmap`: `graphdef -> (params, batch, rng) ->
      (loss_sum, weight, aux)` (see `tkre_jax.train.pmap`).
    nan_at_step: fault injection for tests: the batch weights of this step (1-based) are set to NaN.
    frozen: top-level parameter sub-trees that get no update (`optim.adamw`), e.g. the encoder
      during the MSLM head warm-up.
  """
  stage: str
  section: ml_collections.ConfigDict
  seed: int
  total_steps: int
  build: Callable[[], nnx.Module]
  loss_fn: Callable[[Any], LossFn]
  batches: Callable[[int], Iterator[dict]]
  init_weights: Callable[[runtime.ShardedModel], tuple[str, list]]
  salt: Optional[int] = None
  global_batches: bool = True
  on_fresh_start: Optional[Callable[[runtime.ShardedModel, list], dict]] = None
  hooks: Sequence[Hook] = ()
  step_fields: Optional[Callable[[int], dict]] = None
  log_keys: Sequence[str] = ()
  pmap_loss_sum_fn: Optional[Callable[[Any], Callable]] = None
  nan_at_step: int = -1
  frozen: Sequence[str] = ()


@dataclasses.dataclass
class TrainResult:
  """What `train` returns to the stage.

  Attributes:
    model: the model with the final parameters (sharded).
    ckpts: the workdir's checkpoint managers (open: the stage saves or restores `best/`; it closes
      them).
    start_step: the step the run started from (0 unless resumed).
    source: where the starting weights came from; loaded: the sub-trees loaded.
    extra: `on_fresh_start`'s dict (restored on resume).
    history: this stage's `metrics.jsonl` records (the resumed part included).
    step_seconds: mean seconds per step after the first (compilation) step and without later
      compilations; None when fewer than 2 steps ran.
    tokens_per_second: real (unpadded) tokens per second of training wall time.
    compile_seconds: total compilation time of the train step.
    train_seconds: wall time of the training loop.
  """
  model: runtime.ShardedModel
  ckpts: ckpt_lib.StageCheckpoints
  start_step: int
  source: str
  loaded: list
  extra: dict
  history: list
  step_seconds: Optional[float]
  tokens_per_second: Optional[float]
  compile_seconds: float
  train_seconds: float

  def report(self) -> dict:
    """The summary fields every training stage reports: `num_params`, the first and last logged
    train-step records, `step_seconds`, `tokens_per_second`, `compile_seconds`."""
    steps = [r for r in self.history if "loss" in r]
    return {"num_params": runtime.count_params(self.model.params),
            "first_logged": steps[0] if steps else {}, "last_logged": steps[-1] if steps else {},
            "step_seconds": self.step_seconds, "tokens_per_second": self.tokens_per_second,
            "compile_seconds": self.compile_seconds}


def _mean(values) -> float:
  vals = [float(v) for v in values]
  return float(np.mean(vals)) if vals else float("nan")


def _check_finite(stage: str, step: int, metrics: Mapping[str, Any], last_saved: Optional[int]):
  """Raises `NonFiniteError` when the step reported a skipped (non-finite) update."""
  m = jax.device_get(metrics)
  if float(m["finite"]) > 0:
    return
  where = (f"the latest checkpoint (step {last_saved}) is finite and a rerun resumes from it"
           if last_saved is not None else "no checkpoint was saved")
  raise NonFiniteError(f"{stage}: non-finite loss ({float(m['loss'])}) or gradient norm "
                       f"({float(m['grad_norm'])}) at step {step}; training stopped there, that "
                       f"step's update was not applied, and {where}")


@dataclasses.dataclass
class TrainState:
  """A task's model and optimizer, created in their sharded layout (`init_state`).

  Attributes:
    model: the model (random initialisation) with its parameter shardings.
    tx: the optax transformation (`optim.adamw` of the task's `section.optim`); schedule: its
      learning rate.
    opt_shardings: shardings of the optimizer state; opt_state: the initial optimizer state.
  """
  model: runtime.ShardedModel
  tx: Any
  schedule: Any
  opt_shardings: Any
  opt_state: Any


def init_state(task: TrainTask, mesh, rules: Any) -> TrainState:
  """The model and AdamW state of `task`, created directly in their sharded layout on `mesh`
  (what `train` starts from; the bench stage times steps on the same state)."""
  model = runtime.create_sharded(task.build, mesh, rules)
  tx, schedule = optim.adamw(task.section.optim, int(task.total_steps), frozen=task.frozen)
  opt_shardings = sharding_lib.state_shardings(jax.eval_shape(tx.init, model.params), mesh, rules)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(model.params)
  return TrainState(model, tx, schedule, opt_shardings, opt_state)


def compiled_train_step(task: TrainTask, state: TrainState, mesh) -> Any:
  """The guarded train step of `task` (`step.make_train_step` of its loss), compiled ahead of time
  per batch shape with the state's shardings and the state donated (`runtime.CompiledStep`); the
  pmap form when `task.pmap_loss_sum_fn` is set.

  Returns:
    `step(params, opt_state, batch, rng) -> (params, opt_state, metrics)`.
  """
  return _make_step(task, state.model, state.tx, state.opt_shardings, mesh)


def _make_step(task: TrainTask, model: runtime.ShardedModel, tx, opt_shardings, mesh):
  if task.pmap_loss_sum_fn is not None:
    from tkre_jax.train import pmap as pmap_lib  # pylint: disable=import-outside-toplevel
    return pmap_lib.PmapTrainStep(task.pmap_loss_sum_fn(model.graphdef), tx, mesh,
                                  (model.shardings, opt_shardings), f"{task.stage}_pmap_step")
  batch_sh = sharding_lib.batch_sharding(mesh)
  repl = sharding_lib.replicated(mesh)
  return runtime.CompiledStep(
      make_train_step(task.loss_fn(model.graphdef), tx), f"{task.stage}_step",
      in_shardings=(model.shardings, opt_shardings, batch_sh, repl),
      out_shardings=(model.shardings, opt_shardings, repl), donate_argnums=(0, 1))


def train(task: TrainTask, mesh, workdir: pathlib.Path, rules: Any) -> TrainResult:
  """Runs (or resumes) the training of `task` in `workdir`; see the module docstring.

  Args:
    task: the stage's `TrainTask`.
    mesh: the device mesh.
    workdir: the stage's workdir (`checkpoints/`, `best/`, `metrics.jsonl`).
    rules: logical-axis sharding rules (a `sharding.RULES` entry).

  Raises:
    NonFiniteError: a non-finite loss or gradient norm, naming the step.
  """
  workdir = pathlib.Path(workdir)
  sec = task.section
  total = int(task.total_steps)

  # ------------------------------------------------------------------ model, optimizer, start
  state = init_state(task, mesh, rules)
  model, tx, schedule = state.model, state.tx, state.schedule
  opt_shardings, opt_state = state.opt_shardings, state.opt_state
  ckpts = ckpt_lib.StageCheckpoints(workdir, every_seconds=sec.checkpoint_every_seconds,
                                    every_steps=sec.checkpoint_every_steps)
  start_step, extra, loaded = 0, {}, []
  if ckpts.latest_step() is not None:
    target = runtime.abstract_with_shardings({"params": model.params, "opt_state": opt_state},
                                             {"params": model.shardings, "opt_state": opt_shardings})
    restored, meta = ckpts.restore_latest(target)
    model.params, opt_state = restored["params"], restored["opt_state"]
    start_step, extra, loaded = int(meta["step"]), meta.get("extra") or {}, meta.get("loaded", [])
    for hook, state in zip(task.hooks, meta.get("hooks", [])):
      hook.load_state(state)
    source = f"resumed {workdir / 'checkpoints'} at step {start_step}"
    if meta.get("total_steps") not in (None, total):
      log.warning("%s: the checkpoint was written for %s steps, this run has %d (the learning-rate "
                  "schedule differs)", task.stage, meta.get("total_steps"), total)
  else:
    source, loaded = task.init_weights(model)
    if task.on_fresh_start is not None:
      extra = task.on_fresh_start(model, loaded) or {}
  writer = runtime.MetricsWriter(workdir)
  events = tensorboard.EventWriter(workdir)
  dropped = writer.truncate_after(start_step)
  events.truncate_after(start_step)

  def emit(record: dict) -> None:
    writer.write(record)
    events.write(record)
  log.info("%s: %d steps%s; %d parameters; weights from %s (%s)%s", task.stage, total,
           f", resuming after step {start_step}" if start_step else "",
           runtime.count_params(model.params), source, ", ".join(loaded) or "all",
           f"; dropped {dropped} metrics records written after that checkpoint" if dropped else "")

  def ckpt_meta(step: int) -> dict:
    return {"stage": task.stage, "step": step, "total_steps": total, "loaded": list(loaded),
            "extra": extra, "hooks": [h.state() for h in task.hooks]}

  # ------------------------------------------------------------------ loop
  train_step = _make_step(task, model, tx, opt_shardings, mesh)
  base_key = jax.random.key(task.seed)
  if task.salt is not None:
    base_key = jax.random.fold_in(base_key, task.salt)
  to_device = runtime.to_global if task.global_batches else sharding_lib.host_local_to_global
  batches = task.batches(start_step)
  last_saved = ckpts.latest_step()
  window: list = []
  pending: Optional[tuple[int, Any]] = None  # (step, metrics) not yet checked for finiteness
  tokens, t_steady, steady_from, compile_before = 0, None, None, 0.0
  t_train = t_window = time.time()

  def check_pending():
    if pending is not None:
      _check_finite(task.stage, pending[0], pending[1], last_saved)

  for step in range(start_step, total):
    done = step + 1
    batch = next(batches)
    if done == task.nan_at_step:
      batch = {**batch, "weight": batch["weight"] * np.float32(np.nan)}
    tokens += int(batch["attention_mask"][batch["weight"] != 0].sum())
    model.params, opt_state, m = train_step(model.params, opt_state, to_device(batch, mesh),
                                            jax.random.fold_in(base_key, step))
    for hook in task.hooks:
      observe = getattr(hook, "observe", None)
      if observe is not None:
        m = observe(done, batch, m)
    check_pending()  # the previous step's flag: one step of lag keeps the device busy
    pending = (done, m)
    window.append(m)
    if t_steady is None:  # the first step includes compilation
      jax.block_until_ready(m)
      t_steady, steady_from = time.time(), done
      compile_before = sum(train_step.compile_seconds.values())
    if done % sec.log_every_steps == 0 or done == total:
      check_pending()
      ms = jax.device_get(window)
      record = {k: _mean(x[k] for x in ms) for k in ms[0] if k != "finite"}
      seconds_per_step = (time.time() - t_window) / len(ms)
      record.update(stage=task.stage, step=done, learning_rate=float(schedule(step)),
                    steps_in_window=len(ms), seconds_per_step=round(seconds_per_step, 4),
                    steps_per_second=round(1.0 / max(seconds_per_step, 1e-9), 4),
                    **(task.step_fields(done) if task.step_fields else {}))
      emit(record)
      extras = ", ".join(f"{k} {record[k]:.4f}" for k in task.log_keys if k in record)
      log.info("%s step %d/%d: loss %.4f%s, %.2f s/step, ETA %s", task.stage, done, total,
               record["loss"], f" ({extras})" if extras else "", record["seconds_per_step"],
               format_eta((total - done) * seconds_per_step))
      window, t_window = [], time.time()
    for hook in task.hooks:
      if hook.due(done):
        check_pending()
        fields = hook.run(done, model.params, ckpts)
        if fields:
          emit({"stage": task.stage, "step": done,
                **(task.step_fields(done) if task.step_fields else {}), **fields})
    if done < total and ckpts.should_save(done):
      check_pending()
      ckpts.save_latest(done, {"params": model.params, "opt_state": opt_state}, ckpt_meta(done))
      last_saved = done
  check_pending()
  events.close()
  jax.block_until_ready(model.params)
  t_end = time.time()
  if start_step < total:
    ckpts.save_latest(total, {"params": model.params, "opt_state": opt_state}, ckpt_meta(total))

  compile_seconds = sum(train_step.compile_seconds.values())
  steady_steps = total - (steady_from or total)
  step_seconds = None
  if steady_steps > 0:
    step_seconds = round((t_end - t_steady - (compile_seconds - compile_before)) / steady_steps, 4)
  train_seconds = t_end - t_train
  return TrainResult(
      model=model, ckpts=ckpts, start_step=start_step, source=source, loaded=list(loaded),
      extra=extra, history=writer.records(task.stage), step_seconds=step_seconds,
      tokens_per_second=round(tokens / train_seconds, 1) if tokens and train_seconds > 0 else None,
      compile_seconds=round(compile_seconds, 1), train_seconds=round(train_seconds, 1))


def epoch_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int,
                  start_step: int = 0, length_multiple: int = 0,
                  keep_index: bool = False) -> Iterator[dict]:
  """Endless shuffled batches of an in-memory (K-shot) split, epoch after epoch, from any step.

  Epoch e is `pipeline.iterate_batches(arrays, shuffle=True, seed=seed * 1000 + e)` (a
  `numpy.random.default_rng` permutation, the last batch padded with weight-0 rows), so step s is
  batch `s % steps_per_epoch` of epoch `s // steps_per_epoch` and a resumed run sees exactly the
  batches an uninterrupted one would.

  Yields:
    numpy batches with the model keys and `weight: float32[batch_size]`; with `keep_index`, also
    `index: int32[batch_size]` (the row in `arrays`, -1 on padding rows).
  """
  n = len(arrays["label"])
  if n == 0:
    raise ValueError("the training split is empty")
  per_epoch = math.ceil(n / batch_size)
  epoch, skip = divmod(start_step, per_epoch)
  while True:
    for i, batch in enumerate(pipeline.iterate_batches(arrays, batch_size, shuffle=True,
                                                       seed=seed * 1000 + epoch,
                                                       length_multiple=length_multiple)):
      if i >= skip:
        if not keep_index:
          batch.pop("index")
        yield batch
    epoch, skip = epoch + 1, 0
