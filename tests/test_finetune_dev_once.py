"""finetune scores the selected model on dev once: the final dev metrics are the ones model selection
measured on those parameters, equal to a fresh evaluation of `best/`, without a second dev pass.
(On conftest's shared `tiny_finetune` run: 16 epochs, dev every 4.)"""

from __future__ import annotations

import pytest

from tests.helpers import stage_mesh
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
