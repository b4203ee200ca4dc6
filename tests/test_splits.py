"""Tests for `tkre_jax.data.splits`: canonical FewRel split, K-shot sampling, episodes, and the
leakage index on the real FewRel split and LLM files."""

from __future__ import annotations

import collections
import json

import pytest

from tests.conftest import require
from tkre_jax.data import llm_files, readers, splits
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.text import LeakageIndex, find_no_relation


def _inst(rel: str, i: int, text: str = "") -> RelationInstance:
  tokens = tuple(text.split()) if text else ("a", "b", str(i))
  return RelationInstance(tokens=tokens, subj=(0, 1), obj=(1, 2), relation=rel,
                          source=f"{rel}:{i}")


# ------------------------------------------------------------------------------------------
# Canonical FewRel split on the real data


@pytest.fixture(scope="module")
def val_wiki(shared_data):
  return readers.read_fewrel(require(shared_data / "fewrel" / "val_wiki.json"))


@pytest.fixture(scope="module")
def split_file(shared_data):
  return require(shared_data / "fewrel" / "val_wiki_split.json")


def test_canonical_split_sizes_and_positions(val_wiki, split_file):
  split = splits.fewrel_canonical_split(val_wiki, split_file, k=8)
  assert {name: len(v) for name, v in split.items()} == {"train": 128, "dev": 1088,
                                                         "test": 9600}
  for name, per_rel in (("train", 8), ("dev", 68), ("test", 600)):
    counts = collections.Counter(x.relation for x in split[name])
    assert list(counts) == list(val_wiki) and set(counts.values()) == {per_rel}
  assert split["train"][0] is val_wiki["P177"][0]
  assert split["train"][7] is val_wiki["P177"][7]
  assert split["train"][8] is val_wiki["P364"][0]
  assert split["dev"][0] is val_wiki["P177"][32]
  assert split["dev"][67] is val_wiki["P177"][99]
  assert split["test"][0] is val_wiki["P177"][100]
  assert split["test"][-1] is val_wiki[list(val_wiki)[-1]][699]
  assert split["train"][0].source.endswith("val_wiki.json:P177[0]")
  # The three parts are disjoint.
  ids = [{id(x) for x in split[n]} for n in ("train", "dev", "test")]
  assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
  assert len(splits.fewrel_canonical_split(val_wiki, split_file, k=32)["train"]) == 512


def test_canonical_split_k_larger_than_pool(val_wiki, split_file):
  with pytest.raises(DataError, match=r"val_wiki_split\.json, relation 'P177': K=33 exceeds the "
                                      r"train pool \[0, 32\) of 32 instances"):
    splits.fewrel_canonical_split(val_wiki, split_file, k=33)
  with pytest.raises(DataError, match=r"K must be a positive integer, got 0"):
    splits.fewrel_canonical_split(val_wiki, split_file, k=0)


def test_llm_corpus_is_disjoint_from_fewrel_dev_and_test(val_wiki, split_file, shared_data):
  split = splits.fewrel_canonical_split(val_wiki, split_file, k=8)
  held_out = split["dev"] + split["test"]
  index = LeakageIndex([x.text for x in held_out], 8, sources=[x.source for x in held_out])
  edkg = llm_files.read_edkg(require(shared_data / "fewrel_llm" / "edkg_val_wiki_16x8.jsonl"))
  scdg = llm_files.read_scdg(require(shared_data / "fewrel_llm" / "scdg_val_wiki_16x16.jsonl"))
  assert [r.source for r in edkg if index.equal(r.generated_text)] == []
  assert [x.source for x in scdg if index.equal(x.text)] == []
  # 7 of each share an 8-gram with dev/test ("a german professional footballer who plays as a").
  assert sum(bool(index.shared_ngrams(r.generated_text)) for r in edkg) == 7
  assert sum(bool(index.shared_ngrams(x.text)) for x in scdg) == 7
  # The EDKG seed contexts are train-pool sentences, and FewRel repeats some sentences with
  # other entity pairs: 5 of the 128 contexts equal a dev or test sentence (never put the seed
  # contexts into the corpus).
  hits = [(i, index.equal(r.context)) for i, r in enumerate(edkg) if index.equal(r.context)]
  assert len(hits) == 5
  assert hits[0][0] == 3 and hits[0][1].endswith("val_wiki.json:P177[655]")
  # 7 dev/test instances share their sentence with one of the K=8 training instances.
  train_index = LeakageIndex([x.text for x in split["train"]])
  assert sum(train_index.equal(x.text) is not None for x in held_out) == 7
  assert sum(train_index.equal(r.context) is not None for r in edkg) == 128


# ------------------------------------------------------------------------------------------
# Split-file errors


def _split(tmp_path, doc, name="split.json"):
  p = tmp_path / name
  p.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
  return p


SMALL = {r: [_inst(r, i) for i in range(10)] for r in ("A", "B")}


def test_split_file_small_and_per_relation_ranges(tmp_path):
  p = _split(tmp_path, {"train_pool": [0, 4], "dev": [4, 6], "test": [6, 10]})
  out = splits.fewrel_canonical_split(SMALL, p, k=2)
  assert [x.source for x in out["train"]] == ["A:0", "A:1", "B:0", "B:1"]
  assert [x.source for x in out["dev"]] == ["A:4", "A:5", "B:4", "B:5"]
  assert len(out["test"]) == 8
  p2 = _split(tmp_path, {"train_pool": {"A": [0, 2], "B": [8, 10]}, "dev": [2, 4],
                         "test": [4, 8]}, "per_rel.json")
  out = splits.fewrel_canonical_split(SMALL, p2, k=1)
  assert [x.source for x in out["train"]] == ["A:0", "B:8"]


@pytest.mark.parametrize("doc,expected", [
    ("", r"split\.json: the file is empty"),
    ("{", r"split\.json: invalid JSON at line 1, column 2 \(character 1\)"),
    ([0, 32], r"split\.json: expected a JSON object with keys train_pool, dev, test, got list"),
    ({"train_pool": [0, 4], "dev": [4, 6]}, r"split\.json: missing key\(s\) 'test'"),
    ({"train_pool": [0, 4], "dev": [4, 6], "test": [6]},
     r"split\.json, 'test': expected a \[start, end\) pair of integers"),
    ({"train_pool": [0, 5], "dev": [4, 6], "test": [6, 10]},
     r"split\.json, relation 'A': ranges 'train_pool' \[0, 5\] and 'dev' \[4, 6\] overlap"),
    ({"train_pool": [0, 4], "dev": [4, 6], "test": [6, 11]},
     r"split\.json, relation 'A': the split needs 11 instances but the data has 10"),
    ({"train_pool": {"A": [0, 4]}, "dev": [4, 6], "test": [6, 10]},
     r"split\.json, 'train_pool': no range for relation 'B'"),
])
def test_split_file_errors(tmp_path, doc, expected):
  with pytest.raises(DataError, match=expected):
    splits.fewrel_canonical_split(SMALL, _split(tmp_path, doc), k=2)


# ------------------------------------------------------------------------------------------
# K-shot sampling, labels


POOL = [_inst(r, i) for i in range(6) for r in ("A", "B", "C")]


def test_sample_k_shot_is_seeded_and_deterministic():
  a = splits.sample_k_shot(POOL, 2, seed=0)
  assert a == splits.sample_k_shot(POOL, 2, seed=0)
  # Pinned: numpy.random.default_rng(0).permutation (PCG64) decides this sample.
  assert [x.source for x in a] == ["A:1", "A:4", "B:3", "B:1", "C:0", "C:1"]
  b = splits.sample_k_shot(POOL, 2, seed=1)
  assert [x.source for x in b] != [x.source for x in a]
  assert [x.relation for x in b] == ["A", "A", "B", "B", "C", "C"]
  assert all(len({x.source for x in s}) == 6 for s in (a, b))


def test_sample_k_shot_short_relations():
  pool = POOL + [_inst("D", 0)]
  with pytest.raises(DataError, match=r"K=2-shot sampling: relation\(s\) with fewer than 2 "
                                      r"instances: 'D' \(1\)"):
    splits.sample_k_shot(pool, 2, seed=0)
  kept = splits.sample_k_shot(pool, 2, seed=0, min_ok=True)
  assert collections.Counter(x.relation for x in kept) == {"A": 2, "B": 2, "C": 2, "D": 1}
  with pytest.raises(ValueError, match="k must be a positive integer"):
    splits.sample_k_shot(pool, 0, seed=0)


def test_sample_k_shot_on_wiki80_dev(shared_data):
  dev = readers.read_tacred(require(shared_data / "wiki80" / "dev.json"))
  sample = splits.sample_k_shot(dev, 8, seed=42)
  assert len(sample) == 640
  assert set(collections.Counter(x.relation for x in sample).values()) == {8}
  assert sample != splits.sample_k_shot(dev, 8, seed=13)


def test_label_map():
  assert splits.label_map(["b", "a", "b", "c"]) == {"b": 0, "a": 1, "c": 2}
  assert splits.label_map(["b", "a", "b", "c"], sort=True) == {"a": 0, "b": 1, "c": 2}
  assert splits.label_map(POOL) == {"A": 0, "B": 1, "C": 2}
  assert splits.label_map({"P2": [], "P1": []}) == {"P2": 0, "P1": 1}
  with pytest.raises(TypeError):
    splits.label_map([1, 2])


def test_no_relation_label_in_real_data(shared_data):
  few = readers.read_tacred(require(shared_data / "tkre_release" / "few_train.json"))
  assert find_no_relation(splits.label_map(few)) == "no_relation"
  rel2id = readers.read_rel2id(require(shared_data / "wiki80" / "rel2id.json"))
  assert find_no_relation(rel2id) is None


# ------------------------------------------------------------------------------------------
# Episodes


DATA7 = {r: [_inst(r, i) for i in range(5)] for r in "ABCDEFG"}


def test_episodes_shape_and_determinism():
  eps = splits.sample_episodes(DATA7, n_way=3, k_shot=1, q_query=2, num_episodes=2, seed=7)
  assert len(eps) == 2
  e = eps[0]
  assert e.relations == ("E", "D", "G")  # pinned: default_rng(7).
  assert [[x.source for x in s] for s in e.support] == [["E:3"], ["D:3"], ["G:0"]]
  assert [[x.source for x in q] for q in e.query] == [["E:1", "E:2"], ["D:4", "D:0"],
                                                      ["G:3", "G:2"]]
  assert e.query_labels == [0, 0, 1, 1, 2, 2]
  more = splits.sample_episodes(DATA7, 5, 2, 3, 20, seed=3)
  for ep in more:
    assert len(ep.relations) == len(set(ep.relations)) == 5
    assert [len(s) for s in ep.support] == [2] * 5 and [len(q) for q in ep.query] == [3] * 5
    for r, s, q in zip(ep.relations, ep.support, ep.query):
      assert {x.relation for x in s + q} == {r}
      assert not {x.source for x in s} & {x.source for x in q}
  assert more == splits.sample_episodes(DATA7, 5, 2, 3, 20, seed=3)
  assert more != splits.sample_episodes(DATA7, 5, 2, 3, 20, seed=4)


def test_episodes_errors():
  with pytest.raises(DataError, match="8-way episodes need 8 relations, the data has 7"):
    splits.sample_episodes(DATA7, 8, 1, 1, 1, seed=0)
  short = dict(DATA7, H=[_inst("H", 0)])
  with pytest.raises(DataError, match=r"need 5 instances per relation; too few in 'H' \(1\)"):
    splits.sample_episodes(short, 2, 2, 3, 1, seed=0)
  with pytest.raises(ValueError, match="k_shot must be an integer >= 1"):
    splits.sample_episodes(DATA7, 2, 0, 3, 1, seed=0)


def test_episodes_on_val_wiki(val_wiki):
  eps = splits.sample_episodes(val_wiki, n_way=5, k_shot=1, q_query=1, num_episodes=10, seed=0)
  assert len(eps) == 10
  assert all(set(e.relations) <= set(val_wiki) for e in eps)
