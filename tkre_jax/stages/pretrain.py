"""The TKRE pre-training stages `mslm` and `scl` (see `tkre_jax.train.pretrain`)."""

from __future__ import annotations


def run(stage, config, workdir, *, mesh, init_from="", **_) -> dict:
  from tkre_jax.train import pretrain
  workdir.mkdir(parents=True, exist_ok=True)
  return pretrain.run_pretrain(stage, config, workdir, mesh, init_from=init_from)
