"""The eval stage: restores the selected model of a finetune workdir and scores every labelled split.

The model is rebuilt from the finetune workdir alone (`--init_from`): its `run.json` gives the
encoder shape, label map, config and prepared data, and `best/` the parameters, so no `--config`
flag is needed. `--config.data.prepared_dir` may point at another prepared dataset with the same
label map and tokenizer (e.g. a new test set); anything else in the command's config is ignored,
since the checkpoint fixes it.

Besides `summary.json` it writes, per split scored: `predictions.jsonl` (one line per instance:
`split`, `id` (its source), `gold`, `predicted`, `probability` of the prediction, and `gold_name` /
`predicted_name` when the schema names the relations), a per-relation precision / recall / F1 table
in `report.md`, and `confusion_<split>.png` (`tkre_jax.eval.report`; the no-relation class handled
as in micro-F1; relations shown as `P26 (spouse)` when the schema names them).
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Mapping, Optional

import ml_collections
import numpy as np

from tkre_jax import config as config_lib
from tkre_jax.data import dataset, preparation
from tkre_jax.data.inverses import SWAP_SUFFIX
from tkre_jax.eval import metrics as metrics_lib
from tkre_jax.eval import report
from tkre_jax.infer import extractor
from tkre_jax.llm.cache import atomic_write_jsonl, atomic_write_text
from tkre_jax.parallel.mesh import is_primary
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.train import loading, runtime
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)


def saved_config(info: dict, command_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (`config.from_saved`: older layouts converted), with
  the command's `data.prepared_dir` when set."""
  config = config_lib.from_saved(info["config"])
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
  rules_name = config.mesh.rules
  config = saved_config(info, config)
  prep_dir, meta = loading.prepared(config)
  tokenizer = loading.data_tokenizer(meta, config)
  data_side = {"label_map": meta["label_map"],
               "tokenizer_sha256": workdir_lib.tokenizer_fingerprint(tokenizer)}
  workdir_lib.check_compatible(data_side, info, f"the model in {ckpt_dir}",
                               what=f"eval on {prep_dir}", ours_name=f"the prepared data {prep_dir}")
  label_map = info["label_map"]
  tc = config.train
  restored = extractor.restore_classifier(ckpt_dir, mesh, rules_name)
  best_meta = restored.best_meta
  predict_step = classifier_lib.compiled_predict_step(restored.model, mesh)
  result, rows, tables, split_seconds, check = {}, [], [], {}, None
  names = sorted(label_map, key=label_map.get)
  # Names from the finetune run (run.json), else from the prepared data or the schema file.
  rel_names = info.get("relation_names") or preparation.names_of(meta, config)
  no_rel = metrics_lib.find_no_relation_id(label_map)
  for name in ("dev", "test"):
    if name in meta["splits"]:
      t_split = time.time()
      arrays = dataset.load_arrays(prep_dir, name)
      logits = classifier_lib.predict(predict_step, restored.params, arrays, tc.eval_batch_size,
                                    mesh, tc.length_multiple, desc=f"eval {name}")
      result[name] = classifier_lib.scores(logits, arrays["label"], label_map)
      split_seconds[name] = round(time.time() - t_split, 1)  # reading and scoring the split
      log.info("eval %s: accuracy %.4f, micro-F1 %.4f, macro-F1 %.4f (%d instances)", name,
               result[name]["accuracy"], result[name]["micro_f1"], result[name]["macro_f1"],
               result[name]["num_examples"])
      if f"{name}{SWAP_SUFFIX}" in meta["splits"]:  # the direction metric (relation inverses)
        result[name]["direction"] = classifier_lib.direction(
            predict_step, restored.params, logits, arrays,
            dataset.load_arrays(prep_dir, f"{name}{SWAP_SUFFIX}"), meta, tc.eval_batch_size, mesh,
            tc.length_multiple, desc=f"eval {name}{SWAP_SUFFIX}")
        tables.append(report.direction_table(result[name]["direction"], title=name,
                                             relation_names=rel_names))
        d = result[name]["direction"]
        log.info("eval %s: swap accuracy %.4f (%d swapped rows), %d direction-only errors of %d",
                 name, d["swap_accuracy"], d["swap_rows"], d["direction_errors"], d["errors"])
      if name == "dev":
        check = selection_check(result[name], best_meta, prep_dir, info)
      rows += prediction_rows(name, arrays, logits, names, rel_names)
      pred = logits.argmax(-1)
      tables.append(report.markdown_table(pred, arrays["label"], names, no_rel, title=name,
                                          relation_names=rel_names))
      if is_primary():
        report.plot_confusion(pred, arrays["label"], names, workdir / f"confusion_{name}.png",
                              no_rel, title=f"{name}: {ckpt_dir.name}", relation_names=rel_names)
  workdir.mkdir(parents=True, exist_ok=True)
  if is_primary():
    atomic_write_jsonl(workdir / "predictions.jsonl", rows)
    atomic_write_text(workdir / "report.md", f"# Per-relation results of {ckpt_dir}\n\n"
                      + "\n".join(tables))
  summary = {"stage": "eval", "steps": best_meta.get("step"),
             "checkpoint": str(ckpt_dir.resolve() / "best"), "prepared_dir": str(prep_dir),
             "selected_epoch": best_meta.get("epoch"), "metrics": result,
             "seconds": round(time.time() - t0, 1), "split_seconds": split_seconds,
             **({"dev_as_selected": check} if check is not None else {})}
  runtime.write_summary(workdir, summary)
  return summary


_SCORE_KEYS = ("accuracy", "micro_f1", "macro_f1", "num_examples")


def selection_check(dev: dict, best_meta: dict, prep_dir: pathlib.Path, info: dict):
  """Whether the restored model's dev scores equal those model selection measured on the same
  parameters and the same prepared data (the `best/` meta): True / False (logged as a warning), or
  None when there is nothing to compare (another prepared dataset, no dev scores in the meta)."""
  selected = best_meta.get("dev")
  trained_on = pathlib.Path(info.get("prepared_dir") or "").resolve()
  same_data = trained_on == pathlib.Path(prep_dir).resolve()
  if not selected or not same_data:
    return None
  same = all(dev.get(k) == selected.get(k) for k in _SCORE_KEYS)
  if same:
    log.info("eval dev: the restored model reproduces model selection's dev scores exactly")
  else:
    log.warning("eval dev: the restored model's dev scores %s differ from those model selection "
                "measured %s", {k: dev.get(k) for k in _SCORE_KEYS},
                {k: selected.get(k) for k in _SCORE_KEYS})
  return same


def prediction_rows(split: str, arrays: dict, logits: np.ndarray, names: list[str],
                    relation_names: Optional[Mapping[str, str]] = None) -> list[dict]:
  """`predictions.jsonl` rows of one split: split, id (the instance's source), gold, predicted,
  probability (softmax of the predicted class); `gold_name` / `predicted_name` for relations that
  `relation_names` (id -> schema name) names."""
  probs = classifier_lib.probabilities(logits)
  pred = logits.argmax(-1)
  relation_names = relation_names or {}
  rows = []
  for i in range(len(pred)):
    gold, predicted = names[int(arrays["label"][i])], names[int(pred[i])]
    row = {"split": split, "id": str(arrays["source"][i]), "gold": gold, "predicted": predicted,
           "probability": round(float(probs[i, pred[i]]), 6)}
    if gold in relation_names:
      row["gold_name"] = relation_names[gold]
    if predicted in relation_names:
      row["predicted_name"] = relation_names[predicted]
    rows.append(row)
  return rows
