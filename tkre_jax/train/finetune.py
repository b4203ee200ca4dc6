"""The finetune and eval stages: a K-shot relation classifier on entity-marker representations.

Model: the encoder, then the hidden states at the subject-start (`@`) and object-start (`#`) markers
concatenated -> Linear(2H->H) -> ReLU -> dropout -> Linear(H->C) (the TKRE reference classifier).
Training: AdamW, warm-up + linear decay, gradient clipping (`tkre_jax.train.optim`), cross-entropy
normalised over the global batch; model selection on dev every `eval_every_epochs`; the selected
parameters go to `<workdir>/best/`, the latest train state to `<workdir>/checkpoints/` (resume).
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tkre_jax.data import tfrecord
from tkre_jax.data.prepare import model_dir
from tkre_jax.eval import metrics as metrics_lib
from tkre_jax.model import encoder as encoder_lib
from tkre_jax.model import hf_import
from tkre_jax.model.heads import RelationClassifier
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import losses, optim, runtime

log = logging.getLogger(__name__)


class RelationModel(nnx.Module):
  """Encoder + entity-marker relation classifier.

  `__call__(batch, *, dropout_rng=None) -> float32[batch, num_labels]` reads `input_ids`,
  `attention_mask` (int32[batch, seq_len]), `subj_pos`, `obj_pos` (int32[batch]).
  """

  def __init__(self, enc_config: encoder_lib.EncoderConfig, num_labels: int, dropout: float, *,
               rngs: nnx.Rngs):
    self.encoder = encoder_lib.Encoder(enc_config, rngs=rngs)
    self.classifier = RelationClassifier(enc_config.hidden_size, num_labels, dropout_rate=dropout,
                                         dtype=enc_config.dtype, rngs=rngs)

  def __call__(self, batch, *, dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    k_enc = k_cls = None
    if dropout_rng is not None:
      k_enc, k_cls = jax.random.split(dropout_rng)
    hidden = self.encoder(batch["input_ids"], batch["attention_mask"], dropout_rng=k_enc)
    return self.classifier(hidden, batch["subj_pos"], batch["obj_pos"], dropout_rng=k_cls)


# ---------------------------------------------------------------------------------------------------
# Building the model
# ---------------------------------------------------------------------------------------------------

def encoder_config(config: ml_collections.ConfigDict) -> encoder_lib.EncoderConfig:
  cfg = encoder_lib.EncoderConfig.from_hf_config(model_dir(config) / "config.json")
  return _with_dtype(cfg, config.model.dtype)


def _with_dtype(cfg, dtype):
  import dataclasses
  return dataclasses.replace(cfg, dtype=dtype) if cfg.dtype != dtype else cfg


def load_encoder_weights(config: ml_collections.ConfigDict, init_from: str = "") -> tuple[dict, str]:
  """Encoder parameters (a pure dict of host arrays) and a description of where they came from.

  `init_from` names a previous stage's workdir (its `best/` checkpoint, else its latest train
  state); otherwise the HF checkpoint of `config.model.hf_dir` (default all-MiniLM-L6-v2).
  """
  if init_from:
    return restore_encoder(pathlib.Path(init_from)), f"stage checkpoint {init_from}"
  _, encoder, _ = hf_import.load_hf_encoder(model_dir(config), dtype=config.model.dtype)
  return nnx.to_pure_dict(nnx.state(encoder, nnx.Param)), f"HF checkpoint {model_dir(config)}"


def restore_encoder(workdir: pathlib.Path) -> dict:
  """The `encoder` sub-tree of the parameters saved in a stage workdir.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    KeyError: the checkpoint holds no `encoder` parameters.
  """
  tree, where = ckpt_lib.restore_param_tree(workdir)
  if "encoder" not in tree:
    raise KeyError(f"{where}: the checkpoint has no 'encoder' parameters (keys: {sorted(tree)})")
  log.info("init_from: restored the encoder of %s", where)
  return tree["encoder"]


def build_model(config, num_labels: int, mesh, rules) -> runtime.ShardedModel:
  enc_cfg = encoder_config(config)
  seed = config.seed
  return runtime.create_sharded(
      lambda: RelationModel(enc_cfg, num_labels, config.model.dropout, rngs=nnx.Rngs(seed)),
      mesh, rules)


# ---------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------

def make_loss_sum_fn(graphdef):
  """`(params, batch, rng) -> (loss_sum, weight, aux)`: the classifier cross-entropy SUMMED over the
  rows of `batch` (float32 scalar), their total weight (float32 scalar) and `{}`; `rng` is the
  dropout key (None: no dropout). The jit step divides by the global weight itself; the pmap path
  (`tkre_jax.parallel.pmap`) sums over devices first."""

  def loss_sum_fn(params, batch, rng):
    logits = nnx.merge(graphdef, params)(batch, dropout_rng=rng)
    s, w = losses.classification_loss(logits, batch["label"], batch["weight"])
    return s, w, {}

  return loss_sum_fn


def make_train_step(graphdef, tx):
  """(params, opt_state, batch, rng) -> (params, opt_state, metrics); the loss is the
  cross-entropy summed over the global batch divided by the global weight."""
  loss_sum_fn = make_loss_sum_fn(graphdef)

  def train_step(params, opt_state, batch, rng):
    def loss_fn(p):
      s, w, _ = loss_sum_fn(p, batch, rng)
      return s / jnp.maximum(w, 1.0), w

    (loss, w), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "weight": w}

  return train_step


def make_predict_step(graphdef):
  def predict_step(params, batch):
    return nnx.merge(graphdef, params)(batch)
  return predict_step


def predict(predict_fn, params, arrays, batch_size: int, mesh, length_multiple: int) -> np.ndarray:
  """Logits for every row of `arrays`: float32[n, num_labels], in row order."""
  n = len(arrays["label"])
  out = None
  for batch in tfrecord.iterate_batches(arrays, batch_size, sort_by_length=True,
                                        length_multiple=length_multiple):
    index = batch.pop("index")
    logits = np.asarray(jax.device_get(predict_fn(params, runtime.to_global(batch, mesh))))
    if out is None:
      out = np.zeros((n, logits.shape[-1]), np.float32)
    valid = index >= 0
    out[index[valid]] = logits[valid]
  return out


def evaluate(predict_fn, params, arrays, label_map, batch_size, mesh, length_multiple) -> dict:
  logits = predict(predict_fn, params, arrays, batch_size, mesh, length_multiple)
  preds = logits.argmax(-1)
  return metrics_lib.classification_metrics(preds, arrays["label"], len(label_map),
                                            metrics_lib.find_no_relation_id(label_map))


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------

def _prepared(config, workdir):
  if not config.data.prepared_dir:
    raise ValueError("set --config.data.prepared_dir to the workdir of a `--stage=prepare` run")
  d = pathlib.Path(config.data.prepared_dir)
  return d, tfrecord.read_meta(d)


def run_finetune(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh,
                 init_from: str = "", parallelism: str = "jit") -> dict:
  """Trains the classifier; returns the summary written to `<workdir>/summary.json`.

  `parallelism`: "jit" (the sharded `jax.jit` step) or "pmap" (`tkre_jax.parallel.pmap`: the same
  loss and update with replicated parameters; needs the `dp` rules and no tensor axis).

  Raises:
    ValueError: an unknown `parallelism`, or "pmap" with a mesh / rules it cannot run (before any
      data is read).
  """
  t_start = time.time()
  if parallelism not in ("jit", "pmap"):
    raise ValueError(f"parallelism must be 'jit' or 'pmap', got {parallelism!r}")
  if parallelism == "pmap":
    from tkre_jax.parallel import pmap as pmap_lib
    pmap_lib.check_mesh(mesh, config.mesh.rules)
  workdir = pathlib.Path(workdir)
  prep_dir, meta = _prepared(config, workdir)
  label_map = meta["label_map"]
  splits = {s: tfrecord.load_arrays(prep_dir, s) for s in ("train", "dev", "test") if s in meta["splits"]}
  train = splits["train"]
  tc = config.train
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if tc.batch_size % n_data or tc.eval_batch_size % n_data:
    raise ValueError(f"batch sizes ({tc.batch_size}, {tc.eval_batch_size}) must be multiples of the "
                     f"data-parallel size data*fsdp = {n_data}")
  steps_per_epoch = math.ceil(len(train["label"]) / tc.batch_size)
  total_steps = steps_per_epoch * tc.epochs
  rules = sharding_lib.RULES[config.mesh.rules]

  model = build_model(config, len(label_map), mesh, rules)
  tx, schedule = optim.adamw(tc, total_steps)
  opt_shardings = sharding_lib.state_shardings(jax.eval_shape(tx.init, model.params), mesh, rules)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(model.params)
  ckpts = ckpt_lib.StageCheckpoints(workdir)
  state_shardings = {"params": model.shardings, "opt_state": opt_shardings}

  start_epoch = 0
  best_score = -1.0
  if ckpts.latest_step() is not None:
    target = runtime.abstract_with_shardings({"params": model.params, "opt_state": opt_state},
                                             state_shardings)
    restored, rmeta = ckpts.restore_latest(target)
    model.params, opt_state = restored["params"], restored["opt_state"]
    start_epoch, best_score = rmeta["epoch"], rmeta["best_score"]
    source = f"resumed {workdir / 'checkpoints'} at epoch {start_epoch}"
  else:
    weights, source = load_encoder_weights(config, init_from)
    runtime.put_subtree(model.params, ("encoder",), weights, model.shardings)
  log.info("finetune: %d relations, %d train / %s instances; %d steps (%d epochs x %d); "
           "%d parameters; encoder from %s", len(label_map), len(train["label"]),
           {s: len(a["label"]) for s, a in splits.items() if s != "train"}, total_steps, tc.epochs,
           steps_per_epoch, runtime.count_params(model.params), source)

  batch_sh = sharding_lib.batch_sharding(mesh)
  repl = sharding_lib.replicated(mesh)
  if parallelism == "pmap":
    train_step = pmap_lib.PmapTrainStep(make_loss_sum_fn(model.graphdef), tx, mesh,
                                        (model.shardings, opt_shardings), "finetune_pmap_step")
  else:
    train_step = runtime.CompiledStep(
        make_train_step(model.graphdef, tx), "finetune_step",
        in_shardings=(model.shardings, opt_shardings, batch_sh, repl),
        out_shardings=(model.shardings, opt_shardings, repl), donate_argnums=(0, 1))
  # Logits come back replicated (an all-gather of [batch, classes]) so every host can read them.
  predict_step = runtime.CompiledStep(make_predict_step(model.graphdef), "predict_step",
                                      in_shardings=(model.shardings, batch_sh), out_shardings=repl)
  writer = runtime.MetricsWriter(workdir)
  base_key = jax.random.key(config.seed)
  step = start_epoch * steps_per_epoch
  history = []
  t_train = time.time()
  for epoch in range(start_epoch, tc.epochs):
    t_epoch = time.time()
    losses_epoch = []
    for batch in tfrecord.iterate_batches(train, tc.batch_size, shuffle=True,
                                          seed=config.seed * 1000 + epoch,
                                          length_multiple=tc.length_multiple):
      batch.pop("index")
      rng = jax.random.fold_in(base_key, step)
      model.params, opt_state, m = train_step(model.params, opt_state,
                                              runtime.to_global(batch, mesh), rng)
      step += 1
      losses_epoch.append(m["loss"])
      if step % tc.log_every_steps == 0 or step == total_steps:
        m = jax.device_get(m)
        loss = float(m["loss"])
        if not math.isfinite(loss):
          raise FloatingPointError(f"finetune: loss is {loss} at step {step}")
        writer.write({"stage": "finetune", "step": step, "epoch": epoch + 1, "loss": loss,
                      "grad_norm": float(m["grad_norm"]), "learning_rate": float(schedule(step - 1))})
    losses_epoch = [float(x) for x in jax.device_get(losses_epoch)]
    last = epoch + 1 == tc.epochs
    record = {"stage": "finetune", "step": step, "epoch": epoch + 1,
              "epoch_seconds": round(time.time() - t_epoch, 2)}
    if "dev" in splits and ((epoch + 1) % tc.eval_every_epochs == 0 or last):
      dev = evaluate(predict_step, model.params, splits["dev"], label_map, tc.eval_batch_size, mesh,
                     tc.length_multiple)
      score = dev[tc.select_metric]
      record.update({f"dev_{k}": v for k, v in dev.items()})
      improved = score > best_score
      if improved:
        best_score = score
        ckpts.save_best(step, model.params, {"epoch": epoch + 1, "step": step, "dev": dev})
      log.info("epoch %d/%d step %d: loss %.4f, dev accuracy %.4f micro-F1 %.4f%s (%.0f s)",
               epoch + 1, tc.epochs, step, np.mean(losses_epoch) if losses_epoch else float("nan"),
               dev["accuracy"], dev["micro_f1"], " (best)" if improved else "",
               time.time() - t_epoch)
    else:
      log.info("epoch %d/%d step %d: loss %.4f (%.0f s)", epoch + 1, tc.epochs, step,
               np.mean(losses_epoch) if losses_epoch else float("nan"), time.time() - t_epoch)
    if "dev" not in splits and last:
      ckpts.save_best(step, model.params, {"epoch": epoch + 1, "step": step, "dev": None})
    writer.write(record)
    history.append(record)
    ckpts.save_latest(step, {"params": model.params, "opt_state": opt_state},
                      {"epoch": epoch + 1, "step": step, "best_score": best_score})
  train_seconds = time.time() - t_train

  # Test metrics of the selected model.
  result = {}
  best_params, best_meta = ckpts.restore_best(runtime.abstract_with_shardings(model.params,
                                                                               model.shardings))
  t_eval = time.time()
  final_splits = [x.strip() for x in tc.final_eval_splits.split(",") if x.strip()]
  for name in final_splits:
    if name in splits:
      result[name] = evaluate(predict_step, best_params, splits[name], label_map,
                              tc.eval_batch_size, mesh, tc.length_multiple)
  ckpts.close()
  summary = {
      "stage": "finetune",
      "steps": step,
      "epochs": tc.epochs,
      "selected_epoch": best_meta.get("epoch"),
      "metrics": result,
      "encoder_from": source,
      "num_labels": len(label_map),
      "num_train": int(len(train["label"])),
      "seconds": {"total": round(time.time() - t_start, 1), "train": round(train_seconds, 1),
                  "eval": round(time.time() - t_eval, 1)},
  }
  runtime.write_summary(workdir, summary)
  return summary


def run_eval(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh,
             init_from: str = "") -> dict:
  """Restores the selected model of a finetune workdir (`init_from`, default `workdir`) from its
  `best/` Orbax checkpoint, evaluates every labelled split and writes `<workdir>/summary.json`."""
  t0 = time.time()
  workdir = pathlib.Path(workdir)
  ckpt_dir = pathlib.Path(init_from) if init_from else workdir
  prep_dir, meta = _prepared(config, workdir)
  label_map = meta["label_map"]
  rules = sharding_lib.RULES[config.mesh.rules]
  model = build_model(config, len(label_map), mesh, rules)
  ckpts = ckpt_lib.StageCheckpoints(ckpt_dir, read_only=True)
  params, best_meta = ckpts.restore_best(runtime.abstract_with_shardings(model.params, model.shardings))
  batch_sh = sharding_lib.batch_sharding(mesh)
  predict_step = runtime.CompiledStep(make_predict_step(model.graphdef), "predict_step",
                                      in_shardings=(model.shardings, batch_sh),
                                      out_shardings=sharding_lib.replicated(mesh))
  result = {}
  for name in ("dev", "test"):
    if name in meta["splits"]:
      arrays = tfrecord.load_arrays(prep_dir, name)
      result[name] = evaluate(predict_step, params, arrays, label_map, config.train.eval_batch_size,
                              mesh, config.train.length_multiple)
      log.info("eval %s: accuracy %.4f, micro-F1 %.4f, macro-F1 %.4f (%d instances)", name,
               result[name]["accuracy"], result[name]["micro_f1"], result[name]["macro_f1"],
               result[name]["num_examples"])
  ckpts.close()
  summary = {"stage": "eval", "steps": best_meta.get("step"), "checkpoint": str(ckpt_dir.resolve() / "best"),
             "selected_epoch": best_meta.get("epoch"), "metrics": result,
             "seconds": round(time.time() - t0, 1)}
  runtime.write_summary(workdir, summary)
  return summary
