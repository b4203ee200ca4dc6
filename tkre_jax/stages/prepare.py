"""The prepare stage: raw data -> a prepared directory (a TFDS dataset + `meta.json`)."""

from __future__ import annotations

import logging
import pathlib
import time

from tkre_jax.train import runtime

log = logging.getLogger(__name__)


def run(stage, config, workdir: pathlib.Path, **_) -> dict:
  """Featurizes the configured splits into `workdir` (see `tkre_jax.data.preparation`).

  The inputs are read and checked, and `workdir` is checked to be absent, empty or a prepared
  directory, before anything is created; `summary.json` is written after the dataset.
  """
  del stage
  from tkre_jax.data import dataset, preparation
  t0 = time.time()
  meta = preparation.run_prepare(config, workdir)
  summary = {"stage": "prepare", "steps": 0, "prepared_dir": str(workdir.resolve()),
             "splits": dataset.split_sizes(workdir),
             "num_relations": len(meta["label_map"]), "typed_markers": meta["typed_markers"],
             # gold vs synthetic (SCDG augmentation) rows of the fine-tuning set
             "train_by_kind": meta["splits"]["train"].get("by_kind", {}),
             "augment": {k: meta["augment"][k] for k in ("augment_k", "added", "per_relation",
                                                         "relations_short")}
                        if "augment" in meta else None,
             "seconds": round(time.time() - t0, 1)}
  runtime.write_summary(workdir, summary)
  log.info("prepare: wrote %s to %s", summary["splits"], workdir)
  return summary
