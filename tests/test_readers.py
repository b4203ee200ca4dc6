"""Tests for `tkre_jax.data.readers` and `tkre_jax.data.llm_files`: the real files in
`../shared/data` and bad-input cases."""

from __future__ import annotations

import collections
import json

import pytest

from tests.conftest import require
from tkre_jax.data import llm_files, readers
from tkre_jax.data.llm_files import EdkgRecord
from tkre_jax.data.schema import DataError, RelationInstance

# ------------------------------------------------------------------------------------------
# Real data


@pytest.fixture(scope="module")
def val_wiki(shared_data):
  return readers.read_fewrel(require(shared_data / "fewrel" / "val_wiki.json"))


def test_fewrel_val_wiki_counts_and_first_record(val_wiki, shared_data):
  assert len(val_wiki) == 16
  assert {len(v) for v in val_wiki.values()} == {700}
  assert list(val_wiki)[:3] == ["P177", "P364", "P2094"]
  x = val_wiki["P177"][0]
  assert x.subj == (26, 29) and x.obj == (19, 21)
  assert x.subj_text == "Cape Girardeau Bridge"
  assert x.obj_text == "Mississippi River"
  assert x.relation == "P177" and x.kind == "gold"
  assert x.subj_type is None and x.obj_type is None
  assert x.source == f"{shared_data / 'fewrel' / 'val_wiki.json'}:P177[0]"
  # FewRel keeps whitespace-only tokens (record 1 of P177: "Wilton Bridge   was ...").
  y = val_wiki["P177"][1]
  assert y.tokens[2] == " " and y.subj_text == "Wilton Bridge" and y.obj_text == "River Wye"


def test_fewrel_train_partial(shared_data):
  data = readers.read_fewrel(
      require(shared_data / "fewrel_train_partial" / "train_wiki_partial.json"))
  assert len(data) == 64
  assert sum(len(v) for v in data.values()) == 20415
  assert len(data["P6"]) == 318


def test_pid2name_and_rel2id(shared_data):
  pid = readers.read_pid2name(require(shared_data / "fewrel" / "pid2name.json"))
  assert len(pid) == 744
  assert pid["P2384"] == ("statement describes",
                          "formalization of the statement contains a bound variable in this class")
  rel2id = readers.read_rel2id(require(shared_data / "wiki80" / "rel2id.json"))
  assert len(rel2id) == 80
  assert sorted(rel2id.values()) == list(range(80))
  assert rel2id["place served by transport hub"] == 0
  assert rel2id["head of government"] == 5


def test_wiki80_kshot_and_dev(shared_data):
  train = readers.read_tacred(require(shared_data / "wiki80" / "k-shot" / "8-42" / "train.json"))
  assert len(train) == 640
  counts = collections.Counter(x.relation for x in train)
  assert len(counts) == 80 and set(counts.values()) == {8}
  x = train[0]
  assert x.relation == "head of government"
  assert (x.subj, x.obj) == ((3, 4), (5, 7))
  assert (x.subj_text, x.obj_text) == ("Phoenix", "Greg Stanton")
  assert (x.subj_type, x.obj_type) == ("region", "human")
  assert x.source.endswith("8-42/train.json:0")
  dev = readers.read_tacred(require(shared_data / "wiki80" / "dev.json"))
  assert len(dev) == 5600
  assert len({x.relation for x in dev}) == 80


def test_tacred_stanford_samples(shared_data):
  folder = shared_data / "tacred_sample_stanford"
  sizes = {s: len(readers.read_tacred(require(folder / f"{s}.json")))
           for s in ("train", "dev", "test")}
  assert sizes == {"train": 20, "dev": 20, "test": 20}
  train = readers.read_tacred(folder / "train.json")
  assert collections.Counter(x.relation for x in train) == {"no_relation": 18,
                                                            "org:city_of_headquarters": 2}
  x = train[0]
  assert (x.subj, x.obj) == ((20, 21), (12, 13))
  assert (x.subj_text, x.obj_text, x.subj_type) == ("her", "Jake", "PERSON")
  # Penn Treebank bracket escapes become brackets by default, and stay when asked.
  assert "-LRB-" not in train[3].tokens and "(" in train[3].tokens
  raw = readers.read_tacred(folder / "train.json", convert_brackets=False)
  assert "-LRB-" in raw[3].tokens and "(" not in raw[3].tokens
  assert len(raw[3].tokens) == len(train[3].tokens)


def test_tkre_release_few_train(shared_data):
  data = readers.read_tacred(require(shared_data / "tkre_release" / "few_train.json"))
  assert len(data) == 334
  counts = collections.Counter(x.relation for x in data)
  assert len(counts) == 42 and "no_relation" in counts
  assert counts["per:country_of_death"] == 6
  x = data[0]
  assert (x.relation, x.subj_text, x.obj_text) == ("org:founded_by", "ABC", "Tom Thabane")
  assert (x.subj_type, x.obj_type) == ("ORGANIZATION", "PERSON")


def test_scdg_fewrel_llm(shared_data):
  data = llm_files.read_scdg(require(shared_data / "fewrel_llm" / "scdg_val_wiki_16x16.jsonl"))
  assert len(data) == 256
  assert set(collections.Counter(x.relation for x in data).values()) == {16}
  x = data[0]
  assert x.kind == "scdg" and x.relation == "P177"
  assert (x.subj, x.obj) == ((0, 2), (19, 21))
  assert (x.subj_text, x.obj_text) == ("Tower Bridge", "River Thames")
  assert (x.subj_type, x.obj_type) == ("LOCATION", "LOCATION")
  assert x.tokens[10] == "London,"
  wiki = llm_files.read_scdg(require(shared_data / "wiki80_llm" / "scdg_wiki80_8-42_80x16.jsonl"))
  assert len(wiki) == 1280


def test_scdg_tkre_release_has_seven_overlapping_records(shared_data):
  path = require(shared_data / "tkre_release" / "llm_da_8.json")
  with pytest.raises(DataError, match=r"llm_da_8\.json, record 8 \(line 9\): subject character "
                                      r"span \[4, 34\) and object character span \[4, 13\) "
                                      r"overlap"):
    llm_files.read_scdg(path)
  good, problems = llm_files.read_scdg(path, on_error="collect")
  assert len(good) == 212 and len(problems) == 7
  lines = [where.rsplit("line ", 1)[1].rstrip(")") for where, _ in problems]
  assert lines == ["9", "11", "12", "13", "14", "15", "120"]
  assert all("overlap" in problem for _, problem in problems)
  assert all(where.startswith(f"{path}, record ") for where, _ in problems)
  assert len({x.relation for x in good}) == 33


def test_edkg_fewrel_llm(shared_data):
  recs = llm_files.read_edkg(require(shared_data / "fewrel_llm" / "edkg_val_wiki_16x8.jsonl"))
  assert len(recs) == 128
  r = recs[0]
  assert (r.relation, r.subject, r.object) == ("P177", "Cape Girardeau Bridge",
                                               "Mississippi River")
  assert r.context.startswith("In June 1987 , the Missouri Highway")
  instances, unusable = llm_files.edkg_to_instances(recs)
  assert len(instances) == 128 and unusable == []
  x = instances[0]
  assert x.kind == "edkg" and x.source == r.source
  # The closest non-overlapping pair: "Hence Cape Girardeau Bridge crosses the Mississippi River".
  assert (x.subj, x.obj) == ((43, 46), (48, 50))
  assert x.tokens[42:50] == ("Hence", "Cape", "Girardeau", "Bridge", "crosses", "the",
                             "Mississippi", "River")
  wiki = llm_files.read_edkg(require(shared_data / "wiki80_llm" / "edkg_wiki80_8-42_80x8.jsonl"))
  assert len(wiki) == 640
  assert len(llm_files.edkg_to_instances(wiki)[0]) == 640


@pytest.mark.parametrize("name,with_context", [("llm_corpus.json", False),
                                               ("llm_corpus_context.json", True)])
def test_edkg_tkre_release(shared_data, name, with_context):
  recs = llm_files.read_edkg(require(shared_data / "tkre_release" / name))
  assert len(recs) == 252
  assert len({r.relation for r in recs}) == 42
  assert all((r.context is not None) == with_context for r in recs)
  instances, unusable = llm_files.edkg_to_instances(recs)
  # 7 unusable: empty generated_text, or an entity the text never names (e.g. "John Dewey").
  assert (len(instances), len(unusable)) == (245, 7)
  empty = sum(1 for r in recs if not r.generated_text)
  assert empty == (5 if with_context else 6)


def test_detect_format_on_real_files(shared_data):
  cases = {
      "fewrel/val_wiki.json": "fewrel",
      "wiki80/dev.json": "tacred",
      "tkre_release/few_train.json": "tacred",
      "tkre_release/llm_da_8.json": "scdg",
      "tkre_release/llm_corpus.json": "edkg",
      "fewrel_llm/edkg_val_wiki_16x8.jsonl": "edkg",
      "fewrel_llm/scdg_val_wiki_16x16.jsonl": "scdg",
  }
  for rel, fmt in cases.items():
    assert readers.detect_format(require(shared_data / rel)) == fmt, rel
  with pytest.raises(DataError, match=r"pid2name\.json: unknown data format"):
    readers.read_any(shared_data / "fewrel" / "pid2name.json")
  assert len(readers.read_any(shared_data / "tacred_sample_stanford" / "dev.json")) == 20


# ------------------------------------------------------------------------------------------
# Small synthetic files


def _write(tmp_path, name, content):
  p = tmp_path / name
  p.write_text(content, encoding="utf-8")
  return p


def _jsonl(records):
  return "".join(json.dumps(r) + "\n" for r in records)


TACRED_OK = {"token": ["Bill", "Gates", "founded", "Microsoft", "."], "relation": "org:founded_by",
             "subj_start": 3, "subj_end": 3, "obj_start": 0, "obj_end": 1,
             "subj_type": "ORGANIZATION", "obj_type": "PERSON"}
SCDG_OK = {"text": "Bill Gates founded Microsoft.", "subj": "Microsoft", "subj_start": 19,
           "subj_end": 28, "obj": "Bill Gates", "obj_start": 0, "obj_end": 10,
           "subj_type": "ORGANIZATION", "obj_type": "PERSON", "relation": "org:founded_by"}
FEWREL_OK = {"tokens": ["Bill", "Gates", "founded", "Microsoft", "."],
             "h": ["microsoft", "Q2283", [[3]]], "t": ["bill gates", "Q5284", [[0, 1]]]}
EDKG_OK = {"relation": "org:founded_by", "subject": "Microsoft", "object": "Bill Gates",
           "generated_text": "Bill Gates founded Microsoft in 1975."}


def test_tacred_list_and_jsonl_give_the_same(tmp_path):
  as_list = readers.read_tacred(_write(tmp_path, "a.json", json.dumps([TACRED_OK, TACRED_OK])))
  as_lines = readers.read_tacred(_write(tmp_path, "b.jsonl", "\n" + _jsonl([TACRED_OK] * 2)))
  assert [x.tokens for x in as_list] == [x.tokens for x in as_lines]
  x = as_lines[1]
  assert (x.subj, x.obj, x.subj_text, x.obj_text) == ((3, 4), (0, 2), "Microsoft", "Bill Gates")
  assert x.source == f"{tmp_path / 'b.jsonl'}:1"


def test_fewrel_small_and_multi_mention(tmp_path):
  rec = dict(FEWREL_OK, h=["microsoft", "Q2283", [[3], [0]]])
  data = readers.read_fewrel(_write(tmp_path, "f.json", json.dumps({"P1": [FEWREL_OK, rec]})))
  assert list(data) == ["P1"]
  assert [(x.subj, x.obj) for x in data["P1"]] == [((3, 4), (0, 2))] * 2
  assert data["P1"][1].source == f"{tmp_path / 'f.json'}:P1[1]"


def test_scdg_small(tmp_path):
  (x,) = llm_files.read_scdg(_write(tmp_path, "s.jsonl", _jsonl([SCDG_OK])))
  assert x.tokens == ("Bill", "Gates", "founded", "Microsoft", ".")
  assert (x.subj, x.obj, x.kind) == ((3, 4), (0, 2), "scdg")


@pytest.mark.parametrize("reader,name,content,expected", [
    # Empty files.
    (readers.read_tacred, "e.json", "  \n", r"e\.json: the file is empty"),
    (readers.read_fewrel, "e.json", "", r"e\.json: the file is empty"),
    (llm_files.read_scdg, "e.jsonl", "\n\n", r"e\.jsonl: the file is empty"),
    (llm_files.read_edkg, "e.jsonl", "", r"e\.jsonl: the file is empty"),
    # Invalid JSON: a document gives the position, JSON lines the line.
    (readers.read_tacred, "bad.json", '[{"token": ["a"],\n  oops]',
     r"bad\.json: invalid JSON at line 2, column 3 \(character 20\)"),
    (readers.read_fewrel, "bad.json", '{"P1": [}', r"bad\.json: invalid JSON at line 1, column 9"),
    (llm_files.read_scdg, "bad.jsonl", _jsonl([SCDG_OK]) + "\n" + '{"text": "x",\n',
     r"bad\.jsonl, record 1 \(line 3\): invalid JSON at column 14"),
    (llm_files.read_edkg, "bad.jsonl", '{"relation": \n', r"bad\.jsonl, record 0 \(line 1\): "
                                                     r"invalid JSON"),
    # Wrong top-level type.
    (readers.read_fewrel, "top.json", json.dumps([FEWREL_OK]),
     r"top\.json: expected a JSON object mapping relation ids .* got a JSON list"),
    (readers.read_fewrel, "top.json", json.dumps({"P1": {"tokens": []}}),
     r"top\.json, relation 'P1': expected a list of instances, got a JSON object"),
    (readers.read_tacred, "top.json", '"just a string"',
     r"top\.json: expected a JSON list or JSON lines .* starts with '\"'"),
    (readers.read_tacred, "top.json", "[]", r"top\.json: the JSON list holds no records"),
    (readers.read_tacred, "top.json", json.dumps(TACRED_OK, indent=1),
     r"top\.json: the file is a single multi-line JSON dict"),
    (readers.read_tacred, "top.json", json.dumps([TACRED_OK, [1, 2]]),
     r"top\.json, record 1: expected a JSON object, got list"),
    # Missing keys.
    (readers.read_tacred, "m.json", json.dumps([{k: v for k, v in TACRED_OK.items()
                                                 if k not in ("relation", "obj_end")}]),
     r"m\.json, record 0: missing key\(s\) 'relation', 'obj_end'"),
    (readers.read_fewrel, "m.json", json.dumps({"P1": [FEWREL_OK, {"tokens": ["a"], "h": []}]}),
     r"m\.json, record P1\[1\]: missing key\(s\) 't'"),
    (llm_files.read_scdg, "m.jsonl", _jsonl([SCDG_OK, {k: v for k, v in SCDG_OK.items()
                                                     if k != "obj"}]),
     r"m\.jsonl, record 1 \(line 2\): missing key\(s\) 'obj'"),
    (llm_files.read_edkg, "m.jsonl", _jsonl([{"relation": "r", "subject": "a", "object": "b"}]),
     r"m\.jsonl, record 0 \(line 1\): missing key\(s\) 'generated_text'"),
    # Wrong field types.
    (readers.read_tacred, "t.json", json.dumps([dict(TACRED_OK, subj_start="3")]),
     r"t\.json, record 0: 'subj_start' must be an integer, got string '3'"),
    (readers.read_tacred, "t.json", json.dumps([dict(TACRED_OK, token="Bill Gates")]),
     r"t\.json, record 0: 'token' must be a list of strings"),
    (readers.read_fewrel, "t.json", json.dumps({"P1": [dict(FEWREL_OK, h=["x", "Q1", []])]}),
     r"t\.json, record P1\[0\]: 'h' must be \[name, id, \[\[token positions\]"),
    (llm_files.read_edkg, "t.jsonl", _jsonl([dict(EDKG_OK, subject="  ")]),
     r"t\.jsonl, record 0 \(line 1\): 'subject' is empty"),
    # Indices / offsets out of range.
    (readers.read_tacred, "r.json", json.dumps([TACRED_OK, dict(TACRED_OK, obj_end=5)]),
     r"r\.json, record 1: obj_start/obj_end \[0, 5\] \(inclusive\) are out of range for 5 tokens"),
    (readers.read_tacred, "r.json", json.dumps([dict(TACRED_OK, subj_start=4, subj_end=3)]),
     r"r\.json, record 0: subj_start/subj_end \[4, 3\] \(inclusive\) are out of range"),
    (readers.read_fewrel, "r.json", json.dumps({"P1": [dict(FEWREL_OK, t=["x", "Q", [[0, 9]]])]}),
     r"r\.json, record P1\[0\]: 't' token positions \[9\] are out of range for 5 tokens"),
    (llm_files.read_scdg, "r.jsonl", _jsonl([dict(SCDG_OK, subj_end=40)]),
     r"r\.jsonl, record 0 \(line 1\): subject character offsets \[19, 40\) are out of range "
     r"for a text of 29 characters"),
    # Entity text not matching its span.
    (llm_files.read_scdg, "x.jsonl", _jsonl([SCDG_OK, dict(SCDG_OK, obj="Bill Gate")]),
     r"x\.jsonl, record 1 \(line 2\): object text 'Bill Gate' does not match "
     r"text\[0:10\] = 'Bill Gates'"),
    # Overlapping subject and object.
    (readers.read_tacred, "o.json", json.dumps([dict(TACRED_OK, subj_start=0, subj_end=0)]),
     r"o\.json, record 0: subject token span \[0, 1\) and object token span \[0, 2\) overlap"),
    (readers.read_fewrel, "o.json", json.dumps({"P1": [dict(FEWREL_OK, h=["b", "Q", [[1, 2]]])]}),
     r"o\.json, record P1\[0\]: subject token span \[1, 3\) and object token span \[0, 2\) "
     r"overlap"),
    (llm_files.read_scdg, "o.jsonl", _jsonl([dict(SCDG_OK, subj="Gates", subj_start=5,
                                                subj_end=10)]),
     r"o\.jsonl, record 0 \(line 1\): subject character span \[5, 10\) and object character "
     r"span \[0, 10\) overlap"),
])
def test_bad_input_raises_naming_file_record_and_problem(tmp_path, reader, name, content,
                                                        expected):
  path = _write(tmp_path, name, content)
  with pytest.raises(DataError, match=expected) as info:
    reader(path)
  assert str(path) in str(info.value)


def test_missing_file_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match=r"nope\.json: cannot read the file"):
    readers.read_tacred(tmp_path / "nope.json")


def test_scdg_collect_keeps_good_records_and_lists_bad_ones(tmp_path):
  content = (_jsonl([SCDG_OK, dict(SCDG_OK, subj="Micro")]) + "not json\n"
             + _jsonl([dict(SCDG_OK, relation="r2")]))
  path = _write(tmp_path, "c.jsonl", content)
  good, problems = llm_files.read_scdg(path, on_error="collect")
  assert [x.relation for x in good] == ["org:founded_by", "r2"]
  assert [x.source for x in good] == [f"{path}:0", f"{path}:3"]
  assert problems == [
      (f"{path}, record 1 (line 2)",
       "subject text 'Micro' does not match text[19:28] = 'Microsoft'"),
      (f"{path}, record 2 (line 3)", "invalid JSON at column 1: Expecting value"),
  ]
  with pytest.raises(ValueError, match="on_error"):
    llm_files.read_scdg(path, on_error="skip")
  with pytest.raises(DataError, match=r"c2\.jsonl: the file is empty"):
    llm_files.read_scdg(_write(tmp_path, "c2.jsonl", ""), on_error="collect")


def test_read_any_dispatch_and_unknown_format(tmp_path):
  assert isinstance(readers.read_any(_write(tmp_path, "f.json", json.dumps({"P1": [FEWREL_OK]}))),
                    dict)
  scdg = readers.read_any(_write(tmp_path, "s.jsonl", _jsonl([SCDG_OK])))
  assert scdg[0].kind == "scdg"
  edkg = readers.read_any(_write(tmp_path, "e.json", json.dumps([EDKG_OK])))
  assert isinstance(edkg[0], EdkgRecord)
  one = readers.read_any(_write(tmp_path, "t.jsonl", _jsonl([TACRED_OK])))
  assert isinstance(one[0], RelationInstance) and one[0].subj_type == "ORGANIZATION"
  assert readers.detect_format(_write(tmp_path, "pretty.json",
                                      json.dumps({"P1": [FEWREL_OK]}, indent=2))) == "fewrel"
  with pytest.raises(DataError, match=r"u\.jsonl: unknown data format"):
    readers.read_any(_write(tmp_path, "u.jsonl", _jsonl([{"sentence": "x"}])))
  with pytest.raises(DataError, match=r"s\.jsonl: unknown format 'csv'"):
    readers.read_any(tmp_path / "s.jsonl", fmt="csv")
  # An explicit format wins over detection: SCDG records are not TACRED records.
  with pytest.raises(DataError, match=r"s\.jsonl, record 0 \(line 1\): missing key\(s\) 'token'"):
    readers.read_any(tmp_path / "s.jsonl", fmt="tacred")


def test_label_files_bad_input(tmp_path):
  with pytest.raises(DataError, match=r"p\.json, record 'P1': expected \[name, description\]"):
    readers.read_pid2name(_write(tmp_path, "p.json", json.dumps({"P1": ["only name"]})))
  with pytest.raises(DataError, match=r"r\.json, record 'b': id 0 is also used by 'a'"):
    readers.read_rel2id(_write(tmp_path, "r.json", json.dumps({"a": 0, "b": 0})))
  with pytest.raises(DataError, match=r"r2\.json, record 'a': id must be a non-negative integer"):
    readers.read_rel2id(_write(tmp_path, "r2.json", json.dumps({"a": "0"})))
  with pytest.raises(DataError, match=r"r3\.json: expected a JSON object of relation -> id, got "
                                      r"a JSON list"):
    readers.read_rel2id(_write(tmp_path, "r3.json", "[1]"))


# ------------------------------------------------------------------------------------------
# EDKG entity location


def _rec(subject, obj, text):
  return EdkgRecord(relation="r", subject=subject, object=obj, context=None,
                    generated_text=text, source="mem:0")


def test_edkg_to_instance_prefers_whole_words_and_closest_pair():
  # "art" occurs inside "Martin" and "party"; the whole-word occurrence wins.
  x = llm_files.edkg_to_instance(
      _rec("Art", "Martin", "Martin met a party guest; art loves Martin."))
  assert x.tokens == ("Martin", "met", "a", "party", "guest;", "art", "loves", "Martin", ".")
  assert (x.subj, x.obj) == ((5, 6), (7, 8))
  assert x.kind == "edkg" and x.source == "mem:0" and x.subj_type is None


def test_edkg_to_instance_falls_back_to_substrings_and_tolerates_tacred_spacing():
  x = llm_files.edkg_to_instance(_rec("Paris", "France", "Parisians live in France."))
  assert (x.subj_text, x.obj_text) == ("Paris", "France")
  assert x.tokens[:2] == ("Paris", "ians")
  y = llm_files.edkg_to_instance(_rec("Columbia 's school", "June 3 , 1931",
                                      "COLUMBIA'S SCHOOL opened on June 3, 1931."))
  assert (y.subj_text, y.obj_text) == ("COLUMBIA'S SCHOOL", "June 3, 1931")


def test_edkg_to_instance_same_string_needs_two_occurrences_and_none_when_missing():
  x = llm_files.edkg_to_instance(_rec("Ohio", "ohio", "Ohio is a state; the Ohio river."))
  assert (x.subj, x.obj) == ((0, 1), (5, 6))
  assert llm_files.edkg_to_instance(_rec("Ohio", "ohio", "Only one Ohio here.")) is None
  assert llm_files.edkg_to_instance(_rec("Ohio", "Texas", "Only Ohio here.")) is None
  assert llm_files.edkg_to_instance(_rec("Ohio", "Texas", "")) is None
  # "New York" only inside "New York City": no non-overlapping pair.
  assert llm_files.edkg_to_instance(_rec("New York City", "New York", "In New York City.")) is None
  ok, bad = llm_files.edkg_to_instances([_rec("Ohio", "Texas", "Ohio and Texas."),
                                         _rec("Ohio", "Utah", "Ohio.")])
  assert [i.text for i in ok] == ["Ohio and Texas ."] and bad == ["mem:0"]
