"""The learning_order stage: FineCL's learning-order weights of the training rows.

FineCL (arXiv 2205.12491, Sec. 3.1): train the relation classifier on the silver data, record for
each instance the first epoch in which it is predicted right, and weight it by exp(f(k))
(`tkre_jax.data.row_weights`, `config.learning_order.schedule`). Here the data is a prepared
`train` split (K-shot gold rows and, with `config.data.augment_k`, SCDG rows; prepare it with
`augment_k` as large as the SCDG file so every SCDG instance gets a weight), the classifier and
optimizer are fine-tuning's (`config.train`: model, AdamW, batch size, learning rate) and the run
lasts `config.learning_order.epochs` epochs (FineCL: 15). What "predicted right in epoch k" means
is `config.learning_order.signal`:

* `batch` (default, FineCL's code: `src/stage_1/main.py`, `epoch_based_learning_order: False`):
  the argmax of the training step's own forward pass (dropout on, before that step's update) on
  the row's batch of epoch k (`BatchScoring`);
* `full_pass`: after every epoch all rows are scored in one pass without dropout (`EpochScoring`;
  FineCL's `eval_train`, its option), so the result does not depend on the batch order.

No model selection: no dev or test split is read.

Writes `<workdir>/learning_order.json` (one record per row: key, kind, relation, first epoch, f,
weight, text), `learning_order.md` (the per-kind and per-relation distributions and the latest-
learned SCDG rows) and `summary.json`. Exact resume: the first epochs so far live in the trainer's
checkpoints (hook state), so a killed run continues where it stopped.

Users: `config.train.learning_order_from` (weights or dropping in fine-tuning) and
`config.scl.learning_order_from` (the weighted contrastive term).
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tkre_jax.data import dataset
from tkre_jax.data import features as features_lib
from tkre_jax.data import row_weights as order_lib
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.stages import finetune as finetune_stage
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.tasks import losses
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import loading, runtime, trainer
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)
REPORT_FILE = "learning_order.md"


class EpochScoring:
  """Trainer hook: after each epoch, predicts every row of the split and records the first epoch
  each row is right (`learning_order.update_first_epochs`). Its state (the first epochs) goes into
  the resume checkpoints."""

  def __init__(self, predict_step, arrays: Mapping[str, np.ndarray], batch_size: int, mesh,
               length_multiple: int, steps_per_epoch: int):
    self.predict_step, self.arrays, self.mesh = predict_step, arrays, mesh
    self.batch_size, self.length_multiple = batch_size, length_multiple
    self.steps_per_epoch = steps_per_epoch
    self.first = np.zeros(len(arrays["label"]), np.int64)
    self.accuracy: list[float] = []  # training-set accuracy after each epoch

  def due(self, step: int) -> bool:
    return step % self.steps_per_epoch == 0

  def run(self, step: int, params: Any, ckpts: ckpt_lib.StageCheckpoints) -> dict:
    del ckpts
    epoch = step // self.steps_per_epoch
    logits = classifier_lib.predict(self.predict_step, params, self.arrays, self.batch_size,
                                    self.mesh, self.length_multiple, desc=f"score epoch {epoch}")
    correct = logits.argmax(-1) == self.arrays["label"]
    self.first = order_lib.update_first_epochs(self.first, correct, epoch)
    self.accuracy.append(float(correct.mean()))
    learned = int((self.first != order_lib.NEVER).sum())
    log.info("learning_order epoch %d: %.4f of the rows right, %d of %d learned so far", epoch,
             correct.mean(), learned, len(self.first))
    return {"train_accuracy": float(correct.mean()), "learned_rows": learned}

  def state(self) -> dict:
    return {"first": self.first.tolist(), "accuracy": list(self.accuracy)}

  def load_state(self, state: Mapping[str, Any]) -> None:
    self.first = np.asarray(state["first"], np.int64)
    self.accuracy = list(state["accuracy"])


class BatchScoring:
  """Trainer hook of FineCL's batch-based learning order: after each train step, the rows of its
  batch that the step's forward pass predicted right (`row_correct`, from `batch_signal_loss`)
  are recorded in the step's epoch (`update_first_epochs`). Its state (first epochs, per-epoch
  counts) goes into the resume checkpoints, and the batches of a resumed run are the same, so
  resume is exact."""

  def __init__(self, num_rows: int, steps_per_epoch: int):
    self.steps_per_epoch = steps_per_epoch
    self.first = np.zeros(num_rows, np.int64)
    self._right = self._seen = 0
    self.accuracy: list[float] = []  # share of the epoch's training-batch rows predicted right

  def observe(self, step: int, batch: Mapping[str, np.ndarray], metrics: dict) -> dict:
    metrics = dict(metrics)
    right = np.asarray(jax.device_get(metrics.pop(ROW_CORRECT_KEY))) > 0.5
    index = np.asarray(batch["index"])
    real = (index >= 0) & (np.asarray(batch["weight"]) != 0)
    correct = np.zeros(len(self.first), bool)
    correct[index[real & right]] = True
    epoch = math.ceil(step / self.steps_per_epoch)
    self.first = order_lib.update_first_epochs(self.first, correct, epoch)
    self._right += int((real & right).sum())
    self._seen += int(real.sum())
    if step % self.steps_per_epoch == 0:
      self.accuracy.append(self._right / max(self._seen, 1))
      self._right = self._seen = 0
    return metrics

  def due(self, step: int) -> bool:
    return step % self.steps_per_epoch == 0

  def run(self, step: int, params: Any, ckpts: ckpt_lib.StageCheckpoints) -> dict:
    del params, ckpts
    learned = int((self.first != order_lib.NEVER).sum())
    log.info("learning_order epoch %d: %.4f of the batch rows right, %d of %d learned so far",
             step // self.steps_per_epoch, self.accuracy[-1], learned, len(self.first))
    return {"train_accuracy": self.accuracy[-1], "learned_rows": learned}

  def state(self) -> dict:
    return {"first": self.first.tolist(), "accuracy": list(self.accuracy),
            "right": self._right, "seen": self._seen}

  def load_state(self, state: Mapping[str, Any]) -> None:
    self.first = np.asarray(state["first"], np.int64)
    self.accuracy = list(state["accuracy"])
    self._right, self._seen = int(state["right"]), int(state["seen"])


ROW_CORRECT_KEY = "row_correct"


def batch_signal_loss(graphdef):
  """The classifier loss (`classifier.make_loss_fn`'s cross-entropy, weighted mean over the
  global batch) whose metrics also carry `row_correct`: float32[batch], 1 where the step's own
  forward pass (dropout on) ranks the gold label first. `BatchScoring.observe` consumes it."""

  def loss_fn(params, batch, rng, psum):
    logits = nnx.merge(graphdef, params)(batch, dropout_rng=rng)
    s, w = losses.classification_loss(logits, batch["label"], classifier_lib.row_weights(batch))
    norm = jnp.maximum(psum(w), 1.0)
    right = losses.top1_correct(logits, batch["label"]).astype(jnp.float32)
    return s / norm, {"weight": w, ROW_CORRECT_KEY: right}

  return loss_fn


def _report(table: Mapping[str, Any], dist: Mapping[str, Any], accuracy: list[float],
            names: Mapping[str, str]) -> str:
  """learning_order.md: distributions per kind and per relation, then the latest SCDG rows."""
  epochs = table["epochs"]
  cols = [str(e) for e in range(1, epochs + 1)] + ["never"]
  lines = [f"# Learning order ({table['source_split']} of {table['prepared_dir']})", "",
           f"{len(table['rows'])} rows, {epochs} epochs, FineCL cap c = {table['cap_epoch']}, "
           f"schedule {table.get('schedule', 'capped')}; training-set accuracy per epoch: " + ", ".join(f"{a:.3f}" for a in accuracy), "",
           "## First epoch predicted right, per kind", "",
           "| kind | " + " | ".join(cols) + " | mean epoch (learned) |",
           "|---|" + "---|" * (len(cols) + 1)]
  for kind, h in dist["by_kind"].items():
    lines.append(f"| {kind} | " + " | ".join(str(h[c]) for c in cols) + f" | {h['mean_epoch']} |")
  kinds = list(dist["by_kind"])
  lines += ["", "## Mean first epoch per relation (never-learned rows counted apart)", "",
            "| relation | " + " | ".join(f"{k} mean | {k} never" for k in kinds) + " |",
            "|---|" + "---|---|" * len(kinds)]
  for rel, by_kind in dist["by_relation"].items():
    cells = []
    for k in kinds:
      h = by_kind[k]
      n = sum(h[c] for c in cols)
      cells += ["–" if not n else str(h["mean_epoch"]), str(h["never"]) if n else "–"]
    label = f"{rel} ({names[rel]})" if rel in names else rel
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  latest = order_lib.latest_learned(table["rows"], "scdg", 20)
  if latest:
    lines += ["", "## The 20 SCDG rows learned last", "",
              "| first epoch | weight | relation | text |", "|---|---|---|---|"]
    for r in latest:
      text = r.get("text", "").replace("|", "\\|")
      rel = f"{r['relation']} ({names[r['relation']]})" if r["relation"] in names else r["relation"]
      lines.append(f"| {r['first_epoch'] or 'never'} | {r['weight']:.3f} | {rel} | {text} |")
  return "\n".join(lines) + "\n"


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mesh,
        init_from: str = "", **_) -> dict:
  """Trains the classifier for `config.learning_order.epochs` epochs, scoring every row after each,
  and writes the learning-order table; returns the summary (also `<workdir>/summary.json`).

  Raises:
    ValueError: batch sizes that do not divide over the mesh (before anything is written).
    KeyError: the prepared dir has no `config.learning_order.split`.
    workdir.MismatchError: `init_from` or an existing workdir describes another model.
    trainer.NonFiniteError: a non-finite loss or gradient norm.
  """
  t_start = time.time()
  tc, lo = config.train, config.learning_order
  rules = sharding_lib.RULES[config.mesh.rules]
  finetune_stage.check_batch_sizes(tc, mesh)
  prep_dir, meta = loading.prepared(config)
  label_map = meta["label_map"]
  enc_cfg = loading.encoder_config(config, meta)
  tokenizer = loading.data_tokenizer(meta, config)
  arrays = dataset.load_arrays(prep_dir, lo.split)
  n = len(arrays["label"])
  steps_per_epoch = math.ceil(n / tc.batch_size)
  total_steps = steps_per_epoch * lo.epochs
  info = workdir_lib.describe(stage, config, label_map=label_map, enc_config=enc_cfg,
                              tokenizer=tokenizer, prepared_dir=str(prep_dir), init_from=init_from,
                              features={k: meta[k] for k in ("max_seq_len", "typed_markers")})
  if init_from and (pathlib.Path(init_from) / workdir_lib.RUN_FILE).is_file():
    workdir_lib.check_compatible(info, workdir_lib.read(pathlib.Path(init_from)),
                                 f"--init_from={init_from}", what="--init_from", labels=False)
  workdir_lib.write(workdir, info, tokenizer)
  kinds = [order_lib.kind_of(s) for s in arrays["source"]]
  log.info("learning_order: %d rows of %s (%s), %d relations; %d epochs x %d steps, signal %s, "
           "schedule %s", n, lo.split,
           ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds))), len(label_map),
           lo.epochs, steps_per_epoch, lo.signal, lo.schedule)

  build = classifier_lib.classifier_builder(enc_cfg, len(label_map), config.model.dropout,
                                            config.seed)
  if lo.signal == "batch":
    scoring = BatchScoring(n, steps_per_epoch)
    extra = dict(loss_fn=batch_signal_loss, keep_index=True)
  else:
    abstract = runtime.create_abstract(build, mesh, rules)
    scoring = EpochScoring(classifier_lib.compiled_predict_step(abstract, mesh), arrays,
                           tc.eval_batch_size, mesh, tc.length_multiple, steps_per_epoch)
    extra = {}
  task = finetune_stage.classifier_task("learning_order", config, arrays, build, info, init_from,
                                        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                        hooks=[scoring], **extra)
  result = trainer.train(task, mesh, workdir, rules)
  result.ckpts.close()

  texts = [features_lib.decode_spans(tokenizer, arrays, i)["text"] for i in range(n)]
  table = order_lib.write_table(
      workdir, list(arrays["source"]), list(arrays["relation"]), scoring.first, epochs=lo.epochs,
      cap_epoch=lo.cap_epoch, schedule=lo.schedule, texts=texts,
      extra={"prepared_dir": str(pathlib.Path(prep_dir).resolve()), "source_split": lo.split,
             "seed": config.seed})
  dist = order_lib.distribution(table["rows"], lo.epochs)
  names = dict(meta.get("relation_names", {}))
  (workdir / REPORT_FILE).write_text(_report(table, dist, scoring.accuracy, names))
  for kind, h in dist["by_kind"].items():
    log.info("learning_order: %s rows: mean first epoch %s, never learned %d", kind,
             h["mean_epoch"], h["never"])
  summary = {
      "stage": "learning_order",
      "rows": n,
      "epochs": lo.epochs,
      "cap_epoch": lo.cap_epoch,
      "schedule": lo.schedule,
      "signal": lo.signal,
      "steps": total_steps,
      "start_step": result.start_step,
      "resumed": result.start_step > 0,
      "train_accuracy_by_epoch": [round(a, 4) for a in scoring.accuracy],
      "by_kind": dist["by_kind"],
      "table": str(workdir / order_lib.FILE),
      "encoder_from": result.source,
      "step_seconds": result.step_seconds,
      "seconds": {"total": round(time.time() - t_start, 1), "train": result.train_seconds},
  }
  runtime.write_summary(workdir, summary)
  return summary
