"""The prepare stage: raw data -> tokenized, span-annotated TFRecord shards + `meta.json`."""

from __future__ import annotations

import logging
import pathlib
import time

from tkre_jax.train import runtime

log = logging.getLogger(__name__)


def run(stage, config, workdir: pathlib.Path, **_) -> dict:
  """Featurizes the configured splits into `workdir` (see `tkre_jax.data.prepare`)."""
  del stage
  from tkre_jax.data import prepare
  t0 = time.time()
  meta = prepare.run_prepare(config, workdir)
  summary = {"stage": "prepare", "steps": 0, "prepared_dir": str(workdir.resolve()),
             "splits": {k: v["num_examples"] for k, v in meta["splits"].items()},
             "num_relations": len(meta["label_map"]), "seconds": round(time.time() - t0, 1)}
  runtime.write_summary(workdir, summary)
  log.info("prepare: wrote %s to %s", summary["splits"], workdir)
  return summary
