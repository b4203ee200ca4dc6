"""The knowledge-guided pre-training corpus: exact counts on the real LLM files, the leakage rules
(a planted leak fails loudly), the TKRE release files, and the prepare stage's corpus split."""

import json

import pytest

from tests.conftest import require
from tkre_jax import config as config_lib
from tkre_jax.data import corpus, llm_files, preparation
from tkre_jax.data.schema import DataError


def fewrel_config(shared_data, k=8):
  c = config_lib.base_config()
  c.data.data_dir = str(shared_data)
  c.data.k = k
  require(shared_data / c.data.edkg_file)
  require(shared_data / c.data.scdg_file)
  return c


@pytest.fixture(scope="module")
def fewrel8(shared_data):
  c = fewrel_config(shared_data)
  data = preparation.load_splits(c)
  instances, report = corpus.corpus_from_config(c, data)
  return c, data, instances, report


def _norm(text):
  from tkre_jax.text import normalize_text
  return normalize_text(text)


def test_fewrel_llm_counts_exact(fewrel8):
  _, data, instances, report = fewrel8
  assert report["built"]
  assert report["by_kind"] == {"gold": 128, "edkg": 128, "scdg": 249}
  assert report["num_instances"] == len(instances) == 505
  assert report["edkg"]["records"] == 128 and report["edkg"]["entity_not_found"] == 0
  assert report["scdg"]["records"] == 256 and report["scdg"]["invalid"] == 0
  # The 7 SCDG sentences sharing an 8-gram with dev/test are dropped (policy "drop"), counted.
  assert report["scdg"]["leak_ngram_dropped"] == 7 and len(report["leakage"]["ngram_hits"]) == 7
  assert report["edkg"]["leak_ngram_dropped"] == 0
  lk = report["leakage"]
  assert lk["eval_instances"] == 1088 + 9600
  assert lk["train_text_shared_with_eval"] == 5  # val_wiki repeats sentences with other pairs
  assert lk["entity_pair_in_eval"] == {"edkg": 0, "scdg": 16}
  assert [i.kind for i in instances] == ["gold"] * 128 + ["edkg"] * 128 + ["scdg"] * 249
  assert instances[:128] == data["train"]


def test_edkg_entries_are_the_explanations_not_the_context(fewrel8, shared_data):
  c, _, instances, _ = fewrel8
  records = llm_files.read_edkg(config_lib.resolve_path(c, c.data.edkg_file))
  edkg = [i for i in instances if i.kind == "edkg"]
  for rec, inst in zip(records, edkg):
    assert _norm(inst.text) == _norm(rec.generated_text)
    assert _norm(inst.subj_text) == _norm(rec.subject) and _norm(inst.obj_text) == _norm(rec.object)


def test_fewrel_k16_counts(shared_data):
  c = fewrel_config(shared_data, k=16)
  _, report = corpus.corpus_from_config(c, preparation.load_splits(c))
  assert report["by_kind"] == {"gold": 256, "edkg": 128, "scdg": 250}
  assert report["scdg"]["leak_ngram_dropped"] == 6  # one 8-gram also occurs in a 16-shot sentence
  assert report["leakage"]["train_text_shared_with_eval"] == 13


def test_no_dev_or_test_text_in_corpus(fewrel8):
  _, data, instances, _ = fewrel8
  ev = data["dev"] + data["test"]
  texts = {_norm(i.text) for i in ev}
  identities = {(_norm(i.text), i.subj, i.obj) for i in ev}
  for inst in instances:
    if inst.kind == "gold":  # a training sentence may repeat in test, never with the same pair
      assert (_norm(inst.text), inst.subj, inst.obj) not in identities, inst.source
    else:
      assert _norm(inst.text) not in texts, inst.source


def test_planted_exact_leak_fails_loudly(fewrel8, tmp_path):
  c, data, _, _ = fewrel8
  victim = data["test"][123]
  text = " ".join(victim.tokens)
  s0 = len(" ".join(victim.tokens[:victim.subj[0]])) + (1 if victim.subj[0] else 0)
  o0 = len(" ".join(victim.tokens[:victim.obj[0]])) + (1 if victim.obj[0] else 0)
  rec = {"text": text, "subj": victim.subj_text, "subj_start": s0, "subj_end": s0 + len(victim.subj_text),
         "obj": victim.obj_text, "obj_start": o0, "obj_end": o0 + len(victim.obj_text),
         "relation": victim.relation}
  assert text[rec["subj_start"]:rec["subj_end"]] == rec["subj"]
  src = config_lib.resolve_path(c, c.data.scdg_file).read_text().rstrip("\n")
  planted = tmp_path / "scdg_planted.jsonl"
  planted.write_text(src + "\n" + json.dumps(rec) + "\n")
  c2 = config_lib.base_config()
  c2.data.data_dir = c.data.data_dir
  c2.data.scdg_file = str(planted)
  with pytest.raises(corpus.CorpusLeakError, match=r"1 LLM-generated corpus text\(s\) equal a dev/test"):
    corpus.corpus_from_config(c2, data)


def test_planted_training_identity_leak_fails(fewrel8):
  _, data, _, _ = fewrel8
  train = data["train"] + [data["dev"][5]]
  with pytest.raises(corpus.CorpusLeakError, match="identical .* to dev/test"):
    corpus.check_train_not_in_eval(train, data["dev"] + data["test"])
  assert corpus.check_train_not_in_eval(data["train"], data["dev"] + data["test"]) == 5


def test_ngram_policies(fewrel8):
  c, data, _, _ = fewrel8
  paths, _ = corpus.resolve_sources(c)
  knowledge = corpus.read_llm_knowledge(paths["edkg"], paths["scdg"])
  ev = data["dev"] + data["test"]
  kept, report = corpus.build_corpus(data["train"], ev, knowledge, ngram=8, ngram_policy="keep")
  assert report["by_kind"]["scdg"] == 256 and report["scdg"]["leak_ngram_kept"] == 7
  with pytest.raises(corpus.CorpusLeakError, match="share a 8-gram"):
    corpus.build_corpus(data["train"], ev, knowledge, ngram=8, ngram_policy="fail")
  with pytest.raises(ValueError, match="ngram_policy"):
    corpus.build_corpus(data["train"], ev, knowledge, ngram_policy="ignore")


def release_config(shared_data):
  """A TACRED-format config over the TKRE release files (gold, EDKG and SCDG)."""
  c = config_lib.base_config()
  c.data.data_dir = str(shared_data)
  c.data.dataset = "tacred"
  c.data.train_file = "tkre_release/few_train.json"
  c.data.schema_file = ""
  c.data.edkg_file = "tkre_release/llm_corpus_context.json"
  c.data.scdg_file = "tkre_release/llm_da_8.json"
  return c


def test_tkre_release_files_load_with_counted_rejects(shared_data, tmp_path):
  rel = require(shared_data / "tkre_release")
  c = release_config(shared_data)
  c.data.corpus = "require"
  instances, report = corpus.corpus_from_config(c, preparation.load_splits(c))
  assert report["by_kind"] == {"gold": 334, "edkg": 245, "scdg": 212}
  assert report["edkg"]["records"] == 252 and report["edkg"]["entity_not_found"] == 7
  assert len(report["edkg"]["entity_not_found_sources"]) == 7
  assert report["scdg"]["records"] == 219 and report["scdg"]["invalid"] == 7
  assert all("overlap" in r for r in report["scdg"]["invalid_records"])
  # llm_corpus.json (no context key) reads the same way.
  edkg = llm_files.read_edkg(rel / "llm_corpus.json")
  assert len(edkg) == 252 and len(llm_files.edkg_to_instances(edkg)[1]) == 7


def test_prepare_writes_corpus_split(shared_data, tmp_path):
  from tests.helpers import minilm_dir
  minilm_dir()
  c = release_config(shared_data)
  require(shared_data / c.data.train_file)
  meta = preparation.run_prepare(c, tmp_path / "prep")
  assert meta["splits"]["corpus"]["num_examples"] == 791
  assert meta["splits"]["train"]["num_examples"] == 334
  assert meta["corpus"]["by_kind"] == {"gold": 334, "edkg": 245, "scdg": 212}
  on_disk = json.loads((tmp_path / "prep" / "meta.json").read_text())
  assert on_disk["corpus"]["scdg"]["invalid"] == 7


def test_corpus_modes(shared_data, tmp_path):
  c = fewrel_config(shared_data)
  data = preparation.load_splits(c)
  c.data.edkg_file = str(tmp_path / "missing_edkg.jsonl")
  c.data.scdg_file = str(tmp_path / "missing_scdg.jsonl")
  inst, report = corpus.corpus_from_config(c, data)  # auto: none exists -> skipped, reported
  assert inst is None and not report["built"] and "not found" in report["reason"]
  c.data.corpus = "require"
  with pytest.raises(FileNotFoundError, match="missing_edkg"):
    corpus.corpus_from_config(c, data)
  c.data.corpus = "auto"
  c.data.scdg_file = "fewrel_llm/scdg_val_wiki_16x16.jsonl"  # one present, one missing: an error
  with pytest.raises(FileNotFoundError, match="missing_edkg"):
    corpus.corpus_from_config(c, data)
  c.data.corpus = "off"
  assert corpus.corpus_from_config(c, data)[0] is None
  c.data.corpus = "sometimes"
  with pytest.raises(ValueError, match="config.data.corpus"):
    corpus.corpus_from_config(c, data)
  # No LLM files configured: the corpus is the training set alone.
  c.data.corpus = "auto"
  c.data.edkg_file = c.data.scdg_file = ""
  inst, report = corpus.corpus_from_config(c, data)
  assert report["by_kind"] == {"gold": 128, "edkg": 0, "scdg": 0}


def test_unknown_llm_relation_is_an_error(fewrel8, tmp_path):
  c, data, _, _ = fewrel8
  from tkre_jax.data.features import FeatureConfig, Featurizer
  from tests.helpers import minilm_dir
  tok = preparation.load_tokenizer(minilm_dir())
  label_map = preparation.build_label_map(data["train"])
  del label_map["P177"]
  feat = Featurizer(tok, label_map, FeatureConfig(max_seq_len=128))
  inst = [i for i in fewrel8[2] if i.kind == "scdg" and i.relation == "P177"][:2]
  report = {"edkg": {"used": 0}, "scdg": {"used": 2}, "by_kind": {"scdg": 2}}
  with pytest.raises(DataError, match="not in the label map"):
    corpus.featurize_corpus(feat, inst, report)
