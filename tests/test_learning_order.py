"""FineCL learning order: the weights, the stage on a toy set with a mislabelled class, the uses in
fine-tuning (weights, dropping) and in SCL's contrastive term, and exact resume after SIGKILL."""

import json
import math
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tkre_jax import stages
from tkre_jax.data import row_weights as order_lib
from tkre_jax.data import pipeline
from tkre_jax.tasks import classifier, losses
from tests.helpers import stage_mesh
from tests.test_losses import _scl_inputs

STAGE_DEVICES = 2


# ----------------------------------------------------------------------------- the weights

def test_capped_finecl_weights_follow_the_formula():
  # epochs 1..7 and never; cap 5: k' = 1, 2, 3, 5, 5, 5 -> k_min 1, k_max 5
  first = np.array([1, 2, 3, 5, 6, 7, 0])
  f, w = order_lib.finecl_weights(first, cap_epoch=5, schedule="capped")
  want_f = [1.0, 0.75, 0.5, 0.0, 0.0, 0.0]
  np.testing.assert_allclose(f[:6], want_f)
  np.testing.assert_allclose(w[:6], np.exp(want_f))
  assert np.isnan(f[6]) and w[6] == 0.0
  assert w[:6].min() == pytest.approx(1.0) and w[:6].max() == pytest.approx(math.e)
  # every learned row in the same epoch: f = 1, w = e
  for schedule in order_lib.SCHEDULES:
    f, w = order_lib.finecl_weights(np.array([2, 2, 0]), cap_epoch=5, schedule=schedule)
    np.testing.assert_allclose(w, [math.e, math.e, 0.0])
  with pytest.raises(ValueError, match="cap_epoch"):
    order_lib.finecl_weights(first, cap_epoch=0)


def test_first_epochs_keep_the_earliest():
  first = np.zeros(4, np.int64)
  first = order_lib.update_first_epochs(first, np.array([True, False, False, True]), 1)
  first = order_lib.update_first_epochs(first, np.array([False, True, False, True]), 2)
  first = order_lib.update_first_epochs(first, np.array([True, True, False, False]), 3)
  assert first.tolist() == [1, 2, 0, 1]


def test_row_keys_drop_directories_and_find_scdg_rows_anywhere():
  assert order_lib.row_key("scdg:/data/fewrel_llm/s.jsonl:17") == "scdg:s.jsonl:17"
  assert order_lib.row_key("/a/b/val_wiki.json:P26[3]") == "val_wiki.json:P26[3]"
  assert order_lib.kind_of("scdg:/x/s.jsonl:1") == "scdg"
  assert order_lib.kind_of("/x/val_wiki.json:P26[3]") == "gold"
  table = {"scdg:s.jsonl:1": {"first_epoch": 3, "weight": 1.5},
           "scdg:s.jsonl:2": {"first_epoch": None, "weight": 0.0}}
  w, counts = order_lib.lookup(table, ["scdg:/other/dir/s.jsonl:1", "scdg:/d/s.jsonl:2",
                                       "edkg:/d/e.jsonl:0"])
  np.testing.assert_allclose(w, [1.5, 0.0, math.e], rtol=1e-6)
  assert counts == {"rows": 3, "scored": 2, "unscored": 1, "never_learned": 1}


def test_apply_weights_or_drops_only_never_learned_scdg_rows():
  arrays = {"label": np.arange(4), "source": np.array(
      ["/d/g.json:0", "scdg:/d/s.jsonl:0", "scdg:/d/s.jsonl:1", "/d/g.json:1"], dtype=object)}
  table = {"g.json:0": {"first_epoch": None, "weight": 0.0},
           "scdg:s.jsonl:0": {"first_epoch": None, "weight": 0.0},
           "scdg:s.jsonl:1": {"first_epoch": 2, "weight": 2.0},
           "g.json:1": {"first_epoch": 1, "weight": math.e}}
  out, report = order_lib.apply(arrays, table, "drop_unlearned")
  assert out["label"].tolist() == [0, 2, 3]  # the gold row is never dropped
  assert report["dropped"] == 1 and report["never_learned"] == 2
  out, report = order_lib.apply(arrays, table, "weight")
  np.testing.assert_allclose(out[order_lib.WEIGHT_KEY], [0.0, 0.0, 2.0, math.e], rtol=1e-6)
  assert out["label"].tolist() == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="must be one of"):
    order_lib.apply(arrays, table, "both")


# ----------------------------------------------------------------------------- the losses

def test_weighted_classifier_loss_is_the_weighted_mean():
  rs = np.random.RandomState(0)
  logits = rs.randn(5, 3).astype(np.float32)
  labels = np.array([0, 2, 1, 1, 0], np.int32)
  batch = {"weight": np.array([1, 1, 1, 1, 0], np.float32),
           pipeline.INSTANCE_WEIGHT_KEY: np.array([2.0, 1.0, 0.0, 1.5, 3.0], np.float32)}
  w = np.asarray(classifier.row_weights({k: jnp.asarray(v) for k, v in batch.items()}))
  np.testing.assert_allclose(w, [2.0, 1.0, 0.0, 1.5, 0.0])
  s, total = losses.classification_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w))
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  ce = -logp[np.arange(5), labels]
  np.testing.assert_allclose(float(s) / float(total), (w * ce).sum() / w.sum(), rtol=1e-6)


def _weighted_scl_reference(anchors, positives, negatives, labels, weights, neg_valid, u, tau):
  """FineCL-weighted SCL with explicit loops in float64: row i's term times weights_i * u_i, and
  the exp-term of another relation's span p_j times u_j; context spans and anchors unweighted."""
  a, p, n = (np.asarray(x, np.float64) for x in (anchors, positives, negatives))
  w = np.asarray(weights, np.float64) * np.asarray(u, np.float64)
  total = 0.0
  for i in range(len(labels)):
    if w[i] == 0:
      continue
    q = a[labels[i]]
    denom = np.exp(q @ p[i] / tau)
    for j in range(len(labels)):
      if w[j] != 0 and neg_valid[j]:
        denom += np.exp(q @ n[j] / tau)
      if w[j] != 0 and labels[j] != labels[i]:
        denom += u[j] * np.exp(q @ p[j] / tau)
    la = -q @ p[i] / tau + np.log(denom)
    lb = -p[i] @ q / tau + np.log(sum(np.exp(p[i] @ a[r] / tau) for r in range(len(a))))
    total += w[i] * 0.5 * (la + lb)
  return total


@pytest.mark.parametrize("tau", [0.05, 0.1])
def test_weighted_scl_loss_matches_numpy(tau):
  anchors, positives, negatives, labels, weights, neg_valid = _scl_inputs(3)
  u = np.array([1.0, math.e, 1.3, 0.0, 2.0, 1.0, 1.7], np.float32)  # row 3 never learned
  s, _, _ = jax.jit(losses.scl_loss, static_argnames="tau")(
      jnp.asarray(anchors), jnp.asarray(positives), jnp.asarray(negatives), jnp.asarray(labels),
      jnp.asarray(weights * u), tau=tau, negative_valid=jnp.asarray(neg_valid),
      negative_weights=jnp.asarray(u))
  want = _weighted_scl_reference(anchors, positives, negatives, labels, weights, neg_valid, u, tau)
  np.testing.assert_allclose(float(s), want, rtol=1e-5)
  # all-ones weights are the unweighted loss
  ones = np.ones(len(labels), np.float32)
  s1, _, _ = losses.scl_loss(jnp.asarray(anchors), jnp.asarray(positives), jnp.asarray(negatives),
                             jnp.asarray(labels), jnp.asarray(weights), tau=tau,
                             negative_valid=jnp.asarray(neg_valid), negative_weights=jnp.asarray(ones))
  s0, _, _ = losses.scl_loss(jnp.asarray(anchors), jnp.asarray(positives), jnp.asarray(negatives),
                             jnp.asarray(labels), jnp.asarray(weights), tau=tau,
                             negative_valid=jnp.asarray(neg_valid))
  np.testing.assert_allclose(float(s1), float(s0), rtol=1e-6)


# ----------------------------------------------------------------------------- the stage

RELATIONS = {"P1": "founded", "P2": "married", "P3": "painted", "P4": "coached"}
NOISY = "P4"  # its SCDG rows carry P1's keyword: the mislabelled class


NAMES = ("john mary james anna peter paul david sarah mark laura george emma frank alice henry "
         "julia oscar helen louis grace").split()
CITIES = ("paris london berlin rome madrid vienna prague dublin oslo lisbon athens cairo tokyo "
          "delhi moscow warsaw boston chicago denver sydney").split()


def _pair(p: int) -> tuple[str, str]:
  """Entity pair number p (0-79), each a single word piece; no two numbers share a pair."""
  return NAMES[p % 20], CITIES[(p // 20 + 3 * (p % 20)) % 20]


def _toy_data(root: pathlib.Path) -> pathlib.Path:
  """A FewRel-format toy set whose relation is its keyword: 4 relations x 14 gold sentences (train
  8, dev 3, test 3) and 6 SCDG sentences per relation, those of P4 written with P1's keyword."""
  (root / "fewrel").mkdir(parents=True)
  (root / "llm").mkdir()
  gold, lines = {}, []
  for n, (r, kw) in enumerate(RELATIONS.items()):
    gold[r] = []
    for i in range(14):
      s, o = _pair(n * 14 + i)
      gold[r].append({"tokens": [s, kw, o, "."], "h": [s, "", [[0]]], "t": [o, "", [[2]]]})
    word = RELATIONS["P1"] if r == NOISY else kw
    for i in range(6):
      s, o = _pair(56 + n * 6 + i)
      text = f"{s} {word} {o} ."
      lines.append(json.dumps({"text": text, "subj": s, "subj_start": 0, "subj_end": len(s),
                               "obj": o, "obj_start": len(s) + len(word) + 2,
                               "obj_end": len(s) + len(word) + 2 + len(o), "subj_type": "person",
                               "obj_type": "person", "relation": r}))
  (root / "fewrel" / "val_wiki.json").write_text(json.dumps(gold))
  (root / "fewrel" / "val_wiki_split.json").write_text(
      json.dumps({"train_pool": [0, 8], "dev": [8, 11], "test": [11, 14]}))
  (root / "fewrel" / "pid2name.json").write_text(
      json.dumps({r: [kw, f"someone {kw} something"] for r, kw in RELATIONS.items()}))
  (root / "llm" / "scdg.jsonl").write_text("\n".join(lines) + "\n")
  return root


def _toy_config(data_dir, hf_dir, prepared=None):
  from tests.helpers import tiny_base_config  # pylint: disable=import-outside-toplevel
  c = tiny_base_config(data_dir, hf_dir, prepared)
  c.data.update(k=8, max_seq_len=32, scdg_file="llm/scdg.jsonl", edkg_file="", augment_k=6,
                unlabelled_file="")
  c.train.update(batch_size=8, eval_batch_size=16, epochs=6, eval_every_epochs=3,
                 checkpoint_every_seconds=0, optim=dict(learning_rate=1e-4, warmup_frac=0.0))
  c.learning_order.update(epochs=8, cap_epoch=5)
  return c


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """The toy data prepared, and the uninterrupted learning_order run on it (this process).

  The encoder is all-MiniLM-L6-v2: learning order is about what a pre-trained encoder picks up
  first (the tiny random encoder learns these 4 classes one at a time over ~10 epochs, so its
  first epochs say which class it happened to predict, not which rows are clean)."""
  from tests.helpers import minilm_dir  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("learning_order")
  data = _toy_data(root / "data")
  hf_dir = minilm_dir()
  stages.run("prepare", _toy_config(data, hf_dir), root / "prepared")
  c = _toy_config(data, hf_dir, root / "prepared")
  summary = stages.run("learning_order", c, root / "order", mesh=stage_mesh())
  return root, data, summary, hf_dir


@pytest.mark.slow
def test_the_mislabelled_class_is_learned_last_and_weighted_lowest(toy):
  root, _, summary, _ = toy
  table = json.loads((root / "order" / order_lib.FILE).read_text())
  rows = table["rows"]
  assert len(rows) == 4 * 8 + 4 * 6 and summary["rows"] == 56
  noisy = [r for r in rows if r["kind"] == "scdg" and r["relation"] == NOISY]
  clean = [r for r in rows if r not in noisy]
  assert len(noisy) == 6

  def epoch(r):
    return r["first_epoch"] or table["epochs"] + 1

  # every clean row is learned, all of them before any mislabelled one
  assert all(r["first_epoch"] for r in clean)
  assert min(epoch(r) for r in noisy) > max(epoch(r) for r in clean)
  assert max(r["weight"] for r in noisy) < min(r["weight"] for r in clean)
  assert min(r["weight"] for r in clean) >= 1.0 - 1e-6
  # the report: the latest-learned SCDG rows are the noisy ones, and the by-kind counts add up
  latest = order_lib.latest_learned(rows, "scdg", 6)
  assert {r["key"] for r in latest} == {r["key"] for r in noisy}
  assert sum(v for k, v in summary["by_kind"]["scdg"].items() if k != "mean_epoch") == 24
  report = (root / "order" / "learning_order.md").read_text()
  assert "The 20 SCDG rows learned last" in report and "coached" in report


@pytest.mark.slow
def test_finetune_and_scl_use_the_weights(toy):
  root, data, _, hf_dir = toy
  table = order_lib.read_table(root / "order")
  never_scdg = sum(1 for r in table.values() if r["kind"] == "scdg" and r["first_epoch"] is None)
  c = _toy_config(data, hf_dir, root / "prepared")
  c.train.update(learning_order_from=str(root / "order"), learning_order_use="drop_unlearned",
                 epochs=2, eval_every_epochs=2)
  s = stages.run("finetune", c, root / "ft_drop", mesh=stage_mesh())
  lo = s["learning_order"]
  assert lo["dropped"] == never_scdg and s["num_train"] == 56 - never_scdg
  c.train.learning_order_use = "weight"
  s = stages.run("finetune", c, root / "ft_weight", mesh=stage_mesh())
  assert s["num_train"] == 56 and s["learning_order"]["scored"] == 56
  assert s["learning_order"]["unscored"] == 0
  # SCL on the corpus (gold + SCDG): every corpus row has a record
  c = _toy_config(data, hf_dir, root / "prepared")
  c.scl.update(learning_order_from=str(root / "order"), steps=2, batch_size=8,
               checkpoint_every_seconds=0, anchor_init="random", length_multiple=32)
  c.mslm.head_warmup_steps = 0
  s = stages.run("scl", c, root / "scl", mesh=stage_mesh())
  assert s["learning_order"]["scored"] == s["num_sequences"] > 0
  logged = [json.loads(x) for x in open(root / "scl" / "metrics.jsonl")]
  accs = [r[k] for r in logged for k in ("span_to_anchor_acc", "anchor_to_span_acc") if k in r]
  assert accs and all(0.0 <= a <= 1.0 for a in accs), accs  # weighted accuracies stay in [0, 1]
  # every corpus row (gold or SCDG) has a record, so the never-learned count is the table's
  assert s["learning_order"]["never_learned"] == sum(
      1 for r in table.values() if r["first_epoch"] is None) == never_scdg


@pytest.mark.slow
def test_scl_batches_carry_the_weights_of_their_rows(toy):
  """Every corpus row gets a weight of its own (its position among the sorted sources), so a row
  carrying another row's weight fails; each batch row is traced back to its source by its tokens."""
  from tkre_jax.data import dataset  # pylint: disable=import-outside-toplevel
  root, _, _, _ = toy
  corpus = dataset.load_arrays(root / "prepared", "corpus")
  sources = sorted(str(x) for x in corpus["source"])
  own = {src: 1.0 + i / 1000.0 for i, src in enumerate(sources)}

  def key(ids, mask):
    return tuple(int(t) for t, m in zip(ids, mask) if m)

  by_tokens = {key(corpus["input_ids"][i], corpus["attention_mask"][i]): str(corpus["source"][i])
               for i in range(len(corpus["label"]))}
  assert len(by_tokens) == len(sources)  # the tokens identify the row
  seen = 0
  for batch in pipeline.pretrain_batches(
      root / "prepared", "corpus", global_batch_size=8, seed=0, process_index=0, process_count=1,
      length_multiple=32,
      row_weights=lambda srcs: np.asarray([own[str(s)] for s in srcs], np.float32)):
    w = batch[pipeline.INSTANCE_WEIGHT_KEY]
    assert w.shape == (8,) and (w[batch["weight"] == 0] == 0).all()
    for k in np.flatnonzero(batch["weight"]):
      src = by_tokens[key(batch["input_ids"][k], batch["attention_mask"][k])]
      assert w[k] == np.float32(own[src]), src
      seen += 1
    if seen >= len(sources):
      break
  # and the table's own weights reach the rows they belong to
  table = order_lib.read_table(root / "order")
  w, counts = order_lib.lookup(table, [str(s) for s in corpus["source"]])
  for i, src in enumerate(corpus["source"]):
    rec = table.get(order_lib.row_key(str(src)))
    assert w[i] == pytest.approx(rec["weight"] if rec else order_lib.UNSCORED_WEIGHT)
  assert counts["scored"] + counts["unscored"] == len(sources)


@pytest.mark.subprocess
def test_sigkill_then_rerun_equals_an_uninterrupted_learning_order_run(toy, main_cli):
  from tests.test_trainer import kill_after_checkpoint, train_steps  # pylint: disable=import-outside-toplevel
  from tests.helpers import main_command  # pylint: disable=import-outside-toplevel
  root, data, _, hf_dir = toy
  killed = root / "killed"
  args = ["--stage=learning_order", f"--workdir={killed}", "--mesh=cpu",
          f"--config.data.data_dir={data}", "--config.data.k=8", "--config.data.max_seq_len=32",
          f"--config.data.prepared_dir={root / 'prepared'}", f"--config.model.hf_dir={hf_dir}",
          "--config.train.batch_size=8", "--config.train.eval_batch_size=16",
          "--config.train.optim.learning_rate=1e-4", "--config.train.optim.warmup_frac=0.0",
          "--config.train.log_every_steps=1", "--config.train.checkpoint_every_seconds=0",
          "--config.train.checkpoint_every_steps=14", "--config.learning_order.epochs=8"]
  code = kill_after_checkpoint(main_command(args, devices=STAGE_DEVICES, step_sleep=0.2), killed,
                               28)
  assert code == -signal.SIGKILL
  assert not (killed / order_lib.FILE).exists()
  code, _, err = main_cli(*args, devices=STAGE_DEVICES)
  assert code == 0, err[-3000:]
  summary = json.loads((killed / "summary.json").read_text())
  assert summary["resumed"] and summary["start_step"] >= 28
  want = json.loads((root / "order" / order_lib.FILE).read_text())["rows"]
  got = json.loads((killed / order_lib.FILE).read_text())["rows"]
  assert [r["first_epoch"] for r in got] == [r["first_epoch"] for r in want]
  assert train_steps(killed, "learning_order") == list(range(1, 57))


# ----------------------------------------------------------------------------- FineCL's own forms


class _SourceScheduler:
  """FineCL's `Scheduler` (wphogan/finecl, src/stage_2/dataset.py, K = 5), restated line by line on
  the source's 0-based epochs."""
  K = 5

  def __init__(self, order_dict):
    values = list(set(order_dict.values()))
    self.max_v, self.min_v = max(values), min(values)
    self.k = self.max_v - self.min_v

  def convert(self, value):
    if value >= self.K:
      value = self.max_v
    return 1 - (value - self.min_v) / self.k


def test_the_source_schedule_is_finecls_scheduler():
  # 0-based epochs of 15: min 0, uncapped max 14; values at and past K = 5
  order = {f"u{i}": v for i, v in enumerate([0, 1, 2, 3, 4, 5, 6, 14, 2])}
  sched = _SourceScheduler(order)
  want_f = np.array([sched.convert(v) for v in order.values()])
  first = np.array(list(order.values()) + [-1]) + 1   # 1-based; the last row never learned
  f, w = order_lib.finecl_weights(first, cap_epoch=5, schedule="source")
  np.testing.assert_allclose(f[:-1], want_f, rtol=0, atol=1e-12)
  np.testing.assert_allclose(w[:-1], np.exp(want_f), rtol=1e-12)
  assert np.isnan(f[-1]) and w[-1] == 0.0
  # rows learned in epochs 1..5 keep their place on the uncapped range: 1 - 4/14 for the 5th
  assert f[4] == pytest.approx(1 - 4 / 14) and f[5] == f[6] == f[7] == 0.0
  # the capped schedule reads the same order differently (1, .75, .5, .25, 0)
  fc, _ = order_lib.finecl_weights(first, cap_epoch=5, schedule="capped")
  np.testing.assert_allclose(fc[:5], [1.0, 0.75, 0.5, 0.25, 0.0])
  with pytest.raises(ValueError, match="schedule"):
    order_lib.finecl_weights(first, schedule="linear")


def test_batch_scoring_records_the_training_batch_predictions():
  from tkre_jax.stages import learning_order as lo_stage  # pylint: disable=import-outside-toplevel
  hook = lo_stage.BatchScoring(num_rows=5, steps_per_epoch=2)
  # epoch 1: rows 0, 1 | 2, 3 (+ padding); epoch 2: rows 4, 1 | 3, 0
  steps = [([0, 1], [1, 0]), ([2, 3, -1], [0, 1, 1]), ([4, 1], [1, 1]), ([3, 0, -1], [1, 0, 1])]
  for step, (index, right) in enumerate(steps, start=1):
    batch = {"index": np.array(index), "weight": np.array([float(i >= 0) for i in index])}
    out = hook.observe(step, batch, {"loss": 1.0, "row_correct": np.array(right, np.float32)})
    assert out == {"loss": 1.0}  # the per-row entry is consumed
    if hook.due(step):
      hook.run(step, None, None)
  # row 0 right in epoch 1; 1 first in epoch 2; 2 never; 3 in epoch 1; 4 in epoch 2; the padding
  # row's "right" counts nowhere
  assert hook.first.tolist() == [1, 2, 0, 1, 2]
  assert hook.accuracy == [0.5, 0.75]
  restored = lo_stage.BatchScoring(5, 2)
  restored.load_state(json.loads(json.dumps(hook.state())))
  assert restored.first.tolist() == hook.first.tolist() and restored.accuracy == hook.accuracy


def test_one_changed_weight_moves_the_losses_by_the_direct_amount():
  """Fine-tuning: the loss is sum_b u_b CE_b / sum_b u_b (u: learning-order weight x row weight);
  SCL (the reference objective): sum_i u_i l_i / #rows. Each row's CE_b / l_i is computed apart
  (numpy from the logits; the loss of that row alone), then one weight changes."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tkre_jax.model.encoder_config import EncoderConfig  # pylint: disable=import-outside-toplevel
  from tkre_jax.tasks import mslm_scl  # pylint: disable=import-outside-toplevel
  from tests.test_pretrain import synthetic_batch  # pylint: disable=import-outside-toplevel
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(batch=8, real=6).items()}
  u = np.array([1.0, 2.0, 0.5, 1.5, 1.0, 2.7, 1.0, 1.0], np.float32)

  # fine-tuning
  model = classifier.classifier_builder(EncoderConfig.tiny(), 4, 0.0, 0)()
  graphdef, params = nnx.split(model, nnx.Param)
  logits = np.asarray(model(batch), np.float64)
  z = logits - logits.max(-1, keepdims=True)
  ce = np.log(np.exp(z).sum(-1)) - z[np.arange(8), np.asarray(batch["label"])]
  loss_fn = classifier.make_loss_fn(graphdef)
  real = np.asarray(batch["weight"])

  def ft_loss(weights):
    b = {**batch, pipeline.INSTANCE_WEIGHT_KEY: jnp.asarray(weights)}
    return float(loss_fn(params, b, None, lambda x: x)[0])

  for w in (u, np.where(np.arange(8) == 3, 0.25, u).astype(np.float32)):
    want = np.sum(real * w * ce) / np.sum(real * w)
    np.testing.assert_allclose(ft_loss(w), want, rtol=1e-5)
  assert abs(ft_loss(u) - ft_loss(np.where(np.arange(8) == 3, 0.25, u))) > 1e-4

  # SCL, the reference objective: the MSLM part is the same under both weightings, and each row's
  # contrastive term is the loss of that row alone (one row in, the rest weight 0)
  pm = mslm_scl.build_pretrain_model(EncoderConfig.tiny(), num_relations=4, seed=0)
  cfg = mslm_scl.PretrainStepConfig(mask_token_id=3, max_predictions=8)
  scl = jax.jit(mslm_scl.scl_loss(pm.graphdef, cfg), static_argnums=3)
  key = jax.random.key(5)

  def scl_term(weights, rows=None):
    b = dict(batch)
    if rows is not None:
      b["weight"] = jnp.asarray(np.where(np.isin(np.arange(8), rows), real, 0.0), jnp.float32)
    b[pipeline.INSTANCE_WEIGHT_KEY] = jnp.asarray(weights)
    _, m = scl(pm.params, b, key, lambda x: x)
    return float(m["scl_loss"]) * float(m["scl_rows"])  # the term's sum: loss x row count

  ones = np.ones(8, np.float32)
  per_row = np.array([scl_term(ones, [i]) for i in range(6)])
  assert np.all(per_row > 0)
  for w in (u, np.where(np.arange(8) == 3, 0.25, u).astype(np.float32)):
    np.testing.assert_allclose(scl_term(w), np.sum(w[:6] * per_row), rtol=1e-4)
