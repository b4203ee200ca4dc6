"""SemEval-2010 through `configs/semeval.py`: a few rows of the real k-shot split 8-42 and its LLM
files (cut into a temporary data folder, read from ../shared/data), prepared, fine-tuned and
evaluated; micro-F1 leaves `Other` out and accuracy counts it, both recomputed from the
predictions."""

import json

import numpy as np
import pytest

from tkre_jax import config as config_lib
from tkre_jax import stages
from tests.conftest import require
from tests.helpers import stage_mesh

LABELS = ("Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)", "Other")
K = 4


def _lines(path):
  return [json.loads(x) for x in open(path) if x.strip()]


@pytest.fixture(scope="module")
def semeval_dir(shared_data, tmp_path_factory):
  src = require(shared_data / "semeval" / "k-shot" / "8-42")
  root = tmp_path_factory.mktemp("semeval_data")
  out = root / "semeval" / "k-shot" / f"{K}-42"
  out.mkdir(parents=True)
  for name in ("train", "dev"):
    rows = _lines(src / f"{name}.json")
    keep = [r for lab in LABELS for r in [x for x in rows if x["relation"] == lab][:K]]
    (out / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in keep))
  llm = root / "semeval_llm"
  llm.mkdir()
  for name in ("edkg_semeval_8-42.jsonl", "scdg_semeval_8-42_18x16.jsonl"):
    recs = [r for r in _lines(shared_data / "semeval_llm" / name) if r["relation"] in LABELS]
    (llm / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
  return root


def test_the_config_reads_the_splits_llm_files_and_untyped_markers():
  c = config_lib.load_config_file("semeval").get_config("k=16,split_seed=87")
  assert c.data.train_file == "semeval/k-shot/16-87/train.json" and c.data.k == 16
  assert c.data.dev_file == "semeval/k-shot/16-87/dev.json" and c.data.test_file == ""
  # K = 16 reuses the split seed's K = 8 LLM files; splits without files get none
  assert c.data.scdg_file == "semeval_llm/scdg_semeval_8-87_18x16.jsonl"
  assert c.data.edkg_file == "semeval_llm/edkg_semeval_8-87.jsonl"
  assert c.data.typed_markers is False and c.data.schema_file == ""
  c21 = config_lib.load_config_file("semeval").get_config("k=8,split_seed=21")
  assert c21.data.scdg_file == c21.data.edkg_file == ""
  with pytest.raises(ValueError, match="unknown config argument 'seed=1'"):
    config_lib.load_config_file("semeval").get_config("seed=1")


@pytest.mark.slow
def test_semeval_prepare_finetune_eval_leave_other_out_of_micro_f1(semeval_dir, tiny_hf_dir,
                                                                   tmp_path):
  c = config_lib.load_config_file("semeval").get_config(f"k={K},split_seed=42")
  c.data.update(data_dir=str(semeval_dir), max_seq_len=64, augment_k=2, corpus="require",
                inverse_augment=True)
  c.model.hf_dir = str(tiny_hf_dir)
  prep = stages.run("prepare", c, tmp_path / "prepared")
  meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
  assert set(meta["label_map"]) == set(LABELS) and meta["typed_markers"] is False
  # K gold rows per label + 2 SCDG rows for each directed label (the LLM writes no `Other`), and
  # a swapped copy of every row of the two directed labels (Other has no inverse)
  inv = meta["inverses"]
  assert inv["map"] == {"Cause-Effect(e1,e2)": "Cause-Effect(e2,e1)",
                        "Cause-Effect(e2,e1)": "Cause-Effect(e1,e2)"}
  assert inv["augment"]["copies"] == 2 * K + 2 * 2
  assert inv["augment"]["by_kind"] == {"gold": 2 * K, "scdg": 2 * 2}
  assert prep["splits"]["train"] == 3 * K + 2 * 2 + 2 * K + 2 * 2 and prep["splits"]["dev"] == 3 * K
  assert prep["splits"]["dev_swap"] == inv["swap_splits"]["dev_swap"] == 2 * K
  corpus = meta["splits"]["corpus"]["by_kind"]
  assert corpus["gold"] == 3 * K and corpus["edkg"] > 0 and corpus["scdg"] > 0

  c.data.prepared_dir = str(tmp_path / "prepared")
  c.train.update(batch_size=8, eval_batch_size=16, epochs=2, eval_every_epochs=2,
                 final_eval_splits="dev", checkpoint_every_seconds=0,
                 optim=dict(learning_rate=1e-3))
  ft = stages.run("finetune", c, tmp_path / "ft", mesh=stage_mesh())
  e = stages.run("eval", c, tmp_path / "eval", mesh=stage_mesh(), init_from=str(tmp_path / "ft"))
  got = e["metrics"]["dev"]
  assert ft["metrics"]["dev"]["direction"] == got["direction"]  # the same model, scored twice
  rows = [json.loads(x) for x in open(tmp_path / "eval" / "predictions.jsonl")]
  rows = [r for r in rows if r["split"] == "dev"]
  assert len(rows) == got["num_examples"] == 3 * K
  gold = np.array([r["gold"] for r in rows])
  pred = np.array([r["predicted"] for r in rows])
  # recomputed by hand: accuracy over every row; micro-F1 over the relation labels only
  assert got["accuracy"] == pytest.approx(float(np.mean(gold == pred)))
  tp = int(np.sum((gold == pred) & (gold != "Other")))
  n_pred = int(np.sum(pred != "Other"))
  n_gold = int(np.sum(gold != "Other"))
  p = tp / n_pred if n_pred else 0.0
  r = tp / n_gold
  want = 2 * p * r / (p + r) if p + r else 0.0
  assert got["micro_f1"] == pytest.approx(want)
  # direction-only errors recounted from the predictions: X(e1,e2) <-> X(e2,e1)
  flip = {"Cause-Effect(e1,e2)": "Cause-Effect(e2,e1)", "Cause-Effect(e2,e1)": "Cause-Effect(e1,e2)"}
  d = got["direction"]
  assert d["direction_errors"] == sum(flip.get(g) == p for g, p in zip(gold, pred))
  assert d["swap_rows"] == 2 * K and 0 <= d["swap_correct"] <= 2 * K
  assert sum(r["swap_rows"] for r in d["by_relation"].values()) == 2 * K
  assert "relation direction" in (tmp_path / "eval" / "report.md").read_text()
  # the markers are untyped in every split (no "* type *" inside them)
  from tkre_jax.data import dataset, features as features_lib  # pylint: disable=import-outside-toplevel
  from tkre_jax.train import loading  # pylint: disable=import-outside-toplevel
  arrays = dataset.load_arrays(tmp_path / "prepared", "train")
  tok = loading.data_tokenizer(meta, c)
  texts = [features_lib.decode_spans(tok, arrays, i)["text"] for i in range(len(arrays["label"]))]
  assert all(" * " not in t and "@" in t and "#" in t for t in texts)
