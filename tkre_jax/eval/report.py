"""Per-relation results of an evaluation: a precision / recall / F1 table (markdown) and a confusion
matrix (PNG, matplotlib).

The no-relation class is handled as in micro-F1 (`tkre_jax.eval.metrics`): its row in the table is
marked "not scored" and it counts in neither the micro nor the macro row; in the confusion matrix
it is the last row and column, set apart by lines. Per relation c:

    precision = TP / (TP + FP),  recall = TP / (TP + FN),  F1 = 2 TP / (2 TP + FP + FN)

(0 when the denominator is 0), support = #(gold == c), predicted = #(pred == c).
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tkre_jax.eval.metrics import classification_metrics


def with_name(relation: str, relation_names: Optional[Mapping[str, str]] = None) -> str:
  """`"P26 (spouse)"` when the schema names the relation, else the id as it is."""
  name = (relation_names or {}).get(relation)
  return f"{relation} ({name})" if name else relation


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int64[gold, predicted] counts over classes [0, num_classes)."""
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
  return m


def per_relation(predictions: np.ndarray, labels: np.ndarray, names: Sequence[str],
                 no_relation_id: Optional[int] = None) -> list[dict]:
  """One dict per class id: `relation`, `precision`, `recall`, `f1`, `support`, `predicted`,
  `scored` (False for the no-relation class)."""
  m = confusion_matrix(predictions, labels, len(names))
  rows = []
  for c, name in enumerate(names):
    tp = int(m[c, c])
    fp, fn = int(m[:, c].sum()) - tp, int(m[c, :].sum()) - tp
    rows.append({"relation": name, "precision": tp / (tp + fp) if tp + fp else 0.0,
                 "recall": tp / (tp + fn) if tp + fn else 0.0,
                 "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
                 "support": tp + fn, "predicted": tp + fp, "scored": c != no_relation_id})
  return rows


def markdown_table(predictions: np.ndarray, labels: np.ndarray, names: Sequence[str],
                   no_relation_id: Optional[int] = None, title: str = "",
                   relation_names: Optional[Mapping[str, str]] = None) -> str:
  """The per-relation table in markdown (percentages), relations in label-map order (with their
  schema names from `relation_names`, id -> name, when given), then the micro row (no-relation
  excluded) and the macro row (the mean F1 over scored classes that occur, as
  `classification_metrics`)."""
  rows = per_relation(predictions, labels, names, no_relation_id)
  overall = classification_metrics(predictions, labels, len(names), no_relation_id)
  lines = [f"### {title}", ""] if title else []
  lines += ["| relation | precision | recall | F1 | support | predicted |",
            "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    name = with_name(r["relation"], relation_names)
    name = name if r["scored"] else f"{name} (no relation: not scored)"
    lines.append(f"| {name} | {100 * r['precision']:.2f} | {100 * r['recall']:.2f} | "
                 f"{100 * r['f1']:.2f} | {r['support']} | {r['predicted']} |")
  n = int(np.asarray(labels).size)
  lines.append(f"| **micro** | {100 * overall['micro_precision']:.2f} | "
               f"{100 * overall['micro_recall']:.2f} | {100 * overall['micro_f1']:.2f} | {n} | {n} |")
  lines.append(f"| **macro** |  |  | {100 * overall['macro_f1']:.2f} |  |  |")
  lines.append("")
  lines.append(f"accuracy {100 * overall['accuracy']:.2f} on {n} instances")
  return "\n".join(lines) + "\n"


def direction_table(direction: Mapping[str, Any], title: str,
                    relation_names: Optional[Mapping[str, str]] = None) -> str:
  """Markdown: per relation with an inverse in the label set, its inverse, the swapped rows, the
  swap accuracy and the direction-only errors (`metrics.direction_metrics`' result)."""
  acc = direction["swap_accuracy"]
  lines = [f"### {title}: relation direction", "",
           f"Swap accuracy {'–' if acc is None else f'{100 * acc:.2f}%'} over "
           f"{direction['swap_rows']} swapped rows; {direction['direction_errors']} of the "
           f"{direction['errors']} errors are the right relation in the wrong direction.", "",
           "| relation | inverse | swapped rows | swap accuracy | direction-only errors |",
           "|---|---|---|---|---|"]
  for rel, row in direction["by_relation"].items():
    a = row["swap_accuracy"]
    lines.append(f"| {with_name(rel, relation_names)} | {with_name(row['inverse'], relation_names)} "
                 f"| {row['swap_rows']} | {'–' if a is None else f'{100 * a:.2f}%'} "
                 f"| {row['direction_errors']} |")
  return "\n".join(lines) + "\n"


def plot_confusion(predictions: np.ndarray, labels: np.ndarray, names: Sequence[str],
                   path: pathlib.Path, no_relation_id: Optional[int] = None,
                   title: str = "", relation_names: Optional[Mapping[str, str]] = None
                   ) -> pathlib.Path:
  """Draws the confusion matrix (rows gold, columns predicted, counts; the no-relation class last,
  set apart by lines; ticks `"P26 (spouse)"` where `relation_names` names the relation) into the
  PNG file `path`.

  Raises:
    ModuleNotFoundError: matplotlib is not installed.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  order = [c for c in range(len(names)) if c != no_relation_id]
  if no_relation_id is not None:
    order.append(no_relation_id)
  m = confusion_matrix(predictions, labels, len(names))[np.ix_(order, order)]
  ticks = [with_name(names[c], relation_names) for c in order]
  size = max(4.0, 0.35 * len(names) + 2.0 + (1.5 if relation_names else 0.0))
  fig, ax = plt.subplots(figsize=(size + 1.0, size))
  im = ax.imshow(m, cmap="Blues")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=7)
  ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
  ax.set_xlabel("predicted")
  ax.set_ylabel("gold")
  if len(names) <= 40:
    for i in range(len(order)):
      for j in range(len(order)):
        if m[i, j]:
          ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=6,
                  color="white" if m[i, j] > m.max() / 2 else "black")
  if no_relation_id is not None:
    edge = len(order) - 1.5
    ax.axhline(edge, color="red", lw=0.8)
    ax.axvline(edge, color="red", lw=0.8)
  ax.set_title(title or "confusion matrix")
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
