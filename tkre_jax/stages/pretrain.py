"""The TKRE pre-training stages `mslm` (Masked Span Language Modeling) and `scl` (Span-level
Contrastive Learning with MSLM kept on), trained by the shared trainer on the knowledge-guided
`corpus` split written by `prepare` (losses and steps: `tkre_jax.train.pretrain`).

Start order: this workdir's checkpoint -> `--init_from` (scl takes the encoder and MLM head of an
mslm workdir) -> the HF checkpoint. SCL anchors start from the encoder's mean-pooled embedding of
"name: description" (the relation schema, e.g. FewRel's pid2name) tokenized with the corpus
tokenizer, or of the label's words when there is no schema entry (`scl.anchor_init="text"`).

Workdir: `run.json` + `tokenizer/`, `checkpoints/` (resume), `best/` (the final parameters, tree
`{"encoder", "mlm_head"[, "projection", "anchors"]}`, which the next stage's `--init_from`
restores), `metrics.jsonl`, `summary.json`.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from tkre_jax.data import pipeline, prepare
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.train import loading, pretrain, runtime, trainer
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)


def init_anchors(config: ml_collections.ConfigDict, model: runtime.ShardedModel,
                 label_map: Mapping[str, int], tokenizer) -> dict:
  """Sets the relation anchors to the encoder's embedding of each relation's text (`scl.anchor_init
  = "text"`, see `pretrain.relation_texts`), with the encoder currently in `model.params`.

  Returns:
    the counts of `relation_texts` (all `random` when `anchor_init == "random"`).
  """
  if config.scl.anchor_init == "random":
    return {"schema": 0, "label_words": 0, "random": len(label_map)}
  texts, counts = pretrain.relation_texts(label_map, prepare.read_schema(config))
  todo = [i for i, t in enumerate(texts) if t is not None]
  if not todo:
    return counts
  emb = pretrain.encode_texts(model.graphdef, model.params, tokenizer, [texts[i] for i in todo])
  current = np.array(jax.device_get(model.params["anchors"]["anchors"][...]), np.float32)
  current[np.asarray(todo)] = emb
  runtime.put_subtree(model.params, ("anchors",), {"anchors": current}, model.shardings)
  return counts


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mesh,
        init_from: str = "", **_) -> dict:
  """Runs (or resumes) the `mslm` or `scl` stage; returns the summary written to
  `<workdir>/summary.json`.

  Raises:
    ValueError: bad config fields, a batch size not divisible by the data-parallel size, or no mask
      token (all before anything is written).
    KeyError: the prepared directory has no `config.<stage>.split` split.
    workdir.MismatchError: `init_from` or an existing workdir describes another model.
    trainer.NonFiniteError: a non-finite loss or gradient norm.
  """
  pretrain.validate_section(config, stage)
  t_start = time.time()
  sec = config[stage]
  prep_dir, meta = loading.prepared(config)
  if sec.split not in meta["splits"]:
    reason = meta.get("corpus", {}).get("reason", "")
    raise KeyError(f"{prep_dir}: no split {sec.split!r} to pre-train on (splits: "
                   f"{sorted(meta['splits'])}){'; ' + reason if reason else ''}. Run prepare with "
                   "config.data.edkg_file / scdg_file present (config.data.corpus='require'), or set "
                   f"--config.{stage}.split=train")
  cfg = pretrain.step_config(config, meta, stage)
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if sec.batch_size % n_data:
    raise ValueError(f"config.{stage}.batch_size ({sec.batch_size}) must be a multiple of the "
                     f"data-parallel size data*fsdp = {n_data}")
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

  def on_fresh_start(model, loaded):
    if stage != "scl":
      return {}
    anchors = ({"restored": len(label_map)} if "anchors" in loaded
               else init_anchors(config, model, label_map, tokenizer))
    return {"anchors_init": anchors}

  task = trainer.TrainTask(
      stage=stage, section=sec, seed=config.seed, salt=pretrain.STAGE_SALT[stage],
      total_steps=total_steps,
      build=pretrain.pretrain_builder(enc_cfg, num_relations=len(label_map) if stage == "scl" else 0,
                                      proj_dim=config.scl.proj_dim if stage == "scl" else 0,
                                      seed=config.seed),
      loss_fn=lambda graphdef: pretrain.LOSSES[stage](graphdef, cfg),
      # The corpus streams from disk (per-host shards, seeded window shuffle, length buckets):
      # step s is a pure function of (seed, s), so a resumed run reads on where it stopped.
      batches=lambda start: pipeline.pretrain_batches(prep_dir, sec.split,
                                                      global_batch_size=sec.batch_size,
                                                      seed=config.seed, start_step=start,
                                                      length_multiple=sec.length_multiple),
      global_batches=False,
      init_weights=lambda model: loading.init_weights(config, model, init_from, info),
      on_fresh_start=on_fresh_start,
      log_keys=("mslm_loss", "scl_loss", "mlm_accuracy") if stage == "scl" else ("mlm_accuracy",),
      nan_at_step=config.debug.nan_at_step)
  rules = sharding_lib.RULES[config.mesh.rules]
  result = trainer.train(task, mesh, workdir, rules)
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
      "corpus": {k: corpus_info[k] for k in ("by_kind", "num_instances") if k in corpus_info},
      "batch_size": int(sec.batch_size),
      "epochs": round(total_steps * sec.batch_size / num_rows, 2),
      "num_params": runtime.count_params(result.model.params),
      "first_logged": history[0] if history else {},
      "last_logged": history[-1] if history else {},
      "step_seconds": result.step_seconds,
      "tokens_per_second": result.tokens_per_second,
      "compile_seconds": result.compile_seconds,
      "seconds": {"total": round(time.time() - t_start, 1), "train": result.train_seconds},
      "mesh": dict(mesh.shape),
      **result.extra,
  }
  runtime.write_summary(workdir, summary)
  log.info("%s: done, %d steps in %.0f s (%s s/step after compilation); best/ holds the final "
           "parameters", stage, total_steps - result.start_step, result.train_seconds,
           result.step_seconds)
  return summary


__all__ = ["init_anchors", "run"]
