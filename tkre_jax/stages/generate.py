"""The generate stage: EDKG explanations and SCDG synthetic instances for the K-shot training split."""

from __future__ import annotations

import pathlib

from tkre_jax import config as config_lib
from tkre_jax.train import runtime


def run(stage, config, workdir: pathlib.Path, *, llm="live", llm_batch=False, **_) -> dict:
  """EDKG explanations and SCDG synthetic instances for the K-shot training split."""
  del stage
  from tkre_jax.data import prepare
  from tkre_jax.llm import stage as llm_stage
  workdir.mkdir(parents=True, exist_ok=True)
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
