"""One function per pipeline stage; `run` dispatches on the stage name.

    generate -> prepare -> mslm -> scl -> finetune -> eval      (and bench)

Each stage reads the config, writes into its own workdir (`summary.json`, `metrics.jsonl`,
checkpoints) and takes the previous stage's workdir through `init_from`.
"""

from __future__ import annotations

import logging
import pathlib
import time

import ml_collections

from tkre_jax import config as config_lib
from tkre_jax.train import runtime

log = logging.getLogger(__name__)


def run_prepare_stage(config, workdir: pathlib.Path, **_) -> dict:
  from tkre_jax.data import prepare
  t0 = time.time()
  meta = prepare.run_prepare(config, workdir)
  summary = {"stage": "prepare", "steps": 0, "prepared_dir": str(workdir.resolve()),
             "splits": {k: v["num_examples"] for k, v in meta["splits"].items()},
             "num_relations": len(meta["label_map"]), "seconds": round(time.time() - t0, 1)}
  runtime.write_summary(workdir, summary)
  log.info("prepare: wrote %s to %s", summary["splits"], workdir)
  return summary


def run_finetune_stage(config, workdir, *, mesh, init_from="", parallelism="jit", **_) -> dict:
  from tkre_jax.train import finetune
  return finetune.run_finetune(config, workdir, mesh, init_from=init_from, parallelism=parallelism)


def run_eval_stage(config, workdir, *, mesh, init_from="", **_) -> dict:
  from tkre_jax.train import finetune
  return finetune.run_eval(config, workdir, mesh, init_from=init_from)


def run_mslm_stage(config, workdir, *, mesh, init_from="", **_) -> dict:
  from tkre_jax.train import pretrain
  return pretrain.run_mslm(config, workdir, mesh, init_from=init_from)


def run_scl_stage(config, workdir, *, mesh, init_from="", **_) -> dict:
  from tkre_jax.train import pretrain
  return pretrain.run_scl(config, workdir, mesh, init_from=init_from)


def run_generate_stage(config, workdir, *, llm="live", llm_batch=False, **_) -> dict:
  """EDKG explanations and SCDG synthetic instances for the K-shot training split."""
  from tkre_jax.data import prepare
  from tkre_jax.llm import stage as llm_stage
  data = prepare.load_splits(config)
  schema = prepare.read_schema(config) or {}
  if not schema:
    # No schema file: the relation label is its own name, with no description.
    schema = {inst.relation: (inst.relation, "") for inst in data["train"]}
  replay_files = None
  if llm == "replay":
    replay_files = {k: str(config_lib.resolve_path(config, f)) for k, f in
                    (("edkg", config.data.edkg_file), ("scdg", config.data.scdg_file)) if f}
  report = llm_stage.run_generate(data["train"], schema, data["dev"] + data["test"], config.generate,
                                  workdir, mode=llm, use_batch=llm_batch, replay_files=replay_files)
  summary = {"stage": "generate", "steps": 0, "mode": llm, "batch": llm_batch, "report": report}
  runtime.write_summary(workdir, summary)
  return summary


STAGE_FNS = {
    "generate": run_generate_stage,
    "mslm": run_mslm_stage,
    "scl": run_scl_stage,
    "prepare": run_prepare_stage,
    "finetune": run_finetune_stage,
    "eval": run_eval_stage,
}


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, **kwargs) -> dict:
  """Runs one stage.

  Raises:
    ValueError: an unknown stage, or one not available in this build.
  """
  if stage not in config_lib.STAGES:
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(config_lib.STAGES)}")
  if stage not in STAGE_FNS:
    raise ValueError(f"stage {stage!r} is not implemented yet; available: {', '.join(STAGE_FNS)}")
  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return STAGE_FNS[stage](config, workdir, **kwargs)
