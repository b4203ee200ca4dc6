"""SaCon relation-aware pre-training (tkre_jax/tasks/sacon.py, tkre_jax/stages/sacon.py).

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
from tkre_jax.tasks import sacon as sacon_lib
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
