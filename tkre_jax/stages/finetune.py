"""The finetune stage (see `tkre_jax.train.finetune`)."""

from __future__ import annotations


def run(stage, config, workdir, *, mesh, init_from="", parallelism="jit", **_) -> dict:
  del stage
  from tkre_jax.train import finetune
  workdir.mkdir(parents=True, exist_ok=True)
  return finetune.run_finetune(config, workdir, mesh, init_from=init_from, parallelism=parallelism)
