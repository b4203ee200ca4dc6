"""Metrics against hand-computed values."""

import numpy as np
import pytest

from tkre_jax.eval.metrics import classification_metrics, find_no_relation_id


def test_with_no_relation_class():
  # classes: 0 = per:title, 1 = no_relation, 2 = org:founded_by (no_relation is NOT id 0)
  labels = [0, 0, 1, 1, 2, 2, 1, 0]
  preds = [0, 1, 1, 2, 2, 0, 1, 0]
  m = classification_metrics(np.array(preds), np.array(labels), 3, no_relation_id=1)
  # predicted non-NA: idx 0,3,4,5,7 -> 5; correct among them: 0,4,7 -> 3 -> P = 3/5
  # gold non-NA: idx 0,1,4,5,7 -> 5; correct: 0,4,7 -> R = 3/5
  assert m["micro_precision"] == pytest.approx(0.6)
  assert m["micro_recall"] == pytest.approx(0.6)
  assert m["micro_f1"] == pytest.approx(0.6)
  assert m["accuracy"] == pytest.approx(5 / 8)
  # class 0: tp 2 (idx 0,7), fp 1 (idx 5), fn 1 (idx 1) -> F1 = 4/6
  # class 2: tp 1 (idx 4), fp 1 (idx 3), fn 1 (idx 5) -> F1 = 2/4
  assert m["macro_f1"] == pytest.approx((4 / 6 + 2 / 4) / 2)
  assert m["num_examples"] == 8


def test_without_no_relation_micro_equals_accuracy():
  labels = np.array([0, 1, 2, 2, 1])
  preds = np.array([0, 2, 2, 2, 1])
  m = classification_metrics(preds, labels, 3)
  assert m["micro_f1"] == pytest.approx(0.8) == m["accuracy"]
  # class0 F1 1; class1 tp1 fn1 -> 2/3; class2 tp2 fp1 -> 4/5
  assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 4 / 5) / 3)


def test_asymmetric_precision_recall():
  labels = np.array([1, 1, 1, 0])   # 0 = NA
  preds = np.array([1, 0, 0, 1])
  m = classification_metrics(preds, labels, 2, no_relation_id=0)
  assert m["micro_precision"] == pytest.approx(1 / 2)
  assert m["micro_recall"] == pytest.approx(1 / 3)
  assert m["micro_f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


def test_find_no_relation_by_name():
  assert find_no_relation_id({"per:title": 0, "no_relation": 5}) == 5
  assert find_no_relation_id({"Other": 2, "a": 0}) == 2
  assert find_no_relation_id({"NA": 1}) == 1
  assert find_no_relation_id({"P17": 0, "P31": 1}) is None
  with pytest.raises(ValueError, match=r"ambiguous no-relation class: labels \['NA', 'other'\]"):
    find_no_relation_id({"NA": 0, "other": 1})


def test_bad_ids():
  with pytest.raises(ValueError, match="outside"):
    classification_metrics(np.array([3]), np.array([0]), 3)
  with pytest.raises(ValueError, match="shape"):
    classification_metrics(np.array([0, 1]), np.array([0]), 3)
