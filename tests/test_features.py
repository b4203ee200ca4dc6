"""Featurizer: entity markers, span ids, marker positions, truncation that never cuts an entity."""

import numpy as np
import pytest

from tests.helpers import minilm_dir
from tkre_jax.data import features as F
from tkre_jax.data.schema import DataError, RelationInstance


@pytest.fixture(scope="module")
def tokenizer():
  from tkre_jax.data.preparation import load_tokenizer
  return load_tokenizer(minilm_dir())


def inst(tokens, subj, obj, rel="founded", st=None, ot=None):
  return RelationInstance(tuple(tokens.split()), subj, obj, rel, st, ot, source="t:0")


def test_marked_words_typed_and_untyped():
  x = inst("Bill Gates founded Microsoft in 1975", (0, 2), (3, 4), st="PERSON", ot="ORGANIZATION")
  words, roles = F.marked_words(x, typed=True)
  assert " ".join(words) == "@ * person * Bill Gates @ founded # ^ organization ^ Microsoft # in 1975"
  assert roles == [0, 0, 0, 0, 2, 2, 0, 4, 0, 0, 0, 0, 3, 0, 1, 1]
  words, roles = F.marked_words(x, typed=False)
  assert " ".join(words) == "@ Bill Gates @ founded # Microsoft # in 1975"
  # Object before subject: the relation span is still the words between them.
  y = inst("Microsoft was founded by Bill Gates .", (4, 6), (0, 1))
  words, roles = F.marked_words(y, typed=True)
  assert " ".join(words) == "# Microsoft # was founded by @ Bill Gates @ ."
  assert roles == [0, 3, 0, 4, 4, 4, 0, 2, 2, 0, 1]


def test_featurizer_spans_and_positions(tokenizer):
  x = inst("Bill Gates founded Microsoft in 1975", (0, 2), (3, 4), st="PERSON", ot="ORGANIZATION")
  f = F.Featurizer(tokenizer, {"founded": 3}, F.FeatureConfig(max_seq_len=32))([x])
  ids = f["input_ids"][0]
  toks = tokenizer.convert_ids_to_tokens(ids[f["attention_mask"][0] == 1].tolist())
  assert toks == ["[CLS]", "@", "*", "person", "*", "bill", "gates", "@", "founded", "#", "^",
                  "organization", "^", "microsoft", "#", "in", "1975", "[SEP]"]
  assert f["subj_pos"][0] == 1 and toks[f["subj_pos"][0]] == "@"
  assert f["obj_pos"][0] == 9 and toks[f["obj_pos"][0]] == "#"
  assert f["label"][0] == 3
  spans = f["span_ids"][0][: len(toks)].tolist()
  assert spans == [0, 0, 0, 0, 0, 2, 2, 0, 4, 0, 0, 0, 0, 3, 0, 1, 1, 0]
  assert f["span_ids"][0][len(toks):].sum() == 0 and f["attention_mask"][0].sum() == len(toks)
  view = F.decode_spans(tokenizer, f, 0)
  assert view["subject"] == "bill gates" and view["object"] == "microsoft" and view["relation"] == "founded"


def test_subwords_inherit_roles(tokenizer):
  x = inst("Kuala Lumpur hosts Petronas", (0, 2), (3, 4))
  f = F.Featurizer(tokenizer, {"founded": 0}, F.FeatureConfig(max_seq_len=32, typed_markers=False))([x])
  n = f["attention_mask"][0].sum()
  toks = tokenizer.convert_ids_to_tokens(f["input_ids"][0][:n].tolist())
  obj_toks = [t for t, s in zip(toks, f["span_ids"][0][:n]) if s == F.SPAN_OBJECT]
  assert "".join(t.lstrip("#") for t in obj_toks) == "petronas" and len(obj_toks) > 1


def test_truncation_keeps_both_entities(tokenizer):
  words = ["the"] * 200
  words[150], words[160] = "Alice", "Bob"
  x = inst(" ".join(words), (150, 151), (160, 161))
  stats = F.FeatureStats()
  f = F.Featurizer(tokenizer, {"founded": 0}, F.FeatureConfig(max_seq_len=32))([x], stats=stats)
  assert f["attention_mask"][0].sum() == 32  # exactly full
  assert stats.num_truncated == 1 and stats.num_relation_span_cut == 0
  view = F.decode_spans(tokenizer, f, 0)
  assert view["subject"] == "alice" and view["object"] == "bob"
  toks = tokenizer.convert_ids_to_tokens(f["input_ids"][0].tolist())
  assert toks[f["subj_pos"][0]] == "@" and toks[f["obj_pos"][0]] == "#"


def test_truncation_cuts_middle_of_relation_span(tokenizer):
  words = ["Alice"] + [f"x{i}" for i in range(100)] + ["Bob", "end"]
  x = inst(" ".join(words), (0, 1), (101, 102))
  stats = F.FeatureStats()
  f = F.Featurizer(tokenizer, {"founded": 0}, F.FeatureConfig(max_seq_len=24))([x], stats=stats)
  assert stats.num_relation_span_cut == 1
  view = F.decode_spans(tokenizer, f, 0)
  assert view["subject"] == "alice" and view["object"] == "bob"
  assert f["attention_mask"][0].sum() == 24


def test_entities_too_long_raise(tokenizer):
  x = inst(" ".join(["a"] * 30 + ["b"] * 30), (0, 30), (30, 60))
  with pytest.raises(DataError, match=r"t:0: the two entities need \d+ tokens"):
    F.Featurizer(tokenizer, {"founded": 0}, F.FeatureConfig(max_seq_len=32))([x])


def test_unknown_label(tokenizer):
  x = inst("A b C", (0, 1), (2, 3), rel="other")
  fz = F.Featurizer(tokenizer, {"founded": 0}, F.FeatureConfig(max_seq_len=16))
  with pytest.raises(DataError, match="t:0: relation 'other' is not in the label map"):
    fz([x])
  assert fz([x], allow_unknown_labels=True)["label"][0] == -1


def test_real_fewrel_every_row_well_formed(shared_data, tokenizer):
  from tkre_jax.data import readers
  data = readers.read_fewrel(shared_data / "fewrel" / "val_wiki.json")
  rows = [i for r in list(data)[:4] for i in data[r][:50]]
  f = F.Featurizer(tokenizer, {r: j for j, r in enumerate(data)}, F.FeatureConfig(max_seq_len=128))(rows)
  ids = f["input_ids"]
  n = len(rows)
  assert (ids[np.arange(n), f["subj_pos"]] == tokenizer.convert_tokens_to_ids("@")).all()
  assert (ids[np.arange(n), f["obj_pos"]] == tokenizer.convert_tokens_to_ids("#")).all()
  assert ((f["span_ids"] == F.SPAN_SUBJECT).sum(1) > 0).all()
  assert ((f["span_ids"] == F.SPAN_OBJECT).sum(1) > 0).all()
  # Marker tokens and padding are never maskable.
  assert (f["span_ids"][np.arange(n), f["subj_pos"]] == 0).all()
  assert (f["span_ids"][f["attention_mask"] == 0] == 0).all()
