"""Using a trained model, on a tiny finetune workdir (2-layer hidden-32 encoder, real FewRel
sentences: conftest's shared `tiny_finetune`): the Python API predicts what `--stage=eval`
predicted; the CLI (main, run in this process) writes an error entry per bad record and predicts
the others; eval writes per-example results; the export restores exactly (and, with torch
installed, HF `AutoModel` gives our hidden states); training wrote TensorBoard events matching
metrics.jsonl."""

from __future__ import annotations

import json
import os
import pathlib
import stat

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import STAGE_DEVICES, stage_mesh
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.data import preparation
from tkre_jax.data.predict_input import read_input
from tkre_jax.infer import extractor
from tkre_jax.model import hf_import
from tkre_jax.text import find_mentions
from tkre_jax.train import runtime, tensorboard

# The eval and the predictions compile as the shared finetune run did (XLA's optimisations off).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fewer_compiler_optimizations")]


@pytest.fixture(scope="module")
def trained(tiny_finetune, tmp_path_factory):
  """conftest's shared tiny finetune run (in <root>/finetune), its eval (<root>/eval) and a
  RelationExtractor of it."""
  workdir, c, _, _ = tiny_finetune
  root = tmp_path_factory.mktemp("predict")
  (root / "finetune").symlink_to(workdir, target_is_directory=True)
  mesh = stage_mesh()
  stages.run("eval", config_lib.base_config(), root / "eval", mesh=mesh,
             init_from=str(root / "finetune"))
  rex = extractor.RelationExtractor.from_workdir(root / "finetune", mesh=mesh)
  return root, c, mesh, rex


def as_record(inst, by_string: bool = False) -> dict:
  """A prediction record of a tokenized instance: the tokens joined by spaces, character spans."""
  text = " ".join(inst.tokens)
  starts = np.cumsum([0] + [len(t) + 1 for t in inst.tokens])
  rec = {"text": text, "id": inst.source}
  for key, (s, e) in (("subject", inst.subj), ("object", inst.obj)):
    span = {"start": int(starts[s]), "end": int(starts[e] - 1)}
    rec[key] = text[span["start"]:span["end"]] if by_string else span
  return rec


def test_api_predictions_equal_eval_predictions(trained):
  root, c, _, rex = trained
  rows = [json.loads(line) for line in open(root / "eval" / "predictions.jsonl")]
  assert len(rows) == 32 and {r["split"] for r in rows} == {"dev", "test"}
  assert set(rows[0]) == {"split", "id", "gold", "predicted", "probability", "gold_name",
                          "predicted_name"}
  schema = preparation.read_schema(c)
  assert all(r["gold_name"] == schema[r["gold"]][0] and r["predicted_name"] == schema[r["predicted"]][0]
             for r in rows)
  test = preparation.load_splits(c)["test"]
  got = rex.predict([as_record(inst) for inst in test], top_k=4)
  direct = rex.predict(test, top_k=4)  # RelationInstances as they are
  want = {r["id"]: r for r in rows if r["split"] == "test"}
  assert len(got) == len(test) == len(want) == 16
  for inst, g, d in zip(test, got, direct):
    w = want[inst.source]
    assert g["id"] == inst.source and g["relation"] == w["predicted"] == d["relation"]
    assert g["probability"] == pytest.approx(w["probability"], abs=1e-5)
    assert d["probability"] == pytest.approx(g["probability"], abs=1e-6)
    assert d["gold"] == w["gold"] == inst.relation
    assert [t["relation"] for t in g["top_k"]][0] == g["relation"] and len(g["top_k"]) == 4
    assert g["relation_name"] == schema[g["relation"]][0]
    assert [t["name"] for t in g["top_k"]] == [schema[t["relation"]][0] for t in g["top_k"]]
    assert sum(t["probability"] for t in g["top_k"]) == pytest.approx(1.0, abs=1e-5)
  # The eval summary's test accuracy is that of these predictions.
  summary = json.load(open(root / "eval" / "summary.json"))
  acc = np.mean([g["relation"] == inst.relation for inst, g in zip(test, got)])
  assert summary["metrics"]["test"]["accuracy"] == pytest.approx(acc)


def test_span_and_string_entities_predict_the_same(trained):
  _, c, _, rex = trained
  test = preparation.load_splits(c)["test"]
  unique = [inst for inst in test
            if all(len([m for m in find_mentions(as_record(inst, True)["text"], as_record(inst, True)[k])
                        if m.whole_word]) == 1 for k in ("subject", "object"))]
  assert len(unique) >= 8
  by_span = rex.predict([as_record(i) for i in unique])
  by_string = rex.predict([as_record(i, by_string=True) for i in unique])
  assert by_span == by_string


def test_threshold_returns_no_relation_below_it(trained):
  _, c, _, rex = trained
  records = [as_record(i) for i in preparation.load_splits(c)["test"][:4]]
  with pytest.raises(ValueError, match="needs a no-relation class"):
    rex.predict(records, threshold=0.5)
  rex.no_relation = rex.labels[2]  # as if the label map had one
  try:
    out = rex.predict(records, top_k=4, threshold=1.01)
    kept = rex.predict(records, top_k=4, threshold=0.0)
  finally:
    rex.no_relation = None
  plain = rex.predict(records, top_k=4)
  assert kept == plain
  assert {o["relation"] for o in out} == {rex.labels[2]}
  for o, p in zip(out, plain):
    assert o["top_k"] == p["top_k"]
    assert o["probability"] == next(t["probability"] for t in p["top_k"]
                                    if t["relation"] == rex.labels[2])


def test_cli_writes_an_error_entry_per_bad_record(trained, tmp_path, main_cli):
  root, c, _, rex = trained
  test = preparation.load_splits(c)["test"]
  good = [as_record(test[0]), as_record(test[5], by_string=True)]
  text = "Ada Lovelace worked with Charles Babbage in London ."
  bad = [
      {"text": text, "subject": "Alan Turing", "object": "London"},                # missing
      {"text": "London and London", "subject": "London", "object": "and"},           # ambiguous
      {"text": text, "subject": {"start": 0, "end": 400}, "object": "London"},       # out of range
      {"text": "", "subject": "a", "object": "b"},                                   # empty text
      {"text": text, "subject": "Ada Lovelace", "object": "Lovelace worked"},        # overlap
      {"text": text, "subject": 12, "object": "London"},                             # field type
      {"text": text, "subject": "Ada Lovelace", "object": "London", "date": "1843"},  # unknown field
  ]
  lines = [json.dumps(good[0])] + [json.dumps(b) for b in bad] + ["{oops"] + [json.dumps(good[1])]
  src = tmp_path / "in.jsonl"
  src.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out" / "pred.jsonl"
  code, stdout, err = main_cli("--stage=predict", f"--init_from={root / 'finetune'}",
                               f"--input={src}", f"--output={out}", "--top_k=2",
                               devices=STAGE_DEVICES)
  assert code == 0, err[-3000:]
  printed = json.loads(stdout[stdout.index("{"):])
  assert printed["records"] == {"total": 10, "predicted": 2, "errors": 8,
                                "gold_not_in_label_map": 0}
  assert sorted(p.name for p in out.parent.iterdir()) == ["pred.jsonl"]  # no temporary file left
  rows = [json.loads(line) for line in open(out)]
  assert [r["line"] for r in rows] == list(range(1, 11))
  reasons = ["subject 'Alan Turing' does not occur", "subject 'London' is ambiguous",
             "subject span [0, 400) is out of range", "text is empty",
             "subject [0, 12) and object [4, 19) overlap",
             "subject must be a string or a span", "unknown field(s) ['date']", "invalid JSON"]
  for row, reason in zip(rows[1:9], reasons):
    assert set(row) == {"line", "error"} and reason in row["error"], (row, reason)
  want = rex.predict(good, top_k=2)
  for row, w in zip((rows[0], rows[9]), want):
    assert row["id"] == w["id"] and row["relation"] == w["relation"] and len(row["top_k"]) == 2
    assert row["probability"] == pytest.approx(w["probability"], abs=1e-6)


def test_report_and_confusion_matrix_name_the_relations(trained):
  root, c, _, rex = trained
  schema = preparation.read_schema(c)
  assert rex.relation_names == {r: schema[r][0] for r in rex.labels}
  assert json.load(open(root / "finetune" / "run.json"))["relation_names"] == rex.relation_names
  table = (root / "eval" / "report.md").read_text()
  for r in rex.labels:  # "| P931 (place served by transport hub) | ..."
    assert f"| {r} ({schema[r][0]}) |" in table
  assert (root / "eval" / "confusion_test.png").stat().st_size > 1000


def test_gold_outside_the_label_map_is_warned_and_counted(trained, tmp_path, caplog):
  root, c, mesh, rex = trained
  test = preparation.load_splits(c)["test"]
  records = [dict(as_record(i), relation=i.relation) for i in test[:3]]
  records[1]["relation"] = "P9999"
  records[2]["relation"] = "P9999"
  with caplog.at_level("WARNING"):
    out = rex.predict(records)
  assert [r.get("gold_in_label_map", True) for r in out] == [True, False, False]
  assert "2 record(s) have a gold relation that is not in the model's label map" in caplog.text
  assert "'P9999' x2" in caplog.text
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in records))
  summary = stages.run("predict", config_lib.base_config(), tmp_path / "work", mesh=mesh,
                       init_from=str(root / "finetune"), input_path=str(src),
                       output_path=str(tmp_path / "out.jsonl"))
  assert summary["records"] == {"total": 3, "predicted": 3, "errors": 0, "gold_not_in_label_map": 2}
  assert summary["accuracy_on_gold"] == (out[0]["relation"] == records[0]["relation"]) / 3


def test_gold_format_input_is_predicted_with_its_labels(trained):
  _, c, _, rex = trained
  fmt, items = read_input(pathlib.Path(c.data.data_dir) / "fewrel" / "val_wiki.json")
  assert fmt == "fewrel" and len(items) == 48
  rows = rex.predict_items(items)
  assert all("error" not in r and r["gold"] in rex.label_map for r in rows)


def test_export_round_trip_is_exact(trained, tmp_path):
  root, c, mesh, rex = trained
  out = tmp_path / "hf"
  summary = stages.run("export", config_lib.base_config(), None, mesh=mesh,
                       init_from=str(root / "finetune"), output_path=str(out))
  assert {"config.json", "model.safetensors", "tokenizer.json", "relation_head.json",
          "relation_head.safetensors"} <= set(summary["files"])
  # Readable like `save_pretrained`'s output: the modes a plain write gives (0o644 / 0o755 under
  # umask 022), not the 0o600 / 0o700 of the temporary folder it is built in.
  old_umask = os.umask(0o022)
  os.umask(old_umask)
  assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~old_umask
  for p in out.iterdir():
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~old_umask, p.name
  restored = extractor.restore_classifier(root / "finetune", mesh)
  ours = jax.tree.map(np.asarray, nnx.to_pure_dict(restored.params))
  _, encoder, mlm = hf_import.load_hf_encoder(out)
  assert not mlm
  theirs = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))
  flat_o = jax.tree_util.tree_leaves_with_path(ours["encoder"])
  flat_t = jax.tree_util.tree_leaves_with_path(theirs)
  assert [p for p, _ in flat_o] == [p for p, _ in flat_t] and len(flat_o) > 30
  for (path, a), (_, b) in zip(flat_o, flat_t):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  meta, head = hf_import.load_relation_head(out)
  assert meta["label_map"] == rex.label_map and meta["max_seq_len"] == 64
  assert meta["relation_names"] == rex.relation_names and len(rex.relation_names) == 4
  assert meta["typed_markers"] is False  # FewRel's gold rows carry no entity types (data/markers.py)
  for module in ("hidden", "output"):
    for field in ("kernel", "bias"):
      np.testing.assert_array_equal(head[module][field], ours["classifier"][module][field])
  # Our API on the export predicts what it predicts from the workdir.
  records = [as_record(i) for i in preparation.load_splits(c)["test"]]
  from_export = extractor.RelationExtractor.from_export(out, mesh=mesh).predict(records)
  for a, b in zip(from_export, rex.predict(records)):
    assert a["relation"] == b["relation"] and a["relation_name"] == b["relation_name"]
    assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)
  # A second export replaces the first; a foreign folder is refused.
  stages.run("export", config_lib.base_config(), None, mesh=mesh,
             init_from=str(root / "finetune"), output_path=str(out))
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not an earlier export"):
    stages.run("export", config_lib.base_config(), None, mesh=mesh,
               init_from=str(root / "finetune"), output_path=str(tmp_path / "other"))


def test_hf_automodel_hidden_states_match_ours(trained, tmp_path):
  torch = pytest.importorskip("torch", reason="torch is not installed (optional): the HF "
                              "AutoModel comparison needs it")
  transformers = pytest.importorskip("transformers")
  root, c, mesh, rex = trained
  out = tmp_path / "hf"
  stages.run("export", config_lib.base_config(), None, mesh=mesh,
             init_from=str(root / "finetune"), output_path=str(out))
  feats, errors = rex.featurize(preparation.load_splits(c)["test"][:6])
  assert not any(errors)
  model = rex.restored.model.merge(rex.restored.params)
  ours = np.asarray(model.encoder(feats["input_ids"], feats["attention_mask"]))
  hf = transformers.AutoModel.from_pretrained(str(out)).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(feats["input_ids"], dtype=torch.long),
                attention_mask=torch.tensor(feats["attention_mask"], dtype=torch.long)
                ).last_hidden_state.numpy()
  mask = feats["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4, rtol=0)


def test_training_wrote_tensorboard_events_matching_metrics(trained):
  root, _, _, _ = trained
  scalars = tensorboard.read_scalars(root / "finetune" / tensorboard.TB_DIR)
  records = runtime.MetricsWriter(root / "finetune").records("finetune")
  steps = [r for r in records if "loss" in r]
  for key in ("loss", "grad_norm", "learning_rate", "steps_per_second"):
    got = scalars[f"finetune/{key}"]
    assert [s for s, _ in got] == list(range(1, 33))
    np.testing.assert_allclose([v for _, v in got], [r[key] for r in steps], rtol=1e-6)
  dev = scalars["finetune/dev_micro_f1"]
  assert [s for s, _ in dev] == [8, 16, 24, 32]
  np.testing.assert_allclose([v for _, v in dev],
                             [r["dev_micro_f1"] for r in records if "dev_micro_f1" in r], rtol=1e-6)
