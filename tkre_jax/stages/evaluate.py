"""The eval stage (see `tkre_jax.train.finetune`)."""

from __future__ import annotations


def run(stage, config, workdir, *, mesh, init_from="", **_) -> dict:
  del stage
  from tkre_jax.train import finetune
  workdir.mkdir(parents=True, exist_ok=True)
  return finetune.run_eval(config, workdir, mesh, init_from=init_from)
