"""Prediction records -> instances: span and string entity forms, every bad-record case with its
reason, the input formats (records, TACRED-format, FewRel); the per-relation report; progress lines;
TensorBoard event files and their truncation on resume."""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pytest

from tkre_jax import progress
from tkre_jax.data import predict_input
from tkre_jax.data.schema import DataError
from tkre_jax.eval import metrics, report
from tkre_jax.train import tensorboard

TEXT = "Bill Gates founded Microsoft in Albuquerque in 1975 ."


def test_span_and_string_forms_give_the_same_instance():
  by_string = predict_input.record_instance(
      {"text": TEXT, "subject": "Microsoft", "object": "Bill Gates", "subject_type": "ORG"})
  by_span = predict_input.record_instance(
      {"text": TEXT, "subject": {"start": 19, "end": 28}, "object": {"start": 0, "end": 10},
       "subject_type": "ORG"})
  assert by_string == by_span
  assert by_string.subj_text == "Microsoft" and by_string.obj_text == "Bill Gates"
  assert by_string.subj_type == "ORG" and by_string.obj_type is None


def test_whole_word_occurrences_count_first():
  inst = predict_input.record_instance(
      {"text": "Paris and the Parisians love Paris.", "subject": "Parisians", "object": "Paris."})
  assert inst.obj_text == "Paris."
  inst = predict_input.record_instance(
      {"text": "In Paris, Parisians vote.", "subject": "Paris", "object": "vote"})
  assert inst.subj_text == "Paris" and inst.tokens[:4] == ("In", "Paris", ",", "Parisians")


@pytest.mark.parametrize("record, reason", [
    ({"text": TEXT, "subject": "Steve Jobs", "object": "Microsoft"},
     "subject 'Steve Jobs' does not occur in the text"),
    ({"text": "in 1975 and in 1976", "subject": "in", "object": "1975"},
     "subject 'in' is ambiguous: it occurs 2 times (characters [0, 2), [12, 14))"),
    ({"text": TEXT, "subject": {"start": 40, "end": 99}, "object": "Microsoft"},
     f"subject span [40, 99) is out of range for a text of {len(TEXT)} characters"),
    ({"text": TEXT, "subject": {"start": 5, "end": 5}, "object": "Microsoft"},
     "subject span [5, 5) is out of range"),
    ({"text": "   ", "subject": "a", "object": "b"}, "text is empty"),
    ({"text": TEXT, "subject": "Bill Gates", "object": "Gates founded"},
     "subject [0, 10) and object [5, 18) overlap"),
    ({"text": TEXT, "subject": {"start": 0, "end": 10}, "object": {"start": 0, "end": 4}},
     "overlap"),
    ({"text": TEXT, "subject": 3, "object": "Microsoft"},
     "subject must be a string or a span {\"start\", \"end\"}, got a JSON integer"),
    ({"text": TEXT, "subject": {"start": "0", "end": 10}, "object": "Microsoft"},
     "subject.start must be an integer, got a JSON string"),
    ({"text": TEXT, "subject": {"begin": 0, "end": 10}, "object": "Microsoft"},
     "subject span must have exactly the keys 'start' and 'end'"),
    ({"text": ["Bill"], "subject": "Bill", "object": "x"}, "text must be a string, got a JSON list"),
    ({"text": TEXT, "subject": "Bill Gates", "object": "Microsoft", "subject_type": ["PER"]},
     "subject_type must be a string, got a JSON list"),
    ({"text": TEXT, "subject": "Bill Gates", "object": "Microsoft", "id": {"a": 1}},
     "id must be a string or an integer, got a JSON object"),
    ({"text": TEXT, "subj": "Bill Gates", "object": "Microsoft"}, "unknown field(s) ['subj']"),
    ({"text": TEXT, "object": "Microsoft"}, "missing field 'subject'"),
    (["not", "an", "object"], "a record must be a JSON object, got a JSON list"),
])
def test_each_bad_record_names_its_reason(record, reason):
  with pytest.raises(DataError) as e:
    predict_input.record_instance(record)
  assert reason in str(e.value)
  item = predict_input.record_item(record, 7, line=8)
  assert item.instance is None and reason in item.error and item.line == 8


def test_read_input_jsonl_keeps_going_past_bad_lines(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_text("\n".join([
      json.dumps({"text": TEXT, "subject": "Microsoft", "object": "Bill Gates", "id": "a"}),
      "{not json",
      "",
      json.dumps({"text": TEXT, "subject": "Apple", "object": "Bill Gates", "id": "b"}),
      json.dumps({"text": TEXT, "subject": "Microsoft", "object": "Albuquerque",
                  "relation": "P159"}),
  ]) + "\n")
  fmt, items = predict_input.read_input(path)
  assert fmt == "records"
  assert [(i.index, i.line, i.id) for i in items] == [(0, 1, "a"), (1, 2, None), (2, 4, "b"),
                                                     (3, 5, None)]
  assert items[0].instance is not None and items[0].error is None
  assert "invalid JSON" in items[1].error
  assert "subject 'Apple' does not occur" in items[2].error
  assert items[3].gold == "P159" and items[3].instance.source == f"{path}:5"


def test_read_input_tacred_and_fewrel(tmp_path):
  rec = {"token": ["Bill", "Gates", "founded", "Microsoft", "."], "relation": "org:founded_by",
         "subj_start": 3, "subj_end": 3, "obj_start": 0, "obj_end": 1, "subj_type": "ORGANIZATION",
         "obj_type": "PERSON"}
  bad = {**rec, "obj_end": 9}
  path = tmp_path / "tacred.json"
  path.write_text(json.dumps([rec, bad]))
  fmt, items = predict_input.read_input(path)
  assert fmt == "tacred" and items[0].gold == "org:founded_by"
  assert items[0].instance.subj_text == "Microsoft" and "out of range" in items[1].error
  fewrel = {"P112": [{"tokens": rec["token"], "h": ["Microsoft", "Q2283", [[3]]],
                      "t": ["Bill Gates", "Q5284", [[0, 1]]]}]}
  path = tmp_path / "fewrel.json"
  path.write_text(json.dumps(fewrel, indent=1))
  fmt, items = predict_input.read_input(path)
  assert fmt == "fewrel" and len(items) == 1 and items[0].gold == "P112"
  path = tmp_path / "other.jsonl"
  path.write_text(json.dumps({"sentence": "x"}) + "\n")
  with pytest.raises(DataError, match="unknown input format"):
    predict_input.read_input(path)


# ------------------------------------------------------------------------------ eval report

def test_per_relation_table_handles_no_relation_as_micro_f1(tmp_path):
  names = ["no_relation", "founded_by", "born_in"]
  gold = np.array([0, 0, 1, 1, 1, 2, 2, 0])
  pred = np.array([0, 1, 1, 1, 0, 2, 1, 0])
  rows = report.per_relation(pred, gold, names, no_relation_id=0)
  assert rows[1] == {"relation": "founded_by", "precision": 2 / 4, "recall": 2 / 3,
                     "f1": 2 * 2 / (2 * 2 + 2 + 1), "support": 3, "predicted": 4, "scored": True}
  assert rows[2]["precision"] == 1.0 and rows[2]["recall"] == 0.5 and not rows[0]["scored"]
  table = report.markdown_table(pred, gold, names, 0, title="test")
  overall = metrics.classification_metrics(pred, gold, 3, 0)
  assert f"| **micro** | {100 * overall['micro_precision']:.2f} |" in table
  assert f"| **macro** |  |  | {100 * overall['macro_f1']:.2f} |" in table
  assert "| no_relation (no relation: not scored) |" in table
  png = report.plot_confusion(pred, gold, names, tmp_path / "c.png", 0)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  np.testing.assert_array_equal(report.confusion_matrix(pred, gold, 3),
                                [[2, 1, 0], [1, 2, 0], [0, 1, 1]])


# ------------------------------------------------------------------------------ progress

def test_progress_logs_rate_and_eta_off_a_terminal(caplog):
  assert progress.format_eta(3725.4) == "1:02:05" and progress.format_eta(None) == "?"
  with caplog.at_level(logging.INFO, logger="tkre_jax.progress"):
    with progress.Progress(10, "predict", "record", log_every_seconds=0.0, tty=False) as bar:
      for _ in range(4):
        bar.update(2)
      assert bar.eta_seconds() is not None and bar.eta_seconds() >= 0
      bar.update(2)
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0].startswith("predict: 2/10 records (20.0%), ") and "ETA " in lines[0]
  assert len(lines) == 5 and lines[-1].startswith("predict: done, 10 records in ")
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="tkre_jax.progress"):
    with progress.Progress(10, "quick", tty=False) as bar:  # 30 s cadence: a short loop is silent
      bar.update(10)
  assert not caplog.records


# ------------------------------------------------------------------------------ TensorBoard

def test_event_files_hold_each_step_once_after_a_resume(tmp_path):
  w = tensorboard.EventWriter(tmp_path)
  for step in range(1, 8):
    w.write({"stage": "mslm", "step": step, "loss": 1.0 / step, "learning_rate": 1e-4,
             "selected": True, "note": "x"})
  w.close()
  assert w.truncate_after(4) == 2 * 3
  w = tensorboard.EventWriter(tmp_path)
  for step in range(5, 9):
    w.write({"stage": "mslm", "step": step, "loss": 2.0 / step, "learning_rate": 1e-4})
  w.close()
  scalars = tensorboard.read_scalars(tmp_path / tensorboard.TB_DIR)
  assert sorted(scalars) == ["mslm/learning_rate", "mslm/loss"]
  loss = scalars["mslm/loss"]
  assert [s for s, _ in loss] == list(range(1, 9))
  np.testing.assert_allclose([v for _, v in loss],
                             [1.0 / s for s in range(1, 5)] + [2.0 / s for s in range(5, 9)],
                             rtol=1e-6)
  # A record torn by a kill in the middle of a write is dropped on the next resume.
  (path,) = tensorboard.EventWriter(tmp_path).files()[-1:]
  path.write_bytes(path.read_bytes() + b"\x10\x00\x00\x00\x00")
  assert tensorboard.EventWriter(tmp_path).truncate_after(6) == 2 * 2
  assert [s for s, _ in tensorboard.read_scalars(tmp_path / tensorboard.TB_DIR)["mslm/loss"]] == \
      list(range(1, 7))


def test_event_files_sort_by_time_then_writer_number():
  # A process's 10th writer of a second sorts after its 9th (by name it would come first); a host
  # name with dots is fine.
  names = ["events.out.tfevents.100.vm.5.10.v2", "events.out.tfevents.100.vm.5.9.v2",
           "events.out.tfevents.99.a.b.c.7.3.v2", "events.out.tfevents.100.vm.5.0.v2"]
  order = tensorboard._event_file_order  # pylint: disable=protected-access
  got = sorted((pathlib.Path(n) for n in names), key=order)
  assert [p.name for p in got] == [names[2], names[3], names[1], names[0]]
