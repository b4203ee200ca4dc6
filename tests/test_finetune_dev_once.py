"""finetune scores the selected model on dev once: the final dev metrics are the ones model selection
measured on those parameters, equal to a fresh evaluation of `best/`, without a second dev pass."""

from __future__ import annotations

import pytest

from tests.helpers import make_tiny_fewrel, make_tiny_hf_dir
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.data import dataset
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.parallel.mesh import make_mesh
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import loading, runtime


def test_dev_is_evaluated_once_and_matches_a_fresh_evaluation(shared_data, tmp_path, monkeypatch):
  data_dir = make_tiny_fewrel(shared_data, tmp_path / "data", relations=4, per_relation=12,
                              train=4, dev=4)
  c = config_lib.base_config()
  c.data.update(data_dir=str(data_dir), k=4, max_seq_len=64,
                prepared_dir=str(tmp_path / "prepared"))
  c.model.hf_dir = str(make_tiny_hf_dir(tmp_path / "tiny_bert"))
  c.train.update(epochs=4, batch_size=8, eval_batch_size=16, learning_rate=1e-2,
                 eval_every_epochs=2, checkpoint_every_seconds=0)
  stages.run("prepare", c, tmp_path / "prepared")
  sizes = dataset.split_sizes(tmp_path / "prepared")
  seen = []
  evaluate = classifier_lib.evaluate

  def counting(predict_fn, params, arrays, *args, **kw):
    seen.append(len(arrays["label"]))
    return evaluate(predict_fn, params, arrays, *args, **kw)

  monkeypatch.setattr(classifier_lib, "evaluate", counting)
  mesh = make_mesh("cpu")
  summary = stages.run("finetune", c, tmp_path / "ft", mesh=mesh)
  # model selection after epochs 2 and 4 (dev), then test only
  assert seen == [sizes["dev"], sizes["dev"], sizes["test"]]
  assert summary["metrics"]["dev"]["num_examples"] == sizes["dev"] == 16

  # the reported dev scores are those of the parameters in best/
  meta = dataset.read_meta(tmp_path / "prepared")
  build = classifier_lib.classifier_builder(loading.encoder_config(c, meta), len(meta["label_map"]),
                                          c.model.dropout, c.seed)
  abstract = runtime.create_abstract(build, mesh, sharding_lib.RULES["dp"])
  ckpts = ckpt_lib.StageCheckpoints(tmp_path / "ft")
  params, _ = ckpts.restore_best(runtime.abstract_with_shardings(abstract.params,
                                                                 abstract.shardings))
  ckpts.close()
  fresh = evaluate(classifier_lib.compiled_predict_step(abstract, mesh), params,
                   dataset.load_arrays(tmp_path / "prepared", "dev"), meta["label_map"],
                   16, mesh, c.train.length_multiple)
  for key in ("accuracy", "micro_f1", "macro_f1"):
    assert summary["metrics"]["dev"][key] == pytest.approx(fresh[key], abs=1e-9)


def test_dev_only_final_eval_reads_no_test_and_restores_nothing(shared_data, tmp_path, monkeypatch):
  """With final_eval_splits=dev (what quickstart runs; eval scores test later) finetune neither
  reads the test split nor restores `best/`: model selection already scored those parameters."""
  data_dir = make_tiny_fewrel(shared_data, tmp_path / "data", relations=4, per_relation=12,
                              train=4, dev=4)
  c = config_lib.base_config()
  c.data.update(data_dir=str(data_dir), k=4, max_seq_len=64,
                prepared_dir=str(tmp_path / "prepared"))
  c.model.hf_dir = str(make_tiny_hf_dir(tmp_path / "tiny_bert"))
  c.train.update(epochs=2, batch_size=8, eval_batch_size=16, learning_rate=1e-2,
                 eval_every_epochs=1, checkpoint_every_seconds=0, final_eval_splits="dev")
  stages.run("prepare", c, tmp_path / "prepared")
  read, restored = [], []
  load_arrays, restore_best = dataset.load_arrays, ckpt_lib.StageCheckpoints.restore_best
  monkeypatch.setattr(dataset, "load_arrays",
                      lambda d, split, *a, **k: read.append(split) or load_arrays(d, split, *a, **k))
  monkeypatch.setattr(ckpt_lib.StageCheckpoints, "restore_best",
                      lambda self, *a, **k: restored.append(1) or restore_best(self, *a, **k))
  summary = stages.run("finetune", c, tmp_path / "ft", mesh=make_mesh("cpu"))
  assert sorted(read) == ["dev", "train"] and restored == []
  assert set(summary["metrics"]) == {"dev"} and summary["metrics"]["dev"]["num_examples"] == 16
  # the reported dev scores are those of the selected (best dev) evaluation
  rows = [r for r in runtime.MetricsWriter(tmp_path / "ft").records() if "dev_micro_f1" in r]
  best = max(rows, key=lambda r: r["dev_micro_f1"])
  assert summary["metrics"]["dev"]["micro_f1"] == best["dev_micro_f1"]
  assert summary["selected_epoch"] == best["epoch"]
