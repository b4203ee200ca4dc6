"""Relation classification metrics.

- accuracy: fraction of instances whose predicted class equals the gold class.
- micro-F1, TACRED style (Zhang et al., 2017, "Position-aware Attention and Supervised Data Improve
  Slot Filling", the official `score` script): the no-relation class is excluded, found *by name*
  (`no_relation`, `NA`, `Other`: `tkre_jax.text.NO_RELATION_NAMES`), never assumed to be id 0:
      precision = #(pred == gold, pred != NA) / #(pred != NA)
      recall    = #(pred == gold, gold != NA) / #(gold != NA)
      micro-F1  = 2 P R / (P + R)
  Without a no-relation class micro-F1 equals accuracy.
- macro-F1: the unweighted mean over classes (the no-relation class excluded when present) of the
  per-class F1 = 2 TP / (2 TP + FP + FN); a class with no gold and no predicted instance is skipped.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from tkre_jax.text import find_no_relation


def find_no_relation_id(label_map: Mapping[str, int]) -> Optional[int]:
  """The id of the no-relation class in `label_map`, found by name (`text.find_no_relation`:
  `no_relation`, `NA` or `Other`, any case).

  Returns:
    the id, or None when no label is a no-relation name.

  Raises:
    ValueError: more than one label is a no-relation name (ambiguous).
  """
  name = find_no_relation(label_map)
  return None if name is None else int(label_map[name])


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int,
                           no_relation_id: Optional[int] = None) -> dict[str, float]:
  """Accuracy, micro-F1 (no-relation excluded) and macro-F1.

  Args:
    predictions: int[n] predicted class ids.
    labels: int[n] gold class ids.
    num_classes: number of classes C (ids are in [0, C)).
    no_relation_id: id of the no-relation class, or None.

  Returns:
    dict with `accuracy`, `micro_precision`, `micro_recall`, `micro_f1`, `macro_f1` (fractions in
    [0, 1]) and `num_examples`.

  Raises:
    ValueError: shapes differ, or ids are outside [0, num_classes).
  """
  predictions = np.asarray(predictions).astype(np.int64).ravel()
  labels = np.asarray(labels).astype(np.int64).ravel()
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
  for name, arr in (("predictions", predictions), ("labels", labels)):
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
      raise ValueError(f"{name} hold ids outside [0, {num_classes})")
  n = int(labels.size)
  correct = predictions == labels
  accuracy = float(correct.mean()) if n else 0.0

  if no_relation_id is None:
    pred_pos = np.ones(n, bool)
    gold_pos = np.ones(n, bool)
  else:
    pred_pos = predictions != no_relation_id
    gold_pos = labels != no_relation_id
  tp = int(np.sum(correct & pred_pos))
  precision = tp / max(int(pred_pos.sum()), 1)
  recall = tp / max(int(gold_pos.sum()), 1)
  micro_f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0

  f1s = []
  for c in range(num_classes):
    if c == no_relation_id:
      continue
    tp_c = int(np.sum((predictions == c) & (labels == c)))
    fp_c = int(np.sum((predictions == c) & (labels != c)))
    fn_c = int(np.sum((predictions != c) & (labels == c)))
    if tp_c + fp_c + fn_c == 0:
      continue
    f1s.append(2 * tp_c / (2 * tp_c + fp_c + fn_c))
  macro_f1 = float(np.mean(f1s)) if f1s else 0.0
  return {
      "accuracy": accuracy,
      "micro_precision": float(precision),
      "micro_recall": float(recall),
      "micro_f1": float(micro_f1),
      "macro_f1": macro_f1,
      "num_examples": n,
  }


def direction_metrics(predictions: np.ndarray, labels: np.ndarray, swap_predictions: np.ndarray,
                      swap_labels: np.ndarray, inverse: Mapping[int, int],
                      names: Optional[list] = None) -> dict:
  """How well a classifier tells who is subject and who is object.

  An instance whose gold relation r has an inverse r' (`inverse[r] = r'`; `inverse[r] = r` for a
  symmetric relation) is also scored with subject and object swapped, gold r' (the `<split>_swap`
  rows, in the order of the instances they come from):

      swap accuracy = #(swapped prediction == r') / #(swapped instances)

  and on the original rows a direction-only error is a prediction that is the right relation in
  the wrong direction: pred != gold and (pred == inverse[gold] or gold == inverse[pred]).

  Args:
    predictions, labels: int[n] the split's predicted and gold ids.
    swap_predictions, swap_labels: int[m] the swapped rows' predicted and gold (inverse) ids.
    inverse: relation id -> inverse id, for the relations that have one in the label set.
    names: optional id -> name list for the per-relation keys (default: the ids as strings).

  Returns:
    `{"swap_accuracy", "swap_rows", "swap_correct", "direction_errors", "errors",
      "by_relation": {name of the ORIGINAL gold relation r: {"inverse", "swap_rows",
      "swap_correct", "swap_accuracy", "direction_errors"}}}`; `direction_errors` by relation
    counts the rows of gold r predicted as its counterpart.

  Raises:
    ValueError: shapes that differ.
  """
  pred = np.asarray(predictions, np.int64).ravel()
  gold = np.asarray(labels, np.int64).ravel()
  s_pred = np.asarray(swap_predictions, np.int64).ravel()
  s_gold = np.asarray(swap_labels, np.int64).ravel()
  if pred.shape != gold.shape or s_pred.shape != s_gold.shape:
    raise ValueError("predictions and labels (and the swapped ones) must have the same shape")
  inv = {int(k): int(v) for k, v in inverse.items()}
  name = (lambda i: str(names[i])) if names is not None else str
  # the swapped row's original relation: the r with inverse[r] == its gold (r' may be the inverse
  # of several relations, e.g. child of mother and father: count it under each such r present)
  back = {}
  for r, r_inv in inv.items():
    back.setdefault(r_inv, []).append(r)
  wrong_way = np.array([p != g and (inv.get(g) == p or inv.get(p) == g)
                        for p, g in zip(pred.tolist(), gold.tolist())], bool)
  by_rel = {}
  for r, r_inv in sorted(inv.items()):
    mine = gold == r
    by_rel[name(r)] = {"inverse": name(r_inv), "swap_rows": 0, "swap_correct": 0,
                       "swap_accuracy": None,
                       "direction_errors": int(np.sum(wrong_way & mine))}
  # the swapped rows come in the order of their originals: pair them back by gold
  originals = [g for g in gold.tolist() if g in inv]
  if len(originals) == len(s_gold) and all(inv[o] == s for o, s in zip(originals, s_gold.tolist())):
    for o, s, p in zip(originals, s_gold.tolist(), s_pred.tolist()):
      row = by_rel[name(o)]
      row["swap_rows"] += 1
      row["swap_correct"] += int(p == s)
  else:  # not paired (a subset was scored): attribute by the inverse label alone
    for s, p in zip(s_gold.tolist(), s_pred.tolist()):
      for o in back.get(s, []):
        row = by_rel[name(o)]
        row["swap_rows"] += 1
        row["swap_correct"] += int(p == s)
  for row in by_rel.values():
    if row["swap_rows"]:
      row["swap_accuracy"] = row["swap_correct"] / row["swap_rows"]
  m = int(s_gold.size)
  correct = int(np.sum(s_pred == s_gold))
  return {"swap_accuracy": correct / m if m else None, "swap_rows": m, "swap_correct": correct,
          "direction_errors": int(wrong_way.sum()), "errors": int(np.sum(pred != gold)),
          "by_relation": by_rel}
