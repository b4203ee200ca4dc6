"""SCDG augmentation of the fine-tuning set, one marker format for every prepared row, and the
TACRED-family configs on the shared TACRED-format sample data."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from tests.conftest import require
from tests.helpers import make_tiny_fewrel, minilm_dir
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.data import augment, corpus, dataset, markers, readers
from tkre_jax.data import preparation as prepare_lib
from tkre_jax.model import hub
from tkre_jax.text import normalize_text, word_ngrams

REPO = config_lib.REPO_ROOT


def _jsonl(path: pathlib.Path, records) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _scdg_record(text, subj, obj, relation, **types):
  s, o = text.index(subj), text.index(obj)
  return {"text": text, "subj": subj, "subj_start": s, "subj_end": s + len(subj), "obj": obj,
          "obj_start": o, "obj_end": o + len(obj), "relation": relation, **types}


@pytest.fixture(scope="module")
def fewrel4(shared_data, tmp_path_factory):
  """Tiny FewRel (4 relations, K = 4) with the real fewrel_llm files cut to its relations, and an
  SCDG file built to exercise every rule: per relation the real records, then for relation 0 a
  copy of a K-shot sentence, a sentence sharing 8 words with a test sentence and an invalid record;
  relation 3 keeps only 3 records."""
  root = tmp_path_factory.mktemp("augment")
  data = make_tiny_fewrel(shared_data, root / "data", relations=4, per_relation=40, train=4, dev=6)
  splits = prepare_lib.load_splits(_config(data, {"data.k": 4}))
  rels = list(dict.fromkeys(i.relation for i in splits["train"]))
  real = [json.loads(x) for x in open(shared_data / "fewrel_llm" / "scdg_val_wiki_16x16.jsonl")]
  by_rel = {r: [x for x in real if x["relation"] == r] for r in rels}
  eval_texts = {normalize_text(i.text) for i in splits["dev"] + splits["test"]}
  gold0 = next(i for i in splits["train"] if normalize_text(i.text) not in eval_texts)
  test0 = next(i for i in splits["test"] if i.relation == rels[0] and len(i.tokens) >= 10)
  leak = "Here is a new claim : " + " ".join(test0.tokens[:9]) + " , it said ."
  records = [_scdg_record(gold0.text, gold0.subj_text, gold0.obj_text, rels[0]),
             _scdg_record(leak, "Here", "claim", rels[0]),
             {**by_rel[rels[0]][0], "subj_end": 10_000}]
  for r in rels:
    records += by_rel[r][:3] if r == rels[3] else by_rel[r]
  scdg = _jsonl(data / "fewrel_llm" / "scdg_val_wiki_16x16.jsonl", records)
  edkg = [json.loads(x) for x in open(shared_data / "fewrel_llm" / "edkg_val_wiki_16x8.jsonl")]
  _jsonl(data / "fewrel_llm" / "edkg_val_wiki_16x8.jsonl", [x for x in edkg if x["relation"] in rels])
  return root, data, splits, rels, scdg, by_rel


def _config(data_dir, fields):
  c = config_lib.base_config()
  c.data.data_dir = str(data_dir)
  c.data.max_seq_len = 128
  for key, value in fields.items():
    c.update_from_flattened_dict({key: value})
  return c


def _oracle(records, train, ev, k):
  """The expected augmentation, computed from the raw records: per relation, in file order, the
  first k records that are valid, not a K-shot sentence, not equal to a dev/test sentence and share
  no 8-gram with dev/test that is not in a K-shot sentence."""
  eval_grams = set().union(*(word_ngrams(i.text, 8) for i in ev))
  train_grams = set().union(*(word_ngrams(i.text, 8) for i in train))
  seen = {normalize_text(i.text) for i in train}
  out: dict[str, list[str]] = {}
  for r in records:
    if r["subj_end"] > len(r["text"]):
      continue
    t = normalize_text(r["text"])
    if t in seen or (word_ngrams(r["text"], 8) & eval_grams) - train_grams:
      continue
    if len(out.setdefault(r["relation"], [])) < k:
      out[r["relation"]].append(t)
      seen.add(t)
  return out


def test_augmentation_takes_the_first_valid_k_per_relation_and_counts_the_rest(fewrel4):
  root, data, splits, rels, scdg, by_rel = fewrel4
  ev = splits["dev"] + splits["test"]
  records = [json.loads(x) for x in open(scdg)]
  for k in (8, 100):
    added, rep = augment.select_augmentation(splits["train"], ev, scdg, k)
    want = _oracle(records, splits["train"], ev, k)
    for r in rels:
      assert [normalize_text(i.text) for i in added if i.relation == r] == want[r], r
    assert rep["per_relation"] == {r: len(want[r]) for r in rels}
    assert rep["relations_short"] == {r: len(want[r]) for r in rels if len(want[r]) < k}
    assert rep["added"] == len(added) == sum(map(len, want.values()))
    assert rep["invalid"] == 1 and rep["duplicate_dropped"] == 1 and rep["leak_ngram_dropped"] >= 1
    assert all(i.kind == "scdg" for i in added)
  assert rels[3] in rep["relations_short"]  # only 3 records: all that exist
  assert len(rep["relations_short"]) == 4


def test_an_scdg_text_equal_to_a_test_sentence_fails(fewrel4, tmp_path):
  _, _, splits, rels, _, _ = fewrel4
  t = splits["test"][0]
  bad = _jsonl(tmp_path / "scdg.jsonl", [_scdg_record(t.text, t.subj_text, t.obj_text, t.relation)])
  with pytest.raises(corpus.CorpusLeakError, match="SCDG augmentation text"):
    augment.select_augmentation(splits["train"], splits["dev"] + splits["test"], bad, 8)


@pytest.fixture(scope="module")
def prepared_k4(fewrel4, tiny_hf_dir):
  """`prepare` of the 4-relation FewRel set at K = 4 without (`prep0`) and with 8 SCDG sentences
  per relation (`prep8`): {augment_k: summary}."""
  root, data = fewrel4[:2]
  return {k: stages.run("prepare", _config(data, {"data.k": 4, "data.augment_k": k,
                                                  "model.hf_dir": str(tiny_hf_dir)}),
                        root / f"prep{k}")
          for k in (0, 8)}


@pytest.mark.slow
def test_prepare_augments_train_only_and_names_synthetic_rows(fewrel4, prepared_k4):
  root, data, splits, rels, scdg, by_rel = fewrel4
  out = prepared_k4
  assert out[0]["train_by_kind"] == {"gold": 16} and out[0]["augment"] is None
  added = out[8]["augment"]["added"]
  assert out[8]["train_by_kind"] == {"gold": 16, "scdg": added} and added > 20
  assert out[8]["augment"]["per_relation"][rels[0]] == 8
  for split in ("dev", "test", "corpus"):
    assert out[8]["splits"][split] == out[0]["splits"][split]
  meta = dataset.read_meta(root / "prep8")
  assert meta["augment"]["added"] == added
  train = dataset.load_arrays(root / "prep8", "train")
  kinds = [s.split(":")[0] for s in train["source"]]
  assert kinds[16:] == ["scdg"] * added and "scdg" not in kinds[:16]
  for split in ("dev", "test"):
    assert not any(s.startswith("scdg:") for s in dataset.load_arrays(root / "prep8", split)["source"])


def _type_marker_rows(directory: pathlib.Path, split: str) -> np.ndarray:
  """Per row: whether the subject start marker `@` is followed by the type marker `*`."""
  tok = hub.load_tokenizer(minilm_dir())
  star = tok.convert_tokens_to_ids("*")
  a = dataset.load_arrays(directory, split)
  return a["input_ids"][np.arange(len(a["label"])), a["subj_pos"] + 1] == star


@pytest.mark.slow
def test_corpus_and_finetuning_rows_share_the_marker_format(fewrel4, prepared_k4, shared_data,
                                                           tmp_path, tiny_hf_dir):
  # FewRel: gold rows have no types, SCDG rows do: every row untyped.
  root = fewrel4[0]
  for split in ("train", "corpus"):
    assert not _type_marker_rows(root / "prep8", split).any(), split
  assert dataset.read_meta(root / "prep8")["typed_markers"] is False
  # Wiki80 (typed gold): every row typed, EDKG rows take the types of the sentence they explain.
  src = json.load(open(shared_data / "wiki80" / "k-shot" / "8-42" / "train.json"))
  rels = list(dict.fromkeys(x["relation"] for x in src))[:5]
  d = tmp_path / "w80"
  for name in ("train", "dev"):
    rows = json.load(open(shared_data / "wiki80" / "k-shot" / "8-42" / f"{name}.json"))
    (d / "wiki80").mkdir(parents=True, exist_ok=True)
    json.dump([x for x in rows if x["relation"] in rels], open(d / "wiki80" / f"{name}.json", "w"))
  for kind, f in (("edkg", "edkg_wiki80_8-42_80x8.jsonl"), ("scdg", "scdg_wiki80_8-42_80x16.jsonl")):
    recs = [json.loads(x) for x in open(shared_data / "wiki80_llm" / f)]
    keep = [x for x in recs if x["relation"] in rels]
    if kind == "scdg":
      keep[0] = {k: v for k, v in keep[0].items() if k != "obj_type"}  # one untyped record
    _jsonl(d / "wiki80_llm" / f, keep)
  c = config_lib.base_config()
  c.data.update(dict(dataset="tacred", data_dir=str(d), train_file="wiki80/train.json",
                     dev_file="wiki80/dev.json", test_file="", schema_file="", augment_k=4,
                     unlabelled_file="", edkg_file="wiki80_llm/edkg_wiki80_8-42_80x8.jsonl",
                     scdg_file="wiki80_llm/scdg_wiki80_8-42_80x16.jsonl"))
  c.model.hf_dir = str(tiny_hf_dir)
  stages.run("prepare", c, d / "prep")
  meta = dataset.read_meta(d / "prep")
  assert meta["typed_markers"] is True
  assert meta["corpus"]["marker_types"] == {"from_seed": 40, "from_relation": 1, "untyped": 0}
  for split in ("train", "dev", "corpus"):
    assert _type_marker_rows(d / "prep", split).all(), split
  assert markers.use_typed_markers(True, []) is False


@pytest.mark.parametrize("name", ["tacred", "tacrev", "retacred"])
def test_tacred_family_configs_prepare_the_sample_data(name, shared_data, tmp_path, tiny_hf_dir):
  few = require(shared_data / "tkre_release" / "few_train.json")
  sample = require(shared_data / "tacred_sample_stanford")
  shot = tmp_path / name / "k-shot" / "8-42"
  shot.mkdir(parents=True)
  shutil.copy(few, shot / "train.json")
  shutil.copy(sample / "dev.json", shot / "dev.json")
  shutil.copy(sample / "test.json", tmp_path / name / "test.json")
  shutil.copy(require(shared_data / "tkre_release" / "llm_da_8.json"), tmp_path / "scdg.jsonl")
  from ml_collections import config_flags  # noqa: F401  (the configs load as main loads them)
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("k=8,split_seed=42")
  assert c.data.train_file == f"{name}/k-shot/8-42/train.json" and c.data.test_file == f"{name}/test.json"
  c.data.data_dir = str(tmp_path)
  c.data.scdg_file = str(tmp_path / "scdg.jsonl")
  c.data.augment_k = 2
  c.model.hf_dir = str(tiny_hf_dir)
  config_lib.validate(c)
  s = stages.run("prepare", c, tmp_path / "prep")
  assert s["splits"]["train"] == 334 + s["augment"]["added"] and s["splits"]["dev"] == 20
  assert s["splits"]["test"] == 20 and s["num_relations"] == 42 and s["typed_markers"] is True
  assert 0 < s["augment"]["added"] <= 2 * 33
  assert _type_marker_rows(tmp_path / "prep", "train").all()
  with pytest.raises(ValueError, match="unknown config argument 'x=1'"):
    mod.get_config("x=1")


def test_roberta_large_config_sets_the_reference_recipe(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("rl", REPO / "configs" / "roberta_large.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(f"base=tacred,k=16,split_seed=13,hf_dir={tmp_path}")
  assert (c.train.optim.learning_rate, c.train.batch_size, c.train.epochs) == (3e-5, 4, 10)
  assert c.model.hf_dir == str(tmp_path) and c.data.k == 16
  assert c.data.train_file == "tacred/k-shot/16-13/train.json"
  config_lib.validate(c)
  with pytest.raises(ValueError, match="base must be one of"):
    mod.get_config("base=nope")
