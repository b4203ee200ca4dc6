"""SaCon relation-aware pre-training (tkre_jax/tasks/label_contrastive.py, tkre_jax/stages/sacon.py).

Library: the symmetric anchored loss against numpy (duplicate labels, padding rows and labels),
entity blanking (rate, seed, spans), BERT's 80/10/10 masking (markers never masked), the label
texts and the seeded batch sampler. Stage (a tiny encoder on fake training relations, 2 CPU
devices): the loss falls, a SIGKILLed run resumes to the uninterrupted run's parameters, relations
shared with the evaluated ones are refused (by sacon itself and, through run.json, by every stage
after it), and mslm, scl, finetune, episodic and episodes start from a sacon workdir.
"""

from __future__ import annotations

import copy
import json
import pathlib
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import STAGE_DEVICES, stage_mesh
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.data import episode_sampler as episodes_lib
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.tasks import losses, masking
from tkre_jax.tasks import label_contrastive as sacon_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import workdir as workdir_lib

pytestmark = pytest.mark.usefixtures("fewer_compiler_optimizations")


# ----------------------------------------------------------------------------- the loss

def _numpy_symmetric_loss(s, lab, y, w, v, scale):
  """The SaCon loss written directly from the formula (float64)."""
  s, lab = np.asarray(s, np.float64), np.asarray(lab, np.float64)
  z = scale * s @ lab.T
  vs, vl = np.flatnonzero(w), np.flatnonzero(v)
  sent = 0.0
  for i in vs:
    row = z[i, vl]
    lse = np.log(np.exp(row - row.max()).sum()) + row.max()
    sent += w[i] * -(z[i, y[i]] - lse)
  label = 0.0
  for j in vl:
    col = z[vs, j]
    lse = np.log(np.exp(col - col.max()).sum()) + col.max()
    label += v[j] * sum(w[i] * -(z[i, j] - lse) for i in vs if y[i] == j)
  return sent / w.sum(), label / v.sum()


def test_symmetric_anchored_loss_matches_numpy_with_duplicate_labels():
  rs = np.random.RandomState(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  s = unit(rs.randn(7, 6)).astype(np.float32)
  lab = unit(rs.randn(4, 6)).astype(np.float32)
  y = np.array([0, 0, 2, 1, 2, 2, 0], np.int32)   # label 0 three times, 2 three times, 1 once
  w = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)  # the last sentence is padding
  v = np.array([1, 1, 1, 0], np.float32)            # label 3 is padding
  c = losses.symmetric_anchored_loss(jnp.asarray(s), jnp.asarray(lab), jnp.asarray(y),
                                     jnp.asarray(w), jnp.asarray(v), jnp.float32(14.3))
  want_sent, want_label = _numpy_symmetric_loss(s, lab, y, w, v, 14.3)
  assert float(c["sent_sum"] / c["sent_weight"]) == pytest.approx(want_sent, rel=1e-5)
  assert float(c["label_sum"] / c["label_weight"]) == pytest.approx(want_label, rel=1e-5)
  assert float(c["sent_weight"]) == 6 and float(c["label_weight"]) == 3
  # Padding neither anchors nor competes: moving it changes nothing.
  s2, lab2 = s.copy(), lab.copy()
  s2[6], lab2[3] = s[0], s[1]
  c2 = losses.symmetric_anchored_loss(jnp.asarray(s2), jnp.asarray(lab2), jnp.asarray(y),
                                      jnp.asarray(w), jnp.asarray(v), jnp.float32(14.3))
  assert float(c2["sent_sum"]) == pytest.approx(float(c["sent_sum"]), rel=1e-6)
  assert float(c2["label_sum"]) == pytest.approx(float(c["label_sum"]), rel=1e-6)
  # top-1 counts, from numpy
  z = 14.3 * s @ lab.T
  best_label = np.argmax(np.where(v[None, :] > 0, z, -np.inf), axis=1)
  assert float(c["sent_correct"]) == sum(best_label[i] == y[i] for i in range(6))
  best_sent = np.argmax(np.where(w[:, None] > 0, z, -np.inf), axis=0)
  assert float(c["label_correct"]) == sum(y[best_sent[j]] == j for j in range(3))


def test_the_loss_is_lowest_when_sentences_sit_on_their_labels():
  lab = np.eye(4, dtype=np.float32)
  y = np.array([0, 1, 2, 3, 0, 1], np.int32)
  w, v = np.ones(6, np.float32), np.ones(4, np.float32)
  aligned = losses.symmetric_anchored_loss(jnp.asarray(lab[y]), jnp.asarray(lab), jnp.asarray(y),
                                           jnp.asarray(w), jnp.asarray(v), jnp.float32(10.0))
  shuffled = losses.symmetric_anchored_loss(jnp.asarray(lab[(y + 1) % 4]), jnp.asarray(lab),
                                            jnp.asarray(y), jnp.asarray(w), jnp.asarray(v),
                                            jnp.float32(10.0))
  assert float(aligned["sent_sum"]) < 0.01 * float(shuffled["sent_sum"])
  assert float(aligned["sent_correct"]) == 6 and float(shuffled["sent_correct"]) == 0


# ----------------------------------------------------------------------------- data

def _instances(n: int) -> list[RelationInstance]:
  out = []
  for i in range(n):
    toks = ("Ann", "Lee", "met", "Bob", "in", "Rome", ".")
    subj, obj = ((0, 2), (3, 4)) if i % 2 == 0 else ((3, 4), (0, 2))
    out.append(RelationInstance(tokens=toks, subj=subj, obj=obj, relation="P1", source=f"r{i}"))
  return out


def test_blanking_draws_at_the_configured_rate_and_is_seeded():
  inst = _instances(4000)
  out, counts = sacon_lib.blank_entities(inst, 0.7, seed=3, blank_word="[UNK]")
  again, counts2 = sacon_lib.blank_entities(inst, 0.7, seed=3, blank_word="[UNK]")
  other, _ = sacon_lib.blank_entities(inst, 0.7, seed=4, blank_word="[UNK]")
  assert out == again and counts == counts2
  assert out != other
  n = len(inst)
  for key in ("subject_blanked", "object_blanked"):
    # binomial(4000, 0.7): sd 29; 5 sd
    assert abs(counts[key] - 0.7 * n) < 5 * np.sqrt(n * 0.7 * 0.3), counts
  subj_blank = sum(o.tokens[o.subj[0]:o.subj[1]] == ("[UNK]",) for o in out)
  obj_blank = sum(o.tokens[o.obj[0]:o.obj[1]] == ("[UNK]",) for o in out)
  assert (subj_blank, obj_blank) == (counts["subject_blanked"], counts["object_blanked"])
  for a, b in zip(inst, out):  # an entity left alone keeps its words; the rest of the text stays
    for span_a, span_b in ((a.subj, b.subj), (a.obj, b.obj)):
      words = b.tokens[span_b[0]:span_b[1]]
      assert words == ("[UNK]",) or words == a.tokens[span_a[0]:span_a[1]]
    assert [t for t in b.tokens if t in ("met", "in", "Rome", ".")] == ["met", "in", "Rome", "."]
  none, c0 = sacon_lib.blank_entities(inst[:50], 0.0, seed=3, blank_word="[UNK]")
  assert none == list(inst[:50]) and c0["subject_blanked"] == 0


def test_bert_masking_80_10_10_and_markers_never_masked():
  rs = np.random.RandomState(0)
  ids = rs.randint(1000, 2000, size=(256, 128)).astype(np.int32)
  span = rs.randint(0, 5, size=(256, 128)).astype(np.int32)  # 0: markers / special: never
  out = masking.bert_mask_tokens(jax.random.key(0), jnp.asarray(ids), jnp.asarray(span),
                                 mask_token_id=103, vocab_size=3000, max_predictions=128,
                                 prob=0.15)
  pos, wts = np.asarray(out["mlm_positions"]), np.asarray(out["mlm_weights"]) > 0
  rows = np.repeat(np.arange(256)[:, None], 128, axis=1)
  picked = np.zeros_like(ids, bool)
  picked[rows[wts], pos[wts]] = True
  assert not picked[span == 0].any()
  maskable = (span > 0).sum()
  assert abs(picked.sum() / maskable - 0.15) < 0.01
  masked = np.asarray(out["masked_input_ids"])
  assert (masked[~picked] == ids[~picked]).all()
  n = picked.sum()
  to_mask = (masked[picked] == 103).mean()
  kept = (masked[picked] == ids[picked]).mean()
  assert abs(to_mask - 0.8) < 0.025 and abs(kept - 0.1) < 0.02, (to_mask, kept, n)  # n ~ 4,000
  np.testing.assert_array_equal(np.asarray(out["mlm_labels"])[wts], ids[rows[wts], pos[wts]])


def test_label_features_name_sep_description(tiny_hf_dir):
  from tkre_jax.model import hub  # pylint: disable=import-outside-toplevel
  tok = hub.load_tokenizer(tiny_hf_dir)
  texts, missing = sacon_lib.label_texts(["P26", "P9"], {"P26": ("spouse", "married person")})
  assert texts == [("spouse", "married person"), ("P9", "")] and missing == 1
  f = sacon_lib.label_features(tok, texts, 8)
  assert tok.decode(f["label_input_ids"][0][f["label_attention_mask"][0] > 0]) == \
      "[CLS] spouse [SEP] married person [SEP]"
  # maskable: the words only, never [CLS] / [SEP] / padding
  assert f["label_span_ids"][0].tolist() == [0, 1, 0, 1, 1, 0, 0, 0]
  assert f["label_span_ids"][1].sum() == len(tok.tokenize("P9"))


def test_batches_are_a_function_of_seed_and_step():
  pool = episodes_lib.flatten({f"P{r}": _instances(5) for r in range(6)})
  n = len(pool.instances)
  arrays = {k: np.arange(n * 4, dtype=np.int32).reshape(n, 4) for k in
            ("input_ids", "attention_mask", "span_ids")}
  arrays["attention_mask"][:] = 1
  arrays.update(subj_pos=np.zeros(n, np.int32), obj_pos=np.ones(n, np.int32))
  labels = {k: np.arange(6 * 3, dtype=np.int32).reshape(6, 3) for k in sacon_lib.LABEL_KEYS}
  kw = dict(relations_per_batch=3, sentences_per_relation=2, seed=5, rows=8, label_rows=4,
            length_multiple=0)
  gen = sacon_lib.sacon_batches(arrays, labels, pool, start_step=0, **kw)
  first = [next(gen) for _ in range(4)]
  resumed = next(sacon_lib.sacon_batches(arrays, labels, pool, start_step=3, **kw))
  for k in first[3]:
    np.testing.assert_array_equal(first[3][k], resumed[k])
  b = first[0]
  assert b["weight"].tolist() == [1] * 6 + [0] * 2 and b["label_weight"].tolist() == [1, 1, 1, 0]
  assert b["label"][:6].tolist() == [0, 0, 1, 1, 2, 2]
  rel_of_row = b["input_ids"][:6, 0] // 4 // 5       # the pool row -> its relation
  rel_of_label = b["label_input_ids"][:3, 0] // 3    # the label row -> its relation
  np.testing.assert_array_equal(rel_of_row, rel_of_label[b["label"][:6]])
  assert len(set(rel_of_label.tolist())) == 3
  with pytest.raises(DataError, match="sentences_per_relation=6.*'P0' \\(5\\)"):
    next(sacon_lib.sacon_batches(arrays, labels, pool, start_step=0,
                                 **{**kw, "sentences_per_relation": 6, "rows": 18}))


# ----------------------------------------------------------------------------- the stage

TRAIN_RELATIONS = [f"P{i}" for i in range(100, 106)]


def _fewrel_file(path: pathlib.Path, relations, per_relation: int = 6) -> pathlib.Path:
  data = {r: [{"tokens": ["The", "entity", f"a{r}{i}", "relates", "to", f"b{r}{i}", "via",
                          r.lower(), "words", "."],
               "h": [f"a{r}{i}", "", [[2]]], "t": [f"b{r}{i}", "", [[5]]]}
              for i in range(per_relation)] for r in relations}
  path.write_text(json.dumps(data))
  return path


SACON_OVERRIDES = {
    "sacon.steps": 8, "sacon.relations_per_batch": 4, "sacon.sentences_per_relation": 2,
    "sacon.head_warmup_steps": 2, "sacon.optim.learning_rate": 1e-3, "sacon.log_every_steps": 1,
    "sacon.checkpoint_every_seconds": 0, "sacon.checkpoint_every_steps": 4,
    "sacon.label_max_len": 16, "sacon.max_predictions": 4, "sacon.label_max_predictions": 4,
    "sacon.blank_prob": 0.5,  # SaCon's default is 0.7; 0.5 keeps both branches in a small batch
}


@pytest.fixture(scope="module")
def sacon_setup(tiny_fewrel, tiny_hf_dir, tiny_prepared, tmp_path_factory):
  """Flags of a tiny sacon run on 6 fake training relations (P102 has no schema entry), next to
  the tiny FewRel set-up (its 4 val_wiki relations are the evaluated ones); the uninterrupted run,
  made with `python -m tkre_jax.main` in this process."""
  root = tmp_path_factory.mktemp("sacon")
  train = _fewrel_file(root / "train.json", TRAIN_RELATIONS)
  (root / "pid2name.json").write_text(json.dumps(
      {r: [f"name of {r}", f"what {r} means"] for r in TRAIN_RELATIONS if r != "P102"}))
  overrides = {"data.data_dir": str(tiny_fewrel), "data.k": 4, "data.max_seq_len": 64,
               "model.hf_dir": str(tiny_hf_dir), "data.prepared_dir": str(tiny_prepared),
               "sacon.train_file": str(train), "sacon.schema_file": str(root / "pid2name.json"),
               **SACON_OVERRIDES}
  return root, overrides


def _args(workdir, overrides, stage="sacon", init_from=""):
  return [f"--stage={stage}", f"--workdir={workdir}", "--mesh=cpu",
          *([f"--init_from={init_from}"] if init_from else []),
          *[f"--config.{k}={v}" for k, v in overrides.items()]]


@pytest.fixture(scope="module")
def straight_sacon(sacon_setup):
  """The uninterrupted run, in this process, with the config and mesh `python -m tkre_jax.main`
  builds from the same flags on a machine of `STAGE_DEVICES` devices."""
  root, overrides = sacon_setup
  workdir = root / "straight"
  stages.run("sacon", _config(overrides), workdir, mesh=stage_mesh())
  return workdir


def _config(overrides):
  c = config_lib.base_config()
  for key, value in overrides.items():
    c.update_from_flattened_dict({key: value})
  return c


@pytest.mark.slow
def test_sacon_trains_both_towers_and_records_its_relations(straight_sacon):
  summary = json.loads((straight_sacon / "summary.json").read_text())
  assert summary["train_relations"] == 6 and summary["train_sentences"] == 36
  assert summary["eval_relations_disjoint"] == 4
  assert summary["labels"]["missing_from_schema"] == 1
  assert summary["head_warmup"]["ran"] and summary["head_warmup"]["steps"] == 2
  assert summary["batch"]["rows"] == 8 and summary["batch"]["label_rows"] == 4
  blanking = summary["blanking"]
  assert blanking["prob"] == 0.5 and blanking["instances"] == 36
  assert 0 < blanking["subject_blanked"] < 36 and 0 < blanking["object_blanked"] < 36, blanking
  rows = [json.loads(x) for x in open(straight_sacon / "metrics.jsonl")]
  losses_ = [r["loss"] for r in rows if r.get("stage") == "sacon" and "loss" in r]
  assert len(losses_) == 8 and np.mean(losses_[-2:]) < np.mean(losses_[:2]), losses_
  tree, _ = ckpt_lib.restore_param_tree(straight_sacon)
  assert sorted(tree) == ["encoder", "label_encoder", "label_mlm_head", "logit_scale", "mlm_head"]
  # the towers trained apart from one copy
  a = tree["encoder"]["layers"]["0"]["attention"]["query"]["kernel"]
  b = tree["label_encoder"]["layers"]["0"]["attention"]["query"]["kernel"]
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
  info = workdir_lib.read(straight_sacon)
  assert info["pretrain_relations"] == sorted(TRAIN_RELATIONS)
  assert len(info["eval_relations"]) == 4


@pytest.mark.subprocess
def test_sigkill_then_rerun_equals_an_uninterrupted_sacon_run(sacon_setup, straight_sacon,
                                                              main_cli):
  from tests.test_trainer import (assert_same_params, kill_after_checkpoint,  # pylint: disable=import-outside-toplevel
                                  train_steps)
  from tests.helpers import main_command  # pylint: disable=import-outside-toplevel
  root, overrides = sacon_setup
  killed = root / "killed"
  code = kill_after_checkpoint(main_command(_args(killed, overrides), devices=STAGE_DEVICES,
                                            step_sleep=0.4), killed, 4)
  assert code == -signal.SIGKILL
  assert not (killed / "summary.json").exists()
  code, _, err = main_cli(*_args(killed, overrides), devices=STAGE_DEVICES)
  assert code == 0, err[-3000:]
  summary = json.loads((killed / "summary.json").read_text())
  assert summary["resumed"] and summary["start_step"] >= 4
  assert summary["head_warmup"]["ran"] is False and "resumed" in summary["head_warmup"]["reason"]
  assert_same_params(straight_sacon, killed)
  assert train_steps(killed, "sacon") == list(range(1, 9))


def test_sacon_refuses_relations_a_run_is_evaluated_on(sacon_setup, tiny_fewrel, tmp_path):
  root, overrides = sacon_setup
  shared = list(json.load(open(tiny_fewrel / "fewrel" / "val_wiki.json")))[0]
  train = _fewrel_file(tmp_path / "train.json", TRAIN_RELATIONS[:5] + [shared])
  c = _config({**overrides, "sacon.train_file": str(train)})
  with pytest.raises(DataError, match=f"share 1 relation.*{shared}"):
    stages.run("sacon", c, tmp_path / "run", mesh=stage_mesh())
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_every_stage_starts_from_a_sacon_workdir(sacon_setup, straight_sacon, tmp_path):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tkre_jax.parallel.sharding import RULES  # pylint: disable=import-outside-toplevel
  from tkre_jax.tasks import classifier  # pylint: disable=import-outside-toplevel
  from tkre_jax.train import loading, runtime  # pylint: disable=import-outside-toplevel
  root, overrides = sacon_setup
  src = str(straight_sacon)
  tree, _ = ckpt_lib.restore_param_tree(straight_sacon)
  # the weights a later stage starts from are the sacon sentence encoder's
  c = _config(overrides)
  info = workdir_lib.read(straight_sacon)
  enc_cfg = workdir_lib.encoder_config(info)
  model = runtime.create_sharded(classifier.classifier_builder(enc_cfg, 4, 0.1, 0), stage_mesh(),
                                 RULES["dp"])
  ours = workdir_lib.describe("finetune", c, label_map={"Px": 0}, enc_config=enc_cfg,
                              tokenizer=workdir_lib.load_tokenizer(straight_sacon), prepared_dir="")
  _, loaded = loading.init_weights(c, model, src, ours, optional=())
  assert loaded == ["encoder"]
  got = nnx.to_pure_dict(model.params["encoder"])
  for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(got),
                               jax.tree_util.tree_leaves_with_path(tree["encoder"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))

  quick = {**overrides, "mslm.split": "train", "mslm.steps": 2, "mslm.batch_size": 8,
           "scl.split": "train", "scl.steps": 2, "scl.batch_size": 8, "train.epochs": 1,
           "train.batch_size": 8, "train.eval_batch_size": 16, "episodes.train_file":
           overrides["sacon.train_file"], "episodic.n_way": 3, "episodic.k_shot": 2,
           "episodic.q_query": 2, "episodic.steps": 2, "episodes.settings": "3-1",
           "episodes.q_query": 2, "episodes.num_episodes": 5, "episodes.batch_size": 8}
  cq = _config(quick)
  mesh = stage_mesh()
  mslm = stages.run("mslm", cq, tmp_path / "mslm", mesh=mesh, init_from=src)
  assert mslm["loaded"] == ["encoder", "mlm_head"] and src in mslm["weights_from"]
  assert mslm["head_warmup"] == {"ran": False, "reason": "the starting weights have an MLM head"}
  scl = stages.run("scl", cq, tmp_path / "scl", mesh=mesh, init_from=src)
  assert scl["loaded"] == ["encoder", "mlm_head"] and src in scl["weights_from"]
  ft = stages.run("finetune", cq, tmp_path / "ft", mesh=mesh, init_from=src)
  assert src in ft["encoder_from"]
  # the chain keeps the pre-training relations: finetune's run.json inherits them
  assert workdir_lib.read(tmp_path / "ft")["pretrain_relations"] == sorted(TRAIN_RELATIONS)
  ep = stages.run("episodic", cq, tmp_path / "episodic", mesh=mesh, init_from=src)
  assert src in ep["encoder_from"]
  ev = stages.run("episodes", cq, tmp_path / "episodes", mesh=mesh, init_from=src)
  assert src in ev["encoder_from"] and ev["metrics"]["3-way 1-shot"]["episodes"] == 5
  # label-fused prototypes and zero-shot from the sacon label encoder
  cl = _config({**quick, "episodes.settings": "3-1,3-0", "episodes.prototype": "mixed",
                "episodes.descriptions": "label_encoder"})
  lab = stages.run("episodes", cl, tmp_path / "episodes_labels", mesh=mesh, init_from=src)
  assert lab["descriptions"] == "label_encoder" and src in lab["label_encoder"]["from"]
  assert set(lab["metrics"]) == {"3-way 1-shot", "3-way 0-shot"}
  assert lab["label_encoder"]["relations"] == 4 and lab["label_encoder"]["missing_from_schema"] == 0


@pytest.mark.slow
def test_stages_refuse_weights_pretrained_on_their_relations(sacon_setup, straight_sacon,
                                                             tiny_prepared, tmp_path):
  root, overrides = sacon_setup
  leaky = tmp_path / "leaky_sacon"
  shutil.copytree(straight_sacon, leaky)
  info = json.loads((leaky / "run.json").read_text())
  evaluated = sorted(json.loads((tiny_prepared / "meta.json").read_text())["label_map"])
  info["pretrain_relations"] = sorted(info["pretrain_relations"] + evaluated[:2])
  (leaky / "run.json").write_text(json.dumps(info))
  c = _config({**overrides, "train.epochs": 1, "train.batch_size": 8, "mslm.split": "train"})
  for stage in ("finetune", "mslm"):
    with pytest.raises(workdir_lib.MismatchError,
                       match=f"pre-trained on 2 relation.*{evaluated[0]}, {evaluated[1]}"):
      stages.run(stage, c, tmp_path / stage, mesh=stage_mesh(), init_from=str(leaky))
    assert not (tmp_path / stage / "checkpoints").exists()


@pytest.mark.slow
def test_head_init_labels_rows_are_the_projected_label_embeddings(sacon_setup, straight_sacon):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tkre_jax.model.tasks import SaconModel  # pylint: disable=import-outside-toplevel
  from tkre_jax.parallel.sharding import RULES  # pylint: disable=import-outside-toplevel
  from tkre_jax.stages import finetune  # pylint: disable=import-outside-toplevel
  from tkre_jax.tasks import classifier  # pylint: disable=import-outside-toplevel
  from tkre_jax.train import runtime  # pylint: disable=import-outside-toplevel
  root, overrides = sacon_setup
  c = _config(overrides)
  info = workdir_lib.read(straight_sacon)
  enc_cfg = workdir_lib.encoder_config(info)
  label_map = {"P101": 0, "P102": 1, "P100": 2}  # P102: no schema entry (its id's words)
  model = runtime.create_sharded(classifier.classifier_builder(enc_cfg, 3, 0.1, 0), stage_mesh(),
                                 RULES["dp"])
  w1 = np.asarray(model.params["classifier"]["hidden"]["kernel"][...])
  b1 = np.asarray(model.params["classifier"]["hidden"]["bias"][...])
  norm = float(np.mean(np.linalg.norm(np.asarray(model.params["classifier"]["output"]["kernel"][...]),
                                      axis=0)))
  c.data.schema_file = c.sacon.schema_file
  out = finetune.init_head_from_labels(c, model, label_map, str(straight_sacon))
  assert out["head_init"]["labels"] == 3 and out["head_init"]["missing_from_schema"] == 1
  # The label embeddings, computed directly with the sacon model's label tower.
  tree, _ = ckpt_lib.restore_param_tree(straight_sacon)
  sacon = SaconModel(enc_cfg, temperature=0.07, rngs=nnx.Rngs(0))
  params = nnx.state(sacon, nnx.Param)
  runtime.put_subtree(params, (), tree, None)
  nnx.update(sacon, params)
  tok = workdir_lib.load_tokenizer(straight_sacon)
  texts = [("name of P101", "what P101 means"), ("P102", ""), ("name of P100", "what P100 means")]
  f = sacon_lib.label_features(tok, texts, 16)
  hidden = sacon.label_encoder(jnp.asarray(f["label_input_ids"]),
                               jnp.asarray(f["label_attention_mask"]))
  emb = np.asarray(sacon.label_embedding(hidden, jnp.asarray(f["label_attention_mask"])))
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  proj = np.maximum(emb @ w1 + b1, 0.0)
  want = norm * proj / np.linalg.norm(proj, axis=1, keepdims=True)
  got = np.asarray(model.params["classifier"]["output"]["kernel"][...])
  np.testing.assert_allclose(got, want.T, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(model.params["classifier"]["output"]["bias"][...]), 0.0)


@pytest.mark.parametrize("shared", [False, True])
def test_the_label_encoder_has_its_own_weights_or_shares_the_sentence_encoders(shared):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tkre_jax.model.encoder_config import EncoderConfig  # pylint: disable=import-outside-toplevel
  cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                      intermediate_size=32, max_position_embeddings=32)
  model = sacon_lib.builder(cfg, 0, shared_label_encoder=shared, temperature=0.07)()
  graphdef, params = nnx.split(model, nnx.Param)
  assert ("label_encoder" in params) is not shared and ("label_mlm_head" in params) is not shared
  rs = np.random.RandomState(0)
  batch = {"input_ids": rs.randint(5, 50, (4, 12)).astype(np.int32),
           "attention_mask": np.ones((4, 12), np.int32), "span_ids": np.ones((4, 12), np.int32),
           "subj_pos": np.array([1, 2, 1, 3], np.int32), "obj_pos": np.array([5, 6, 7, 8], np.int32),
           "label": np.array([0, 0, 1, 1], np.int32), "weight": np.ones(4, np.float32),
           "label_input_ids": rs.randint(5, 50, (2, 6)).astype(np.int32),
           "label_attention_mask": np.ones((2, 6), np.int32),
           "label_span_ids": np.ones((2, 6), np.int32), "label_weight": np.ones(2, np.float32)}
  loss_fn = sacon_lib.make_loss_fn(sacon_lib.SaconStepConfig(mask_token_id=4, vocab_size=50))
  (loss, m), grads = jax.value_and_grad(loss_fn(graphdef), has_aux=True)(
      params, jax.tree.map(jnp.asarray, batch), jax.random.key(0), lambda x: x)
  assert np.isfinite(float(loss))
  # total = MLM(E_s) + MLM(E_l) + (L_sent + L_label) / 2, each part recomputed in numpy from the
  # encoders' states under the same masks and dropout keys (SaCon, Sec. 3.3; the authors' one-hot
  # label-anchored loss sums each label's positives)
  cfg = sacon_lib.SaconStepConfig(mask_token_id=4, vocab_size=50)
  k_ms, k_ml, k_ds, k_dl = jax.random.split(jax.random.key(0), 4)
  b = jax.tree.map(jnp.asarray, batch)
  ms = masking.bert_mask_tokens(k_ms, b["input_ids"], b["span_ids"], mask_token_id=4,
                                vocab_size=50, max_predictions=cfg.max_predictions, prob=cfg.mlm_prob)
  ml = masking.bert_mask_tokens(k_ml, b["label_input_ids"], b["label_span_ids"], mask_token_id=4,
                                vocab_size=50, max_predictions=cfg.label_max_predictions,
                                prob=cfg.mlm_prob)
  label_encoder, label_head = model.label_tower()
  hs = model.encoder(ms["masked_input_ids"], b["attention_mask"], dropout_rng=k_ds)
  hl = label_encoder(ml["masked_input_ids"], b["label_attention_mask"], dropout_rng=k_dl)

  def mlm_np(encoder, head, hidden, masked):
    logits = np.asarray(model.mlm_logits(encoder, head, hidden, masked["mlm_positions"]), np.float64)
    lab, w = np.asarray(masked["mlm_labels"]), np.asarray(masked["mlm_weights"])
    ce = -np.take_along_axis(_log_softmax(logits), lab[..., None], -1)[..., 0]
    return np.sum(w * ce) / max(np.sum(w), 1.0)

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  hs_np, hl_np = np.asarray(hs, np.float64), np.asarray(hl, np.float64)
  sent = unit(np.concatenate([hs_np[np.arange(4), batch["subj_pos"]],
                              hs_np[np.arange(4), batch["obj_pos"]]], -1))
  mask = batch["label_attention_mask"][..., None]
  lab_vec = unit(np.concatenate([hl_np[:, 0], (hl_np * mask).sum(1) / mask.sum(1)], -1))
  z = (1 / 0.07) * sent @ lab_vec.T                                   # [4 sentences, 2 labels]
  y = batch["label"]
  l_sent = -np.mean(_log_softmax(z)[np.arange(4), y])
  col = _log_softmax(z.T)                                             # each label over sentences
  l_label = np.mean([-sum(col[j, i] for i in range(4) if y[i] == j) for j in range(2)])
  want = (mlm_np(model.encoder, model.mlm_head, hs, ms) + mlm_np(label_encoder, label_head, hl, ml)
          + 0.5 * (l_sent + l_label))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(m["sent_loss"]) == pytest.approx(l_sent, rel=1e-5)
  assert float(m["label_loss"]) == pytest.approx(l_label, rel=1e-5)
  assert float(m["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-6)
  # the label term reaches the tower that reads the labels, and t gets a gradient
  tower = "encoder" if shared else "label_encoder"
  g = grads[tower]["word_embeddings"][...]
  assert float(jnp.abs(g[np.unique(batch["label_input_ids"])]).sum()) > 0
  assert float(jnp.abs(grads["logit_scale"]["log_scale"][...])) > 0


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))
