"""The TKRE pre-training stages `mslm` (Masked Span Language Modeling) and `scl` (Span-level
Contrastive Learning with MSLM kept on), trained by the shared trainer on the knowledge-guided
`corpus` split written by `prepare` (losses and steps: `tkre_jax.tasks.mslm_scl`).

Start order: this workdir's checkpoint -> `--init_from` (scl takes the encoder and MLM head of an
mslm workdir) -> the HF checkpoint. SCL anchors start from the encoder's mean-pooled embedding of
"name: description" (the relation schema, e.g. FewRel's pid2name) tokenized with the corpus
tokenizer, or of the label's words when there is no schema entry (`scl.anchor_init="text"`).

MLM-head warm-up (mslm only): when the starting weights have no MLM head (all-MiniLM-L6-v2 ships
none) and `mslm.head_warmup_steps > 0`, the shared trainer first trains the head alone on the
`mslm.head_warmup_split` split (default `unlabelled`: FewRel 1.0 train-relation sentences, see
`tkre_jax.data.augment`) with the encoder frozen (`TrainTask.frozen` and `stop_gradient`: every
encoder parameter unchanged), in `<workdir>/head_warmup/` (its own checkpoints: a killed warm-up
resumes exactly); MSLM then starts from the HF encoder and the warmed-up head. `mslm.eval_split`
names a split whose masked-token accuracy (fixed masks) is measured at the start, after the warm-up
and at the end (`summary["mlm_eval"]`).

Workdir: `run.json` + `tokenizer/`, `checkpoints/` (resume), `best/` (the final parameters, tree
`{"encoder", "mlm_head"[, "projection", "anchors"]}`, which the next stage's `--init_from`
restores), `metrics.jsonl`, `summary.json`, `head_warmup/` (mslm).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import time
from typing import Mapping

import ml_collections
import numpy as np
from flax import nnx

from tkre_jax.data import dataset, pipeline, preparation
from tkre_jax.data import row_weights as order_lib
from tkre_jax.parallel import mesh as mesh_lib
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks import mslm_scl
from tkre_jax.train import loading, runtime, trainer
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)

WARMUP_DIR = "head_warmup"
WARMUP_SALT = 3
CAP_WARN_SHARE = 0.1  # warn when max_predictions drops more than this share of the selected tokens


def init_anchors(config: ml_collections.ConfigDict, model: runtime.ShardedModel,
                 label_map: Mapping[str, int], tokenizer) -> dict:
  """Sets the relation anchors to the encoder's embedding of each relation's text (`scl.anchor_init
  = "text"`, see `mslm_scl.relation_texts`), with the encoder currently in `model.params`.

  Returns:
    the counts of `relation_texts` (all `random` when `anchor_init == "random"`).
  """
  if config.scl.anchor_init == "random":
    return {"schema": 0, "label_words": 0, "random": len(label_map)}
  texts, counts = mslm_scl.relation_texts(label_map, preparation.read_schema(config))
  todo = [i for i, t in enumerate(texts) if t is not None]
  if not todo:
    return counts
  emb = mslm_scl.encode_texts(model.graphdef, model.params, tokenizer, [texts[i] for i in todo])
  current = sharding_lib.global_to_host(model.params["anchors"]["anchors"][...]).astype(np.float32)
  current[np.asarray(todo)] = emb
  runtime.put_subtree(model.params, ("anchors",), {"anchors": current}, model.shardings)
  return counts


def warmup_plan(config: ml_collections.ConfigDict, stage: str, meta: Mapping,
                workdir: pathlib.Path, init_from: str) -> tuple[bool, str]:
  """Whether the MLM-head warm-up runs, and why not when it does not (see the module docstring)."""
  sec = config[stage]
  if stage != "mslm":
    return False, ""
  reason = loading.head_warmup_skip_reason(config, stage, workdir, init_from)
  if reason:
    return False, reason
  if sec.head_warmup_split not in meta["splits"]:
    reason = (f"the prepared data has no {sec.head_warmup_split!r} split "
              f"({meta.get('unlabelled', {}).get('reason', 'config.data.unlabelled_file')}): the "
              "MLM head starts from random weights")
    log.warning("mslm: no MLM-head warm-up: %s", reason)
    return False, reason
  return True, ""


def run_head_warmup(config, cfg, prep_dir, build, info, init_from, mesh, rules,
                    workdir: pathlib.Path, measure) -> tuple[dict, dict]:
  """Trains the MLM head alone (encoder frozen) in `<workdir>/head_warmup/` with the shared trainer.

  Returns:
    `(params, report)`: the pure parameter dict (encoder as loaded, warmed-up head) and a summary.
  """
  sec = config.mslm
  # config.mslm with the warm-up's peak learning rate and batch size (same optimizer otherwise).
  wsec = ml_collections.ConfigDict(sec.to_dict())
  wsec.optim.learning_rate = sec.head_warmup_learning_rate
  wsec.batch_size = sec.head_warmup_batch_size
  wcfg = dataclasses.replace(cfg, freeze_encoder=True)
  task = trainer.TrainTask(
      stage="mslm_head_warmup", section=wsec, seed=config.seed, salt=WARMUP_SALT,
      total_steps=int(sec.head_warmup_steps), build=build,
      loss_fn=lambda graphdef: mslm_scl.mslm_loss(graphdef, wcfg),
      batches=lambda start: pipeline.pretrain_batches(
          prep_dir, sec.head_warmup_split, global_batch_size=wsec.batch_size, seed=config.seed,
          start_step=start, length_multiple=sec.length_multiple),
      global_batches=False, frozen=("encoder",),
      init_weights=lambda model: loading.init_weights(config, model, init_from, info),
      on_fresh_start=lambda model, loaded: measure("start", model), log_keys=("mlm_accuracy",))
  result = trainer.train(task, mesh, workdir / WARMUP_DIR, rules)
  result.ckpts.close()
  history = result.history
  report = {"ran": True, "steps": int(sec.head_warmup_steps), "split": sec.head_warmup_split,
            "learning_rate": float(wsec.optim.learning_rate), "batch_size": int(wsec.batch_size),
            "weights_from": result.source, "frozen": ["encoder"],
            "first_logged": history[0] if history else {},
            "last_logged": history[-1] if history else {}, "seconds": result.train_seconds}
  return nnx.to_pure_dict(result.model.params), {"report": report, "extra": result.extra}


def cap_report(history, max_predictions: int) -> dict:
  """The `max_predictions` cap over a run: tokens selected by the span masking, dropped by the cap,
  and the dropped share (logged; a warning above `CAP_WARN_SHARE`)."""
  rows = [r for r in history if "num_selected" in r]
  selected = sum(r["num_selected"] * r.get("steps_in_window", 1) for r in rows)
  dropped = sum(r["num_dropped"] * r.get("steps_in_window", 1) for r in rows)
  share = dropped / selected if selected else 0.0
  out = {"max_predictions": max_predictions, "selected": round(selected),
         "dropped": round(dropped), "dropped_share": round(share, 4)}
  if share > CAP_WARN_SHARE:
    log.warning("max_predictions=%d left %.1f%% of the selected tokens unmasked: the effective "
                "masking rate is %.1f%% below the configured probabilities; raise "
                "config.mslm.max_predictions", max_predictions, 100 * share, 100 * share)
  elif selected:
    log.info("max_predictions=%d dropped %.1f%% of the selected tokens", max_predictions,
             100 * share)
  return out


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mesh,
        init_from: str = "", **_) -> dict:
  """Runs (or resumes) the `mslm` or `scl` stage; returns the summary written to
  `<workdir>/summary.json`.

  Raises:
    ValueError: a batch size not divisible by the data-parallel size, or no mask token (both
      before anything is written; `stages.run` checked the config values).
    KeyError: the prepared directory has no `config.<stage>.split` split.
    workdir.MismatchError: `init_from` or an existing workdir describes another model.
    trainer.NonFiniteError: a non-finite loss or gradient norm.
  """
  t_start = time.time()
  sec = config[stage]
  prep_dir, meta = loading.prepared(config)
  if sec.split not in meta["splits"]:
    reason = meta.get("corpus", {}).get("reason", "")
    raise KeyError(f"{prep_dir}: no split {sec.split!r} to pre-train on (splits: "
                   f"{sorted(meta['splits'])}){'; ' + reason if reason else ''}. Run prepare with "
                   "config.data.edkg_file / scdg_file present (config.data.corpus='require'), or set "
                   f"--config.{stage}.split=train")
  cfg = mslm_scl.step_config(config, meta, stage)
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if sec.batch_size % n_data:
    raise ValueError(f"config.{stage}.batch_size ({sec.batch_size}) must be a multiple of the "
                     f"data-parallel size data*fsdp = {n_data}")
  if stage == "mslm" and sec.head_warmup_steps > 0 and sec.head_warmup_batch_size % n_data:
    raise ValueError(f"config.mslm.head_warmup_batch_size ({sec.head_warmup_batch_size}) must be a "
                     f"multiple of the data-parallel size data*fsdp = {n_data}")
  label_map = meta["label_map"]
  enc_cfg = loading.encoder_config(config, meta)
  tokenizer = loading.data_tokenizer(meta, config)
  info = workdir_lib.describe(stage, config, label_map=label_map, enc_config=enc_cfg,
                              tokenizer=tokenizer, prepared_dir=str(prep_dir), init_from=init_from)
  if init_from and (pathlib.Path(init_from) / workdir_lib.RUN_FILE).is_file():
    workdir_lib.check_compatible(info, workdir_lib.read(pathlib.Path(init_from)),
                                 f"--init_from={init_from}", what="--init_from", labels=False)
  num_rows = pipeline.pretrain_num_rows(prep_dir, sec.split)
  workdir_lib.write(workdir, info, tokenizer)
  total_steps = int(sec.steps)
  corpus_info = meta.get("corpus", {})
  log.info("%s: %d sequences in split %r %s; %d steps at batch %d (%.1f epochs)", stage, num_rows,
           sec.split, corpus_info.get("by_kind", ""), total_steps, sec.batch_size,
           total_steps * sec.batch_size / num_rows)

  eval_split = config.mslm.eval_split
  eval_arrays = dataset.load_arrays(prep_dir, eval_split) if eval_split else None

  def measure(when: str, model) -> dict:
    if eval_arrays is None:
      return {}
    m = mslm_scl.evaluate_mlm(model.graphdef, model.params, eval_arrays, cfg, seed=config.seed)
    log.info("%s: masked-token accuracy on %r %s: %.4f (loss %.4f, %d tokens)", stage, eval_split,
             when, m["mlm_accuracy"], m["mlm_loss"], m["num_predictions"])
    return {"mlm_eval": {when: m}}

  build = mslm_scl.pretrain_builder(enc_cfg, num_relations=len(label_map) if stage == "scl" else 0,
                                    proj_dim=config.scl.proj_dim if stage == "scl" else 0,
                                    seed=config.seed)
  rules = sharding_lib.RULES[config.mesh.rules]
  warm, why_not = warmup_plan(config, stage, meta, workdir, init_from)
  warm_params, warmup = None, {"ran": False, "reason": why_not} if stage == "mslm" else None
  if warm:
    warm_params, w = run_head_warmup(config, cfg, prep_dir, build, info, init_from, mesh, rules,
                                     workdir, measure)
    warmup = w["report"]
    start_eval = w["extra"].get("mlm_eval", {})

  def init_weights(model):
    if warm_params is None:
      return loading.init_weights(config, model, init_from, info)
    return loading.put_warm_params(model, warm_params, warmup["weights_from"], warmup["steps"],
                                   workdir / WARMUP_DIR)

  def on_fresh_start(model, loaded):
    out = {}
    if warm_params is not None:
      out = {"mlm_eval": {**start_eval, **measure("after_warmup", model).get("mlm_eval", {})}}
    else:
      out = measure("start", model)
    if stage == "scl":
      out["anchors_init"] = ({"restored": len(label_map)} if "anchors" in loaded
                             else init_anchors(config, model, label_map, tokenizer))
    return out

  row_weights, order_report = None, None
  if stage == "scl" and config.scl.learning_order_from:  # FineCL weights in the contrastive term
    table = order_lib.read_table(config.scl.learning_order_from)
    row_weights = functools.partial(order_lib.weights_of, table)
    _, counts = order_lib.lookup(table, dataset.load_text_column(prep_dir, sec.split))
    order_report = {"from": config.scl.learning_order_from, **counts}
    log.info("scl: learning-order weights of %s on split %r: %s", config.scl.learning_order_from,
             sec.split, counts)

  reads = pipeline.ReadStats()  # rows of the split this process decodes (its own shard)
  task = trainer.TrainTask(
      stage=stage, section=sec, seed=config.seed, salt=mslm_scl.STAGE_SALT[stage],
      total_steps=total_steps, build=build,
      loss_fn=lambda graphdef: mslm_scl.LOSSES[stage](graphdef, cfg),
      # The corpus streams from disk (per-host shards, seeded window shuffle, length buckets):
      # step s is a pure function of (seed, s), so a resumed run reads on where it stopped.
      batches=lambda start: pipeline.pretrain_batches(prep_dir, sec.split,
                                                      global_batch_size=sec.batch_size,
                                                      seed=config.seed, start_step=start,
                                                      length_multiple=sec.length_multiple,
                                                      stats=reads, row_weights=row_weights),
      global_batches=False,
      init_weights=init_weights, on_fresh_start=on_fresh_start,
      log_keys=(("mslm_loss", "scl_loss", "mlm_accuracy", "dropped_share") if stage == "scl"
                else ("mlm_accuracy", "dropped_share")),
      nan_at_step=config.debug.nan_at_step)
  result = trainer.train(task, mesh, workdir, rules)
  rows_read = mesh_lib.per_process(reads.rows)  # every process takes part (a collective)
  if eval_arrays is not None:
    result.extra.setdefault("mlm_eval", {}).update(
        measure(f"after_{stage}", result.model)["mlm_eval"])
  # best/ holds a pure dict ({"encoder": {...}, "mlm_head": {...}, ...} of arrays): what the next
  # stage's --init_from reads back (`checkpoint.restore_param_tree`).
  result.ckpts.save_best(total_steps, nnx.to_pure_dict(result.model.params),
                         {"stage": stage, "step": total_steps, **result.extra})
  result.ckpts.close()

  history = result.history
  summary = {
      "stage": stage,
      "steps": total_steps,
      "start_step": result.start_step,
      "resumed": result.start_step > 0,
      "weights_from": result.source,
      "loaded": result.loaded,
      "split": sec.split,
      "num_sequences": int(num_rows),
      # rows of `split` each process decoded in this run: its own shard (a resumed run decodes the
      # window it resumes in again), so an epoch sums to num_sequences
      "rows_read_per_process": rows_read,
      "corpus": {k: corpus_info[k] for k in ("by_kind", "num_instances") if k in corpus_info},
      "batch_size": int(sec.batch_size),
      "epochs": round(total_steps * sec.batch_size / num_rows, 2),
      **result.report(),
      "seconds": {"total": round(time.time() - t_start, 1), "train": result.train_seconds},
      "mesh": dict(mesh.shape),
      "max_predictions_cap": cap_report(history, int(config.mslm.max_predictions)),
      **({"head_warmup": warmup} if warmup is not None else {}),
      **({"learning_order": order_report} if order_report else {}),
      **result.extra,
  }
  runtime.write_summary(workdir, summary)
  log.info("%s: done, %d steps in %.0f s (%s s/step after compilation); best/ holds the final "
           "parameters", stage, total_steps - result.start_step, result.train_seconds,
           result.step_seconds)
  return summary


__all__ = ["init_anchors", "run"]
