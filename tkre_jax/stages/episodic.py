"""The episodic stage: prototypical training on N-way K-shot episodes of the TRAINING relations
(`config.episodes.train_file`, FewRel format), through the shared trainer.

Each step is one episode (`config.episodic.n_way`, `k_shot`, `q_query`), sampled with the seed
(config.seed, step), so a kill resumes exactly; its loss is `losses.prototypical_loss` (Snell et
al. 2017) on the marker-state representations (`model.tasks.MarkerEncoder`). The starting encoder is
`--init_from` (e.g. an scl workdir: TKRE pre-training, then episodic training) or the HF checkpoint.
The relations of `config.episodes.eval_file` must be disjoint from the training relations (checked
first). The final parameters go to `best/`, which `--stage=episodes --init_from=<this workdir>`
evaluates.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any, Mapping

import ml_collections

from tkre_jax import config as config_lib
from tkre_jax.data import episode_sampler as episodes_lib
from tkre_jax.data import features as features_lib
from tkre_jax.data import readers
from tkre_jax.model import hub
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks import prototypical as prototypical_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import loading, runtime, trainer
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)


class SaveFinal:
  """Trainer hook: the final parameters become the selected model (`best/`)."""

  def __init__(self, total_steps: int):
    self.total_steps = total_steps

  def due(self, step: int) -> bool:
    return step == self.total_steps

  def run(self, step: int, params: Any, ckpts: ckpt_lib.StageCheckpoints) -> dict:
    ckpts.save_best(step, params, {"step": step})
    return {}

  def state(self) -> dict:
    return {}

  def load_state(self, state: Mapping[str, Any]) -> None:
    del state


def read_pools(config: ml_collections.ConfigDict, *, need_eval: bool = True
               ) -> tuple[episodes_lib.Pool, list[str]]:
  """The training pool and the evaluation relations (empty without an eval file).

  Raises:
    FileNotFoundError: a file is missing.
    DataError: bad records, or relations shared by the two files.
  """
  train_path = config_lib.resolve_path(config, config.episodes.train_file)
  if not train_path.is_file():
    raise FileNotFoundError(f"episodic training file not found: {train_path} "
                            "(--config.episodes.train_file, FewRel format)")
  pool = episodes_lib.flatten(readers.read_fewrel(train_path))
  eval_relations: list[str] = []
  eval_path = config_lib.resolve_path(config, config.episodes.eval_file)
  if config.episodes.eval_file and eval_path.is_file():
    eval_relations = list(readers.read_fewrel(eval_path))
    episodes_lib.check_disjoint(pool.relations, eval_relations, train_name=str(train_path),
                                eval_name=str(eval_path))
  elif need_eval and config.episodes.eval_file:
    log.warning("episodic: evaluation file %s not found; relation disjointness not checked",
                eval_path)
  return pool, eval_relations


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mesh,
        init_from: str = "", **_) -> dict:
  """Trains (or resumes) the marker encoder on training episodes; returns the summary.

  Raises:
    FileNotFoundError, DataError: missing or bad data; shared train / eval relations.
    workdir.MismatchError: `init_from` or an existing workdir describes another model.
    trainer.NonFiniteError: a non-finite loss or gradient norm.
  """
  t_start = time.time()
  sec = config.episodic
  rules = sharding_lib.RULES[config.mesh.rules]
  pool, eval_relations = read_pools(config)
  spec = episodes_lib.EpisodeSpec(sec.n_way, sec.k_shot, sec.q_query)
  label_map = {r: i for i, r in enumerate(pool.relations)}
  if init_from:
    theirs = workdir_lib.read(pathlib.Path(init_from))
    enc_cfg = workdir_lib.encoder_config(theirs, config.model.dtype)
    tokenizer = workdir_lib.load_tokenizer(pathlib.Path(init_from))
  else:
    enc_cfg = loading.encoder_config(config)
    tokenizer = hub.load_tokenizer(hub.model_dir(config.model.hf_dir))
  fcfg = prototypical_lib.feature_config(config, pool.instances)
  info = workdir_lib.describe(stage, config, label_map=label_map, enc_config=enc_cfg,
                              tokenizer=tokenizer, prepared_dir="", init_from=init_from,
                              features={"max_seq_len": fcfg.max_seq_len,
                                        "typed_markers": fcfg.typed_markers},
                              pretrain_relations=pool.relations, eval_relations=eval_relations)
  if init_from and (pathlib.Path(init_from) / workdir_lib.RUN_FILE).is_file():
    workdir_lib.check_compatible(info, workdir_lib.read(pathlib.Path(init_from)),
                                 f"--init_from={init_from}", what="--init_from", labels=False)
  # A pool relation with fewer than K + Q instances fails here, before anything is written.
  episodes_lib.sample_episodes(pool, spec, 1, seed=config.seed)
  workdir_lib.write(workdir, info, tokenizer)
  t_feat = time.time()
  arrays = features_lib.Featurizer(tokenizer, label_map, fcfg)(list(pool.instances))
  log.info("episodic: %d training relations, %d instances (featurized in %.0f s); %d steps of %s "
           "episodes with %d queries; %d evaluation relations disjoint", len(pool.relations),
           len(pool.instances), time.time() - t_feat, sec.steps, spec.name, spec.q_query,
           len(eval_relations))
  rows = prototypical_lib.round_up(spec.n_way * (spec.k_shot + spec.q_query), mesh)
  task = trainer.TrainTask(
      stage="episodic", section=sec, seed=config.seed, total_steps=int(sec.steps),
      build=prototypical_lib.builder(enc_cfg, config.seed),
      loss_fn=prototypical_lib.make_loss_fn(spec.n_way, config.episodes.metric),
      batches=lambda start: prototypical_lib.episode_batches(
          arrays, pool, spec, seed=config.seed, start_step=start, rows=rows,
          length_multiple=sec.length_multiple, max_seq_len=fcfg.max_seq_len),
      init_weights=lambda model: loading.init_weights(config, model, init_from, info, optional=()),
      hooks=[SaveFinal(int(sec.steps))], log_keys=("accuracy",),
      nan_at_step=config.debug.nan_at_step)
  result = trainer.train(task, mesh, workdir, rules)
  result.ckpts.close()
  hist = [r for r in result.history if "loss" in r]
  summary = {
      "stage": "episodic",
      "steps": int(sec.steps),
      "start_step": result.start_step,
      "resumed": result.start_step > 0,
      "episode": {"n_way": spec.n_way, "k_shot": spec.k_shot, "q_query": spec.q_query,
                  "metric": config.episodes.metric},
      "train_relations": len(pool.relations),
      "train_instances": len(pool.instances),
      "eval_relations_disjoint": len(eval_relations),
      "encoder_from": result.source,
      "metrics": {"first_loss": hist[0]["loss"] if hist else None,
                  "last_loss": hist[-1]["loss"] if hist else None,
                  "first_accuracy": hist[0].get("accuracy") if hist else None,
                  "last_accuracy": hist[-1].get("accuracy") if hist else None},
      "step_seconds": result.step_seconds,
      "compile_seconds": result.compile_seconds,
      "mesh": dict(mesh.shape),
      "seconds": {"total": round(time.time() - t_start, 1), "train": result.train_seconds},
  }
  runtime.write_summary(workdir, summary)
  return summary
