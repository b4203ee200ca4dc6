"""Relation inverses: the declared maps (SemEval, TACRED, Wikidata, a file), the swapped copy of a
row (markers, spans, label; string and span entities), the duplicate and leakage rules of inverse
augmentation, and the direction metric against a hand count."""

import json

import numpy as np
import pytest

from tkre_jax.data import features as features_lib
from tkre_jax.data import inverses, predict_input
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.eval import metrics
from tkre_jax.model import hub

SEMEVAL = {"Cause-Effect(e1,e2)": 0, "Cause-Effect(e2,e1)": 1, "Other": 2,
           "Entity-Origin(e1,e2)": 3}
TACRED = {"per:parents": 0, "per:children": 1, "per:spouse": 2, "org:parents": 3,
          "per:title": 4, "no_relation": 5}
FEWREL = {"P25": 0, "P40": 1, "P26": 2, "P361": 3, "P177": 4}


def test_declared_inverses_in_the_label_set_and_nothing_guessed():
  # SemEval: from the label text; Other and a label whose counterpart is absent have none
  assert inverses.resolve(SEMEVAL, inverses.AUTO) == {
      "Cause-Effect(e1,e2)": "Cause-Effect(e2,e1)", "Cause-Effect(e2,e1)": "Cause-Effect(e1,e2)"}
  # TACRED: parents <-> children, spouse symmetric; org:parents' inverse (subsidiaries) is absent
  assert inverses.resolve(TACRED, inverses.AUTO) == {
      "per:parents": "per:children", "per:children": "per:parents", "per:spouse": "per:spouse"}
  # FewRel val_wiki's Wikidata labels: mother -> child (child's inverse, a parent, is not declared),
  # spouse symmetric; part of's inverse (has part) is not a label
  assert inverses.resolve(FEWREL, inverses.AUTO) == {"P25": "P40", "P26": "P26"}
  assert inverses.resolve(FEWREL, "") == {}
  assert inverses.resolve(FEWREL, {"P177": "symmetric", "P40": "P99"}) == {"P177": "P177"}
  assert inverses.directed_inverse("Other") is None
  assert inverses.directed_inverse("Message-Topic(e2,e1)") == "Message-Topic(e1,e2)"


def test_inverse_files_are_read_and_bad_ones_named(tmp_path):
  good = tmp_path / "inv.json"
  good.write_text(json.dumps({"P25": "P40", "P26": "symmetric"}))
  assert inverses.resolve(FEWREL, inverses.read_inverse_file(good)) == {"P25": "P40", "P26": "P26"}
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"P25": ["P40"]}))
  with pytest.raises(DataError, match=r"bad.json: entry 'P25'"):
    inverses.read_inverse_file(bad)
  bad.write_text("[1]")
  with pytest.raises(DataError, match="bad.json: an inverse map is a JSON object"):
    inverses.read_inverse_file(bad)


RECORDS = [  # the subject / object as strings and as character spans
    {"text": "Marie Curie was the mother of Irène Joliot-Curie .", "subject": "Irène Joliot-Curie",
     "object": "Marie Curie", "relation": "P25"},
    {"text": "Marie Curie was the mother of Irène Joliot-Curie .", "subject": {"start": 30, "end": 48},
     "object": {"start": 0, "end": 11}, "relation": "P25", "subject_type": "human"},
]


@pytest.mark.parametrize("record", RECORDS, ids=["strings", "spans"])
def test_the_swapped_row_moves_the_markers_and_takes_the_inverse_label(tiny_hf_dir, record):
  inst = predict_input.record_instance(record)
  copy = inverses.swap(inst, "P40")
  assert copy.tokens == inst.tokens and copy.subj == inst.obj and copy.obj == inst.subj
  assert copy.relation == "P40" and copy.source.endswith(inverses.SWAP_SOURCE)
  assert copy.subj_type == inst.obj_type and copy.obj_type == inst.subj_type
  tok = hub.load_tokenizer(tiny_hf_dir)
  feat = features_lib.Featurizer(tok, FEWREL, features_lib.FeatureConfig(max_seq_len=48,
                                                                         typed_markers=False))
  a, b = feat([inst]), feat([copy])
  text = lambda f: tok.decode([int(t) for t, m in zip(f["input_ids"][0], f["attention_mask"][0]) if m])  # noqa: E731
  assert text(a) == "[CLS] # marie curie # was the mother of @ irene joliot - curie @. [SEP]"
  assert text(b) == "[CLS] @ marie curie @ was the mother of # irene joliot - curie #. [SEP]"
  assert int(b["label"][0]) == FEWREL["P40"]
  # the spans are re-derived: subject and object trade their ids, the relation span stays
  sa, sb = a["span_ids"][0], b["span_ids"][0]
  assert np.array_equal(sa == features_lib.SPAN_SUBJECT, sb == features_lib.SPAN_OBJECT)
  assert np.array_equal(sa == features_lib.SPAN_OBJECT, sb == features_lib.SPAN_SUBJECT)
  assert np.array_equal(sa == features_lib.SPAN_RELATION, sb == features_lib.SPAN_RELATION)
  assert (sb == features_lib.SPAN_RELATION).sum() == 4  # "was the mother of"
  assert b["input_ids"][0][b["subj_pos"][0]] == tok.convert_tokens_to_ids("@")


def _inst(tokens, subj, obj, relation, source, kind="gold"):
  return RelationInstance(tuple(tokens.split()), subj, obj, relation, source=source, kind=kind)


def test_inverse_copies_skip_duplicates_and_evaluation_pairs():
  s1 = "Ann married Bob in Rome ."
  s2 = "Eve is the mother of Cy ."
  train = [
      _inst(s1, (0, 1), (2, 3), "P26", "t:0"),             # spouse(Ann, Bob)
      _inst(s1, (2, 3), (0, 1), "P26", "t:1"),             # spouse(Bob, Ann): already the swap of t:0
      _inst(s2, (5, 6), (0, 1), "P25", "t:2"),             # mother(Cy, Eve) -> child(Eve, Cy)
      _inst(s2, (0, 1), (5, 6), "P40", "t:3"),             # child(Eve, Cy): no declared inverse
      _inst("Dan is the mother of Fay .", (5, 6), (0, 1), "P25", "s:0", kind="scdg"),
  ]
  dev = [_inst("Dan is the mother of Fay .", (0, 1), (5, 6), "P40", "d:0")]  # the scdg copy's pair
  inv = inverses.resolve(FEWREL, inverses.AUTO)
  copies, report = inverses.inverse_copies(train, inv, dev)
  # t:0 and t:1 swap into each other (duplicates); t:2's copy equals t:3 (a duplicate); the SCDG
  # row's copy is a dev pair: nothing is added
  assert copies == [] and report["copies"] == 0
  assert report["duplicate_skipped"] == 3 and report["eval_pair_skipped"] == 1
  copies, report = inverses.inverse_copies(train[2:3] + train[4:], inv)
  assert [(c.relation, c.subj, c.obj, c.kind) for c in copies] == [
      ("P40", (0, 1), (5, 6), "gold"), ("P40", (0, 1), (5, 6), "scdg")]
  assert report["by_kind"] == {"gold": 1, "scdg": 1} and report["by_relation"] == {"P40": 2}


def test_the_direction_metric_against_a_hand_count():
  # labels: 0 mother, 1 child, 2 spouse, 3 crosses; mother -> child, spouse symmetric
  inverse = {0: 1, 2: 2}
  gold = np.array([0, 0, 0, 1, 1, 2, 2, 3])
  pred = np.array([0, 1, 1, 0, 1, 2, 0, 3])  # two mother->child and one child->mother flips
  # swapped rows: the mothers (gold child) and the spouses (gold spouse), in order
  s_gold = np.array([1, 1, 1, 2, 2])
  s_pred = np.array([1, 0, 1, 2, 3])
  d = metrics.direction_metrics(pred, gold, s_pred, s_gold, inverse,
                                ["mother", "child", "spouse", "crosses"])
  assert d["swap_rows"] == 5 and d["swap_correct"] == 3 and d["swap_accuracy"] == pytest.approx(0.6)
  assert d["errors"] == 4 and d["direction_errors"] == 3  # spouse -> mother is not one
  assert d["by_relation"]["mother"] == {"inverse": "child", "swap_rows": 3, "swap_correct": 2,
                                        "swap_accuracy": pytest.approx(2 / 3),
                                        "direction_errors": 2}
  assert d["by_relation"]["spouse"]["swap_accuracy"] == pytest.approx(0.5)
  assert d["by_relation"]["spouse"]["direction_errors"] == 0
  assert "child" not in d["by_relation"]  # no declared inverse
