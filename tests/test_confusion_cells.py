"""launch/confusion_cells.py: the errors inside a group of relations, counted from predictions."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script

cells = load_script("launch/confusion_cells.py")


def _write(path, pairs, split="test"):
  path.write_text("".join(json.dumps({"split": split, "id": str(i), "gold": g, "predicted": p})
                          + "\n" for i, (g, p) in enumerate(pairs)))
  return path


def test_counts_and_table(tmp_path, capsys):
  a = _write(tmp_path / "a.jsonl", [("P26", "P40"), ("P26", "P40"), ("P25", "P40"), ("P40", "P40"),
                                    ("P361", "P40"), ("P25", "P25")])
  b = _write(tmp_path / "b.jsonl", [("P26", "P26"), ("P26", "P40"), ("P25", "P40"), ("P40", "P40"),
                                    ("P361", "P361"), ("P25", "P25")])
  got = cells.group_cells(cells.read_predictions(a, "test"), ["P26", "P25", "P40"])
  # P361 -> P40 is an error outside the group
  assert got == {"cells": {("P26", "P40"): 2, ("P25", "P40"): 1}, "group_errors": 3, "errors": 4,
                 "rows": 6}
  assert cells.main(["--names=ref,new", str(a), str(b)]) == 0
  out = capsys.readouterr().out
  assert "| P26 -> P40 | 2 | 1 |" in out
  assert "| **inside the group** | **3** | **2** (-33%) |" in out
  assert "| all errors / rows | 4 / 6 | 2 / 6 |" in out


def test_bad_input_is_named(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"split": "test", "gold": "P26", "predicted": "P40"}\n{"split": "test"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    cells.read_predictions(bad, "test")
  dev_only = _write(tmp_path / "dev.jsonl", [("P26", "P26")], split="dev")
  assert cells.main([str(dev_only)]) == 2
  assert "no row of split 'test'" in capsys.readouterr().err
