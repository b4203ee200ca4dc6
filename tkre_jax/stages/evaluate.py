"""The eval stage: restores the selected model of a finetune workdir and scores every labelled split.

The model is rebuilt from the finetune workdir alone (`--init_from`): its `run.json` gives the
encoder shape, label map, config and prepared data, and `best/` the parameters, so no `--config`
flag is needed. `--config.data.prepared_dir` may point at another prepared dataset with the same
label map and tokenizer (e.g. a new test set); anything else in the command's config is ignored,
since the checkpoint fixes it.
"""

from __future__ import annotations

import logging
import pathlib
import time

import ml_collections

from tkre_jax.data import dataset
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import finetune as finetune_lib
from tkre_jax.train import loading, runtime
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)


def saved_config(info: dict, command_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a workdir was trained with, with the command's `data.prepared_dir` when set."""
  config = ml_collections.ConfigDict(info["config"])
  if command_config.data.prepared_dir:
    config.data.prepared_dir = command_config.data.prepared_dir
  elif info.get("prepared_dir"):
    config.data.prepared_dir = info["prepared_dir"]
  return config


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mesh,
        init_from: str = "", **_) -> dict:
  """Evaluates the `best/` model of `init_from` (default: `workdir`) on dev and test.

  Raises:
    FileNotFoundError: no `run.json` or no `best/` checkpoint in the finetune workdir, or no
      prepared data.
    workdir.MismatchError: the prepared data has another label map or tokenizer than the model.
  """
  del stage
  t0 = time.time()
  ckpt_dir = pathlib.Path(init_from) if init_from else pathlib.Path(workdir)
  info = workdir_lib.read(ckpt_dir)
  if info.get("stage") != "finetune":
    raise ValueError(f"--init_from={ckpt_dir} is the workdir of a {info.get('stage')!r} stage; eval "
                     "restores a finetune workdir")
  config = saved_config(info, config)
  prep_dir, meta = loading.prepared(config)
  tokenizer = loading.data_tokenizer(meta, config)
  data_side = {"label_map": meta["label_map"],
               "tokenizer_sha256": workdir_lib.tokenizer_fingerprint(tokenizer)}
  workdir_lib.check_compatible(data_side, info, f"the model in {ckpt_dir}",
                               what=f"eval on {prep_dir}", ours_name=f"the prepared data {prep_dir}")
  label_map = info["label_map"]
  tc = config.train
  rules = sharding_lib.RULES[config.mesh.rules]
  enc_cfg = workdir_lib.encoder_config(info)
  abstract = runtime.create_abstract(
      finetune_lib.classifier_builder(enc_cfg, len(label_map), config.model.dropout, config.seed),
      mesh, rules)
  ckpts = ckpt_lib.StageCheckpoints(ckpt_dir, read_only=True)
  params, best_meta = ckpts.restore_best(
      runtime.abstract_with_shardings(abstract.params, abstract.shardings))
  ckpts.close()
  predict_step = finetune_lib.compiled_predict_step(abstract, mesh)
  result = {}
  for name in ("dev", "test"):
    if name in meta["splits"]:
      arrays = dataset.load_arrays(prep_dir, name)
      result[name] = finetune_lib.evaluate(predict_step, params, arrays, label_map,
                                           tc.eval_batch_size, mesh, tc.length_multiple)
      log.info("eval %s: accuracy %.4f, micro-F1 %.4f, macro-F1 %.4f (%d instances)", name,
               result[name]["accuracy"], result[name]["micro_f1"], result[name]["macro_f1"],
               result[name]["num_examples"])
  workdir.mkdir(parents=True, exist_ok=True)
  summary = {"stage": "eval", "steps": best_meta.get("step"),
             "checkpoint": str(ckpt_dir.resolve() / "best"), "prepared_dir": str(prep_dir),
             "selected_epoch": best_meta.get("epoch"), "metrics": result,
             "seconds": round(time.time() - t0, 1)}
  runtime.write_summary(workdir, summary)
  return summary
