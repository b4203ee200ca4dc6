"""The predict stage: relations of new text with the classifier of a finetune workdir.

    python -m tkre_jax.main --stage=predict --init_from=runs/fewrel/finetune \
        --input=in.jsonl --output=out.jsonl [--top_k=3] [--threshold=0.5]

The input is JSON lines of prediction records (`{"text", "subject", "object"}`, see
`tkre_jax.data.predict_input`), or a TACRED-format (TACRED, Wiki80) or FewRel file. The output has
one line per input record, in order: `{"line", "id", "relation", "probability", "top_k", "gold"}`
(with `relation_name` when the training schema names the relation), or `{"line", "id", "error"}`
for a record that cannot be predicted (the others are still predicted). Records whose gold
relation is not in the model's label map are warned about and counted
(`records.gold_not_in_label_map` in the summary; the rows say `"gold_in_label_map": false`). It is written atomically (a temporary file renamed), and `--workdir`, when given, gets
a `summary.json` with the counts and the throughput.
"""

from __future__ import annotations

import collections
import logging
import pathlib
import time
from typing import Optional

from tkre_jax.data.predict_input import read_input
from tkre_jax.infer.extractor import RelationExtractor
from tkre_jax.llm.cache import atomic_write_jsonl
from tkre_jax.train import runtime

log = logging.getLogger(__name__)


def run(stage, config, workdir: Optional[pathlib.Path], *, mesh, init_from: str = "",
        input_path: str = "", output_path: str = "", top_k: int = 3,
        threshold: Optional[float] = None, **_) -> dict:
  """Predicts every record of `input_path` into `output_path`; returns the summary.

  Raises:
    ValueError: a missing flag, a threshold without a no-relation class, `--top_k` < 1.
    FileNotFoundError: the workdir's files or the input are missing.
    DataError: the input cannot be read or has an unknown format (a bad record is not an error).
  """
  del stage, config
  for flag, value in (("--init_from", init_from), ("--input", input_path),
                      ("--output", output_path)):
    if not value:
      raise ValueError(f"--stage=predict needs {flag} (usage: --stage=predict "
                       "--init_from=FINETUNE_WORKDIR --input=IN.jsonl --output=OUT.jsonl)")
  t0 = time.time()
  fmt, items = read_input(input_path)
  rex = RelationExtractor.from_workdir(init_from, mesh=mesh)
  t_pred = time.time()
  rows = rex.predict_items(items, top_k=top_k, threshold=threshold)
  pred_seconds = time.time() - t_pred
  atomic_write_jsonl(pathlib.Path(output_path), rows)
  errors = [r for r in rows if "error" in r]
  for r in errors[:5]:
    log.warning("predict: record %s (line %s): %s", r.get("id", "?"), r.get("line", "?"), r["error"])
  done = len(rows) - len(errors)
  gold = [r for r in rows if "relation" in r and "gold" in r]
  summary = {
      "stage": "predict", "input": str(input_path), "format": fmt, "output": str(output_path),
      "init_from": str(init_from),
      "records": {"total": len(rows), "predicted": done, "errors": len(errors),
                  "gold_not_in_label_map": sum(r.get("gold_in_label_map") is False for r in rows)},
      "relations": dict(collections.Counter(r["relation"] for r in rows if "relation" in r)
                        .most_common()),
      "records_per_second": round(done / pred_seconds, 1) if pred_seconds > 0 else None,
      "seconds": {"total": round(time.time() - t0, 1), "predict": round(pred_seconds, 1)},
  }
  if gold:  # every record with a gold relation, those outside the label map (always wrong) too
    summary["accuracy_on_gold"] = sum(r["gold"] == r["relation"] for r in gold) / len(gold)
  log.info("predict: %d records, %d predicted, %d errors, %.1f records/s -> %s", len(rows), done,
           len(errors), summary["records_per_second"] or 0.0, output_path)
  if workdir:
    runtime.write_summary(workdir, summary)
  return summary
