"""finetune scores the selected model on dev once: the final dev metrics are the ones model selection
measured on those parameters, equal to a fresh evaluation of `best/`, without a second dev pass.
(On conftest's shared `tiny_finetune` run: 16 epochs, dev every 4.)"""

from __future__ import annotations

import pytest

from tests.helpers import stage_mesh
from tkre_jax import stages
from tkre_jax.data import dataset
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import loading, runtime

# The fresh evaluation compiles as the shared run did (XLA's optimisations off).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fewer_compiler_optimizations")]


def test_dev_is_evaluated_once_and_matches_a_fresh_evaluation(tiny_finetune):
  workdir, c, summary, seen = tiny_finetune
  prepared = c.data.prepared_dir
  sizes = dataset.split_sizes(prepared)
  # model selection after epochs 4, 8, 12 and 16 (dev), then test only
  assert seen == [sizes["dev"]] * 4 + [sizes["test"]]
  assert summary["metrics"]["dev"]["num_examples"] == sizes["dev"] == 16

  # the reported dev scores are those of the parameters in best/
  mesh = stage_mesh()
  meta = dataset.read_meta(prepared)
  build = classifier_lib.classifier_builder(loading.encoder_config(c, meta), len(meta["label_map"]),
                                          c.model.dropout, c.seed)
  abstract = runtime.create_abstract(build, mesh, sharding_lib.RULES["dp"])
  ckpts = ckpt_lib.StageCheckpoints(workdir, read_only=True)
  params, _ = ckpts.restore_best(runtime.abstract_with_shardings(abstract.params,
                                                                 abstract.shardings))
  ckpts.close()
  fresh = classifier_lib.evaluate(classifier_lib.compiled_predict_step(abstract, mesh), params,
                                  dataset.load_arrays(prepared, "dev"), meta["label_map"],
                                  16, mesh, c.train.length_multiple)
  for key in ("accuracy", "micro_f1", "macro_f1"):
    assert summary["metrics"]["dev"][key] == pytest.approx(fresh[key], abs=1e-9)


def test_dev_only_final_eval_reads_no_test_and_restores_nothing(tiny_config, tmp_path, monkeypatch):
  """With final_eval_splits=dev (what quickstart runs; eval scores test later) finetune neither
  reads the test split nor restores `best/`: model selection already scored those parameters."""
  c = tiny_config
  c.train.update(epochs=2, eval_every_epochs=1, checkpoint_every_seconds=0, final_eval_splits="dev")
  read, restored = [], []
  load_arrays, restore_best = dataset.load_arrays, ckpt_lib.StageCheckpoints.restore_best
  monkeypatch.setattr(dataset, "load_arrays",
                      lambda d, split, *a, **k: read.append(split) or load_arrays(d, split, *a, **k))
  monkeypatch.setattr(ckpt_lib.StageCheckpoints, "restore_best",
                      lambda self, *a, **k: restored.append(1) or restore_best(self, *a, **k))
  summary = stages.run("finetune", c, tmp_path / "ft", mesh=stage_mesh())
  assert sorted(read) == ["dev", "train"] and restored == []
  assert set(summary["metrics"]) == {"dev"} and summary["metrics"]["dev"]["num_examples"] == 16
  # the reported dev scores are those of the selected (best dev) evaluation
  rows = [r for r in runtime.MetricsWriter(tmp_path / "ft").records() if "dev_micro_f1" in r]
  best = max(rows, key=lambda r: r["dev_micro_f1"])
  assert summary["metrics"]["dev"]["micro_f1"] == best["dev_micro_f1"]
  assert summary["selected_epoch"] == best["epoch"]
