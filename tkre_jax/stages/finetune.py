"""The finetune stage: the K-shot relation classifier, trained by the shared trainer.

Training: AdamW, warm-up + linear decay, gradient clipping (`tkre_jax.train.optim`), on shuffled
epochs of the K-shot `train` split (`trainer.epoch_batches`: step s is a pure function of (seed, s),
so a kill mid-epoch resumes exactly). Model selection: dev evaluation every `eval_every_epochs`
epochs and after the last; the best parameters go to `<workdir>/best/`, which `eval` and later
stages restore. At the end the selected model is scored on `final_eval_splits` (dev: the scores
model selection measured on those same parameters, not a second pass).

Workdir: `run.json` + `tokenizer/` (what the model is), `checkpoints/` (resume), `best/`,
`metrics.jsonl`, `summary.json`.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np
from flax import nnx

from tkre_jax.data import dataset, preparation
from tkre_jax.data import row_weights as order_lib
from tkre_jax.data import templates as templates_lib
from tkre_jax.data.inverses import SWAP_SUFFIX
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.tasks import label_contrastive as sacon_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import loading, runtime, trainer
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)


class ModelSelection:
  """The trainer hook that evaluates on dev at epoch ends and keeps the best model in `best/`.

  Due after the last step of every `eval_every_epochs`-th epoch and of the last epoch. Without a dev
  split it only saves the final parameters as the selected model.
  """

  def __init__(self, predict_step, dev: Optional[Mapping], label_map: Mapping[str, int],
               tc: ml_collections.ConfigDict, mesh, steps_per_epoch: int, total_steps: int):
    self.predict_step, self.dev, self.label_map = predict_step, dev, label_map
    self.tc, self.mesh = tc, mesh
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    self.seconds = 0.0  # wall time of this run's dev evaluations (checkpoint saves included)

  def due(self, step: int) -> bool:
    if step == self.total_steps:
      return True
    epoch, rest = divmod(step, self.steps_per_epoch)
    return self.dev is not None and rest == 0 and epoch % self.tc.eval_every_epochs == 0

  def run(self, step: int, params: Any, ckpts: ckpt_lib.StageCheckpoints) -> dict:
    epoch = math.ceil(step / self.steps_per_epoch)
    meta = {"epoch": epoch, "step": step}
    if self.dev is None:
      ckpts.save_best(step, params, {**meta, "dev": None})
      return {}
    t0 = time.time()
    dev = classifier_lib.evaluate(self.predict_step, params, self.dev, self.label_map,
                                self.tc.eval_batch_size, self.mesh, self.tc.length_multiple)
    improved = ckpts.save_best(step, params, {**meta, "dev": dev}, score=dev[self.tc.select_metric])
    self.seconds += time.time() - t0
    log.info("finetune epoch %d step %d: dev accuracy %.4f micro-F1 %.4f%s (%.0f s)", epoch, step,
             dev["accuracy"], dev["micro_f1"], " (best)" if improved else "", time.time() - t0)
    return {**{f"dev_{k}": v for k, v in dev.items()}, "selected": improved}

  def state(self) -> dict:
    return {}

  def load_state(self, state: Mapping[str, Any]) -> None:
    del state


def check_batch_sizes(tc: ml_collections.ConfigDict, mesh) -> None:
  """Raises ValueError when a batch size does not divide over the data-parallel devices."""
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if tc.batch_size % n_data or tc.eval_batch_size % n_data:
    raise ValueError(f"config.train.batch_size ({tc.batch_size}) and eval_batch_size "
                     f"({tc.eval_batch_size}) must be multiples of the data-parallel size "
                     f"data*fsdp = {n_data} of mesh {dict(mesh.shape)}")


def init_head_from_labels(config: ml_collections.ConfigDict, model: runtime.ShardedModel,
                          label_map: Mapping[str, int], source: str) -> dict:
  """`config.train.head_init=labels`: sets the classifier's output layer from the label encoder of
  the sacon workdir `source` (`sacon.head_from_labels`: each relation's "name [SEP] description"
  embedding, projected by the head's first layer, scaled to the random columns' norm; bias 0).

  Returns:
    `{"head_init": {...}}` for the checkpoint meta and the summary.

  Raises:
    FileNotFoundError, KeyError: `source` has no checkpoint, or no label encoder in it.
  """
  src = pathlib.Path(source)
  theirs = workdir_lib.read(src)
  tree, where = ckpt_lib.restore_param_tree(src)
  label_params = sacon_lib.label_tower_params(tree)
  names = sorted(label_map, key=label_map.get)
  texts, missing = sacon_lib.label_texts(names, preparation.read_schema(config))
  emb = sacon_lib.embed_labels(workdir_lib.encoder_config(theirs, "float32"), label_params,
                               workdir_lib.load_tokenizer(src), texts,
                               int(theirs["config"]["sacon"]["label_max_len"]))
  head = model.params["classifier"]
  w1 = sharding_lib.global_to_host(head["hidden"]["kernel"][...])
  b1 = sharding_lib.global_to_host(head["hidden"]["bias"][...])
  w2 = sharding_lib.global_to_host(head["output"]["kernel"][...])
  column_norm = float(np.mean(np.linalg.norm(w2, axis=0)))
  kernel = sacon_lib.head_from_labels(emb, w1, b1, column_norm)
  runtime.put_subtree(model.params, ("classifier", "output"),
                      {"kernel": kernel, "bias": np.zeros(len(names), np.float32)}, model.shardings)
  log.info("finetune: classifier rows from the label encoder of %s (%d relations, %d without a "
           "schema entry)", where, len(names), missing)
  return {"head_init": {"mode": "labels", "from": where, "labels": len(names),
                        "missing_from_schema": missing, "column_norm": round(column_norm, 6)}}


def classifier_task(stage: str, config: ml_collections.ConfigDict, arrays: Mapping[str, np.ndarray],
                    build, info: Mapping[str, Any], init_from: str, *, steps_per_epoch: int,
                    total_steps: int, hooks, loss_fn=classifier_lib.make_loss_fn,
                    keep_index: bool = False, **fields) -> trainer.TrainTask:
  """The trainer task of the relation classifier on an in-memory training split (finetune,
  learning_order): `config.train`'s optimizer and batch size, shuffled epochs of `arrays`
  (`trainer.epoch_batches`, with each row's `index` when `keep_index`), starting weights from
  `init_from` or the HF checkpoint; `loss_fn` is `graphdef -> LossFn` (default the classifier
  cross-entropy); `fields` set the rest of `trainer.TrainTask` (e.g. `on_fresh_start`)."""
  tc = config.train
  return trainer.TrainTask(
      stage=stage, section=tc, seed=config.seed, total_steps=total_steps, build=build,
      loss_fn=loss_fn,
      batches=lambda start: trainer.epoch_batches(arrays, tc.batch_size, seed=config.seed,
                                                  start_step=start,
                                                  length_multiple=tc.length_multiple,
                                                  keep_index=keep_index),
      init_weights=lambda model: loading.init_weights(config, model, init_from, info, optional=()),
      hooks=hooks, step_fields=lambda s: {"epoch": math.ceil(s / steps_per_epoch)},
      nan_at_step=config.debug.nan_at_step, **fields)


def copy_predicate_encoder(model: runtime.ShardedModel) -> dict:
  """The predicate encoder starts as a copy of the sentence encoder's starting weights
  (arXiv 2503.17799: both encoders from the same checkpoint); returns the summary entry."""
  encoder = jax.tree.map(lambda x: sharding_lib.global_to_host(x[...]),
                         nnx.to_pure_dict(model.params["encoder"]))
  runtime.put_subtree(model.params, ("predicate_encoder",), encoder, model.shardings)
  return {"predicate_encoder": "copied from the encoder's starting weights"}


def fresh_start(config: ml_collections.ConfigDict, model: runtime.ShardedModel,
                label_map: Mapping[str, int], label_src: str) -> dict:
  """What a fresh (not resumed) finetune run does after loading its starting weights: the
  label-encoder head rows (`head_init=labels`) and the predicate encoder's copy."""
  out = {}
  if label_src:
    out.update(init_head_from_labels(config, model, label_map, label_src))
  if config.model.head == "predicate" and config.model.predicate_encoder == "separate":
    out.update(copy_predicate_encoder(model))
  return out


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mesh,
        init_from: str = "", parallelism: str = "jit", **_) -> dict:
  """Trains (or resumes) the classifier; returns the summary written to `<workdir>/summary.json`.

  `parallelism`: "jit" (the sharded `jax.jit` step) or "pmap" (`tkre_jax.train.pmap`: the same loss
  and update with replicated parameters; needs the `dp` rules and no tensor axis).

  Raises:
    ValueError: an unknown `parallelism`, "pmap" on a mesh / rules it cannot run, batch sizes that
      do not divide over the mesh (all before anything is written).
    workdir.MismatchError: `init_from` or an existing workdir describes another model.
    trainer.NonFiniteError: a non-finite loss or gradient norm.
  """
  t_start = time.time()
  if parallelism not in ("jit", "pmap"):
    raise ValueError(f"parallelism must be 'jit' or 'pmap', got {parallelism!r}")
  tc = config.train
  rules = sharding_lib.RULES[config.mesh.rules]
  if parallelism == "pmap":
    from tkre_jax.train import pmap as pmap_lib  # pylint: disable=import-outside-toplevel
    pmap_lib.check_mesh(mesh, config.mesh.rules)
  check_batch_sizes(tc, mesh)
  prep_dir, meta = loading.prepared(config)
  label_map = meta["label_map"]
  enc_cfg = loading.encoder_config(config, meta)
  tokenizer = loading.data_tokenizer(meta, config)
  final_splits = [x.strip() for x in tc.final_eval_splits.split(",") if x.strip()]
  # train, dev (model selection) and the splits scored at the end: with final_eval_splits=dev the
  # 9,600-row FewRel test split is never read here (eval scores it)
  splits = {s: dataset.load_arrays(prep_dir, s) for s in ("train", "dev", "test")
            if s in meta["splits"] and (s in ("train", "dev") or s in final_splits)}
  train_arrays = splits["train"]
  order_report = None
  if tc.learning_order_from:  # FineCL learning-order weights (or dropping the unlearned SCDG rows)
    train_arrays, order_report = order_lib.apply(
        train_arrays, order_lib.read_table(tc.learning_order_from), tc.learning_order_use)
    log.info("finetune: learning order of %s (%s): %s", tc.learning_order_from,
             tc.learning_order_use, order_report)
  steps_per_epoch = math.ceil(len(train_arrays["label"]) / tc.batch_size)
  total_steps = steps_per_epoch * tc.epochs
  info = workdir_lib.describe(stage, config, label_map=label_map, enc_config=enc_cfg,
                              tokenizer=tokenizer, prepared_dir=str(prep_dir), init_from=init_from,
                              features={k: meta[k] for k in ("max_seq_len", "typed_markers")})
  # Relation id -> name from the schema: predictions, report.md and exports show both.
  info["relation_names"] = preparation.names_of(meta, config)
  if init_from:  # fail before writing anything when the previous stage's model does not fit
    src = pathlib.Path(init_from)
    if (src / workdir_lib.RUN_FILE).is_file():
      workdir_lib.check_compatible(info, workdir_lib.read(src), f"--init_from={src}",
                                   what="--init_from", labels=False)
  label_src = ""
  if tc.head_init == "labels":
    label_src = tc.label_encoder_from or init_from
    if not label_src:
      raise ValueError("config.train.head_init=labels needs a sacon workdir: "
                       "--config.train.label_encoder_from or --init_from")
    workdir_lib.check_compatible(info, workdir_lib.read(pathlib.Path(label_src)),
                                 f"config.train.label_encoder_from={label_src}",
                                 what="head_init=labels", labels=False)
  workdir_lib.write(workdir, info, tokenizer)
  log.info("finetune: %d relations, %d train / %s instances; %d steps (%d epochs x %d)",
           len(label_map), len(train_arrays["label"]),
           {s: len(a["label"]) for s, a in splits.items() if s != "train"}, total_steps, tc.epochs,
           steps_per_epoch)

  predicate = None
  if config.model.head == "predicate":  # the instance-adapted predicate head and its templates
    table = templates_lib.table_from_config(config, label_map, tokenizer)
    info["templates"] = table.to_json()
    workdir_lib.write(workdir, info, tokenizer)
    predicate = classifier_lib.predicate_options(config.model, table)
    log.info("finetune: predicate head (%s predicate encoder), templates: %s",
             config.model.predicate_encoder, "; ".join(table.texts[:3]) + " ...")
  build = classifier_lib.classifier_builder(enc_cfg, len(label_map), config.model.dropout,
                                            config.seed, predicate)
  abstract = runtime.create_abstract(build, mesh, rules)
  predict_step = classifier_lib.compiled_predict_step(abstract, mesh)
  selection = ModelSelection(predict_step, splits.get("dev"), label_map, tc, mesh, steps_per_epoch,
                             total_steps)
  task = classifier_task(
      "finetune", config, train_arrays, build, info, init_from, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, hooks=[selection],
      on_fresh_start=lambda model, loaded: fresh_start(config, model, label_map, label_src),
      pmap_loss_sum_fn=classifier_lib.make_loss_sum_fn if parallelism == "pmap" else None)
  result = trainer.train(task, mesh, workdir, rules)

  # Scores of the selected model.
  ckpts = result.ckpts
  t_eval = time.time()
  best_meta = ckpts.best_meta()
  metrics = {}
  scored_at_selection = ("dev",) if best_meta.get("dev") is not None else ()
  # splits with swapped rows (`<split>_swap`, relation inverses): the direction metric
  swaps = [n for n in final_splits if n in splits and f"{n}{SWAP_SUFFIX}" in meta["splits"]]
  if swaps or any(name in splits and name not in scored_at_selection for name in final_splits):
    best_params, best_meta = ckpts.restore_best(
        runtime.abstract_with_shardings(result.model.params, result.model.shardings))
  for name in final_splits:
    if name in swaps:
      logits = classifier_lib.predict(predict_step, best_params, splits[name], tc.eval_batch_size,
                                      mesh, tc.length_multiple, desc=f"eval {name}")
      metrics[name] = (dict(best_meta["dev"]) if name in scored_at_selection else
                       classifier_lib.scores(logits, splits[name]["label"], label_map))
      metrics[name]["direction"] = classifier_lib.direction(
          predict_step, best_params, logits, splits[name],
          dataset.load_arrays(prep_dir, f"{name}{SWAP_SUFFIX}"), meta, tc.eval_batch_size, mesh,
          tc.length_multiple, desc=f"eval {name}{SWAP_SUFFIX}")
    elif name in scored_at_selection:
      # model selection scored these very parameters on dev when it saved them: no second pass
      metrics[name] = dict(best_meta["dev"])
    elif name in splits:
      metrics[name] = classifier_lib.evaluate(predict_step, best_params, splits[name], label_map,
                                            tc.eval_batch_size, mesh, tc.length_multiple)
    if name in metrics:
      log.info("finetune: selected model (epoch %s) %s accuracy %.4f, micro-F1 %.4f, macro-F1 %.4f",
               best_meta.get("epoch"), name, metrics[name]["accuracy"], metrics[name]["micro_f1"],
               metrics[name]["macro_f1"])
  ckpts.close()
  summary = {
      "stage": "finetune",
      "steps": total_steps,
      "start_step": result.start_step,
      "resumed": result.start_step > 0,
      "epochs": tc.epochs,
      "selected_epoch": best_meta.get("epoch"),
      "selected_step": best_meta.get("step"),
      "metrics": metrics,
      "encoder_from": result.source,
      **({"head_init": result.extra.get("head_init")} if label_src else {}),
      **({"learning_order": {"from": tc.learning_order_from, **order_report}}
         if order_report else {}),
      "num_labels": len(label_map),
      "num_train": int(len(train_arrays["label"])),
      "step_seconds": result.step_seconds,
      "tokens_per_second": result.tokens_per_second,
      "compile_seconds": result.compile_seconds,
      "mesh": dict(mesh.shape),
      # train: the training loop, its dev evaluations (dev_eval) included; eval: the final scoring
      "seconds": {"total": round(time.time() - t_start, 1), "train": result.train_seconds,
                  "dev_eval": round(selection.seconds, 1), "eval": round(time.time() - t_eval, 1)},
  }
  runtime.write_summary(workdir, summary)
  return summary
