"""The sacon stage: SaCon relation-aware pre-training (`tkre_jax/tasks/label_contrastive.py`) on labelled
sentences of relations disjoint from the evaluated ones, through the shared trainer.

  python -m tkre_jax.main --stage=sacon --workdir=runs/sacon
  python -m tkre_jax.main --stage=finetune --init_from=runs/sacon ...   (or mslm, scl, episodic,
                                                                       episodes)

Data: `config.sacon.train_file` (FewRel format; default the 64 FewRel 1.0 training relations) with
names and descriptions from `config.sacon.schema_file`. Before anything is written the stage
refuses relations shared with the relations a run will be evaluated on: those of
`config.episodes.eval_file` (val_wiki by default) and, when set, of `config.data.prepared_dir`.
The workdir's `run.json` records the pre-training relations, and every later stage that starts from
it (directly or along a chain) refuses to evaluate on one of them (`workdir.check_compatible`).

Start: `--init_from` or the HF checkpoint; the label encoder starts as a copy of the sentence
encoder. When the starting weights have no MLM head (all-MiniLM-L6-v2), the heads first train alone
(encoders frozen) in `<workdir>/head_warmup/`. The final parameters (`encoder`, `mlm_head`,
`label_encoder`, `label_mlm_head`, `logit_scale`) go to `best/`; later stages take `encoder` (and
`mlm_head` where they have one); `finetune --config.train.head_init=labels` and the episodes'
label prototypes read the label encoder.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from tkre_jax import config as config_lib
from tkre_jax.data import readers
from tkre_jax.data import episode_sampler as episodes_lib
from tkre_jax.data import features as features_lib
from tkre_jax.model import hub
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks import prototypical as prototypical_lib
from tkre_jax.tasks import label_contrastive as sacon_lib
from tkre_jax.train import loading, runtime, trainer
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)

WARMUP_DIR = "head_warmup"
SALT = 7
WARMUP_SALT = 8


def evaluated_relations(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """The relations runs of this config are evaluated on, by source: `config.episodes.eval_file`
  (when it exists) and the prepared data of `config.data.prepared_dir` (when set)."""
  out: dict[str, list[str]] = {}
  eval_path = config_lib.resolve_path(config, config.episodes.eval_file)
  if config.episodes.eval_file and eval_path.is_file():
    out[str(eval_path)] = list(readers.read_fewrel(eval_path))
  if config.data.prepared_dir:
    prep_dir, meta = loading.prepared(config)
    out[str(prep_dir)] = list(meta["label_map"])
  return out


def copy_towers(model: runtime.ShardedModel, loaded: list) -> list:
  """Starts E_l (and its MLM head) as a copy of E_s (and its head) unless they were loaded.
  Returns the names copied."""
  copied = []
  for src, dst in sacon_lib.TOWER_PARAMS:
    if dst in model.params and dst not in loaded and src in loaded:
      # New buffers: the two towers must not share one (the train step donates both).
      values = jax.tree.map(lambda x: x.copy(), nnx.to_pure_dict(model.params[src]))
      runtime.put_subtree(model.params, (dst,), values, model.shardings)
      copied.append(dst)
  return copied


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mesh,
        init_from: str = "", **_) -> dict:
  """Trains (or resumes) SaCon pre-training; returns the summary (also `summary.json`).

  Raises:
    FileNotFoundError: the training file is missing.
    DataError: bad records; pre-training relations shared with evaluated ones (named); a relation
      with fewer sentences than `sentences_per_relation`.
    workdir.MismatchError: `init_from` or an existing workdir describes another model.
    trainer.NonFiniteError: a non-finite loss or gradient norm.
  """
  t_start = time.time()
  sec = config.sacon
  rules = sharding_lib.RULES[config.mesh.rules]
  train_path = config_lib.resolve_path(config, sec.train_file)
  if not train_path.is_file():
    raise FileNotFoundError(f"sacon training file not found: {train_path} "
                            "(--config.sacon.train_file, FewRel format)")
  pool = episodes_lib.flatten(readers.read_fewrel(train_path))
  evaluated = evaluated_relations(config)
  for name, relations in evaluated.items():
    episodes_lib.check_disjoint(pool.relations, relations, train_name=f"sacon data {train_path}",
                                eval_name=f"the evaluated relations of {name}")
  eval_relations = sorted({r for rels in evaluated.values() for r in rels})
  schema_path = config_lib.resolve_path(config, sec.schema_file) if sec.schema_file else None
  schema = readers.read_pid2name(schema_path) if schema_path and schema_path.is_file() else None
  if schema is None:
    log.warning("sacon: no schema file (%s): labels are the relation ids' words",
                sec.schema_file or "config.sacon.schema_file=''")

  if init_from:
    enc_cfg = workdir_lib.encoder_config(workdir_lib.read(pathlib.Path(init_from)),
                                         config.model.dtype)
    tokenizer = workdir_lib.load_tokenizer(pathlib.Path(init_from))
  else:
    enc_cfg = loading.encoder_config(config)
    tokenizer = hub.load_tokenizer(hub.model_dir(config.model.hf_dir))
  if tokenizer.mask_token_id is None or tokenizer.unk_token is None:
    raise ValueError("sacon needs a tokenizer with a mask token and an unknown token (the blank)")
  n_shards = prototypical_lib.round_up(1, mesh)
  u, m = int(sec.relations_per_batch), int(sec.sentences_per_relation)
  rows, label_rows = prototypical_lib.round_up(u * m, mesh), prototypical_lib.round_up(u, mesh)
  label_map = {r: i for i, r in enumerate(pool.relations)}
  fcfg = features_lib.FeatureConfig(max_seq_len=config.data.max_seq_len, typed_markers=False)
  info = workdir_lib.describe(stage, config, label_map=label_map, enc_config=enc_cfg,
                              tokenizer=tokenizer, prepared_dir="", init_from=init_from,
                              features={"max_seq_len": fcfg.max_seq_len, "typed_markers": False},
                              pretrain_relations=pool.relations, eval_relations=eval_relations)
  if init_from and (pathlib.Path(init_from) / workdir_lib.RUN_FILE).is_file():
    workdir_lib.check_compatible(info, workdir_lib.read(pathlib.Path(init_from)),
                                 f"--init_from={init_from}", what="--init_from", labels=False)
  # Every relation must fill a batch row group; fails here, before anything is written.
  next(sacon_lib.sacon_batches(
      {k: np.zeros((len(pool.instances), 1), np.int32) for k in sacon_lib.SENTENCE_KEYS},
      {k: np.zeros((len(pool.relations), 1), np.int32) for k in sacon_lib.LABEL_KEYS}, pool,
      relations_per_batch=u, sentences_per_relation=m, seed=config.seed, start_step=0, rows=rows,
      label_rows=label_rows, length_multiple=0))
  workdir_lib.write(workdir, info, tokenizer)

  t_feat = time.time()
  blanked, blank_counts = sacon_lib.blank_entities(pool.instances, float(sec.blank_prob),
                                                   config.seed, tokenizer.unk_token)
  featurizer = features_lib.Featurizer(tokenizer, label_map, fcfg)
  arrays = featurizer(blanked)
  # The blank is never masked or predicted (it stands for the entity).
  arrays["span_ids"] = np.where(arrays["input_ids"] == tokenizer.unk_token_id, 0,
                                arrays["span_ids"]).astype(np.int32)
  texts, missing = sacon_lib.label_texts(pool.relations, schema)
  label_arrays = sacon_lib.label_features(tokenizer, texts, int(sec.label_max_len))
  log.info("sacon: %d relations, %d sentences (featurized in %.0f s; %d subject and %d object "
           "mentions blanked at p=%.2f); batches of %d relations x %d sentences; %d steps; "
           "%d evaluated relations disjoint", len(pool.relations), len(pool.instances),
           time.time() - t_feat, blank_counts["subject_blanked"], blank_counts["object_blanked"],
           sec.blank_prob, u, m, sec.steps, len(eval_relations))

  step_cfg = sacon_lib.SaconStepConfig(
      mask_token_id=int(tokenizer.mask_token_id), vocab_size=enc_cfg.vocab_size,
      max_predictions=int(sec.max_predictions), label_max_predictions=int(sec.label_max_predictions),
      mlm_prob=float(sec.mlm_prob), lambda_mlm=float(sec.lambda_mlm))
  build = sacon_lib.builder(enc_cfg, config.seed, shared_label_encoder=sec.label_encoder == "shared",
                            temperature=float(sec.temperature))

  def batches(start: int):
    return sacon_lib.sacon_batches(arrays, label_arrays, pool, relations_per_batch=u,
                                   sentences_per_relation=m, seed=config.seed, start_step=start,
                                   rows=rows, label_rows=label_rows,
                                   length_multiple=int(sec.length_multiple))

  optional = ("mlm_head", "label_encoder", "label_mlm_head", "logit_scale")

  def load_start(model):
    source, loaded = loading.init_weights(config, model, init_from, info, optional=optional)
    copied = copy_towers(model, loaded)
    return source + (f"; {', '.join(copied)} copied from the sentence tower" if copied else ""), \
        loaded + copied

  warm_params = None
  why_not = loading.head_warmup_skip_reason(config, "sacon", workdir, init_from)
  warmup = {"ran": False, "reason": why_not}
  if not why_not:
    wsec = ml_collections.ConfigDict(sec.to_dict())
    wsec.optim.learning_rate = float(sec.head_warmup_learning_rate)
    wtask = trainer.TrainTask(
        stage="sacon_head_warmup", section=wsec, seed=config.seed, salt=WARMUP_SALT,
        total_steps=int(sec.head_warmup_steps), build=build,
        loss_fn=sacon_lib.make_loss_fn(sacon_lib.SaconStepConfig(
            **{**step_cfg.__dict__, "freeze_encoders": True})),
        batches=batches, init_weights=load_start,
        frozen=("encoder", "label_encoder", "logit_scale"),
        log_keys=("mlm_accuracy", "label_mlm_accuracy"))
    wres = trainer.train(wtask, mesh, workdir / WARMUP_DIR, rules)
    wres.ckpts.close()
    warm_params = nnx.to_pure_dict(wres.model.params)
    hist = wres.history
    warmup = {"ran": True, "steps": int(sec.head_warmup_steps),
              "learning_rate": float(wsec.optim.learning_rate), "weights_from": wres.source,
              "first_logged": hist[0] if hist else {}, "last_logged": hist[-1] if hist else {},
              "seconds": wres.train_seconds}

  def init_weights(model):
    if warm_params is None:
      return load_start(model)
    return loading.put_warm_params(model, warm_params, warmup["weights_from"], warmup["steps"],
                                   workdir / WARMUP_DIR)

  task = trainer.TrainTask(
      stage="sacon", section=sec, seed=config.seed, salt=SALT, total_steps=int(sec.steps),
      build=build, loss_fn=sacon_lib.make_loss_fn(step_cfg), batches=batches,
      init_weights=init_weights,
      log_keys=("sent_loss", "label_loss", "sent_accuracy", "mlm_loss", "logit_scale"),
      nan_at_step=config.debug.nan_at_step)
  result = trainer.train(task, mesh, workdir, rules)
  result.ckpts.save_best(int(sec.steps), nnx.to_pure_dict(result.model.params),
                         {"stage": "sacon", "step": int(sec.steps)})
  result.ckpts.close()
  summary: dict[str, Any] = {
      "stage": "sacon",
      "steps": int(sec.steps),
      "start_step": result.start_step,
      "resumed": result.start_step > 0,
      "weights_from": result.source,
      "loaded": result.loaded,
      "train_file": str(train_path),
      "train_relations": len(pool.relations),
      "train_sentences": len(pool.instances),
      "eval_relations_disjoint": len(eval_relations),
      "batch": {"relations": u, "sentences_per_relation": m, "rows": rows,
                "label_rows": label_rows, "mesh_batch_shards": n_shards},
      "sentence_views": int(sec.steps) * u * m,
      "epochs": round(int(sec.steps) * u * m / len(pool.instances), 3),
      "blanking": {"prob": float(sec.blank_prob), "token": tokenizer.unk_token, **blank_counts},
      "labels": {"encoder": sec.label_encoder, "missing_from_schema": missing,
                 "schema_file": str(schema_path) if schema_path else ""},
      "head_warmup": warmup,
      **result.report(),
      "mesh": dict(mesh.shape),
      "seconds": {"total": round(time.time() - t_start, 1), "train": result.train_seconds},
  }
  runtime.write_summary(workdir, summary)
  log.info("sacon: done, %d steps in %.0f s (%s s/step after compilation); best/ holds both "
           "encoders", int(sec.steps) - result.start_step, result.train_seconds,
           result.step_seconds)
  return summary
