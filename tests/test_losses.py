"""Tests for tkre_jax.tasks.losses (MSLM cross-entropy, SCL InfoNCE, span helpers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tkre_jax.tasks import losses

# XLA's optimisations off: faster compiles; nothing here depends on them.
pytestmark = pytest.mark.usefixtures("fewer_compiler_optimizations")


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax_np(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------- cross-entropy


def test_masked_lm_loss_matches_numpy():
  rs = np.random.RandomState(0)
  logits = rs.randn(2, 3, 7).astype(np.float32)
  labels = rs.randint(0, 7, size=(2, 3)).astype(np.int32)
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  labels[0, 2] = 10_000  # out-of-range label on a padding slot: must be ignored
  s, w = losses.masked_lm_loss(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                               jnp.asarray(labels), jnp.asarray(weights))
  lp = _log_softmax_np(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)))
  expected = -(lp[0, 0, labels[0, 0]] + lp[0, 1, labels[0, 1]] + lp[1, 0, labels[1, 0]])
  assert s.dtype == jnp.float32
  np.testing.assert_allclose(float(s), expected, rtol=1e-6)
  assert float(w) == 3.0


def test_classification_loss_matches_numpy():
  rs = np.random.RandomState(1)
  logits = rs.randn(4, 5).astype(np.float32)
  labels = np.array([0, 4, 2, 1], np.int32)
  weights = np.array([1.0, 2.0, 0.5, 0.0], np.float32)
  s, w = jax.jit(losses.classification_loss)(logits, labels, weights)
  lp = _log_softmax_np(logits)
  expected = -sum(weights[i] * lp[i, labels[i]] for i in range(3))
  np.testing.assert_allclose(float(s), expected, rtol=1e-6)
  np.testing.assert_allclose(float(w), 3.5)


def test_loss_shape_errors():
  with pytest.raises(ValueError):
    losses.masked_lm_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4)))
  with pytest.raises(ValueError):
    losses.classification_loss(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32), jnp.zeros((3,)))


# ----------------------------------------------------------------------------- span helpers


def test_span_mean_pool():
  rs = np.random.RandomState(2)
  hidden = rs.randn(3, 5, 4).astype(np.float32)
  mask = np.array([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  pooled, has = losses.span_mean_pool(jnp.asarray(hidden), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(pooled[0]), hidden[0, 1:3].mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(pooled[1]), hidden[1, 0], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(pooled[2]), 0.0)
  np.testing.assert_array_equal(np.asarray(has), [True, True, False])


def test_relation_span_mask_fallback():
  span_ids = jnp.array([
      [0, 1, 0, 2, 2, 0, 4, 4, 0, 3, 0],  # relation span present
      [0, 1, 0, 2, 0, 0, 3, 3, 0, 1, 0],  # adjacent entities: fall back to 2 / 3
      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # padding row: nothing
  ], jnp.int32)
  mask, fallback = jax.jit(losses.relation_span_mask)(span_ids)
  np.testing.assert_array_equal(np.asarray(mask), [
      [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
      [0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0],
      [0] * 11,
  ])
  np.testing.assert_array_equal(np.asarray(fallback), [False, True, False])
  assert mask.dtype == jnp.float32


def test_negative_spans_lie_on_context_only():
  rs = np.random.RandomState(3)
  batch, seq_len = 64, 24
  span_ids = rs.choice(5, size=(batch, seq_len), p=[0.2, 0.4, 0.15, 0.15, 0.1]).astype(np.int32)
  span_ids[0] = 0                              # no context at all
  span_ids[1] = [0, 1] * (seq_len // 2)        # isolated context tokens only
  span_ids[2] = 0
  span_ids[2, 7] = 1                           # exactly one context token
  fn = jax.jit(losses.sample_negative_spans, static_argnames=("min_len", "max_len"))
  for step in range(4):
    mask, valid = fn(jax.random.fold_in(jax.random.key(0), step), jnp.asarray(span_ids))
    mask, valid = np.asarray(mask), np.asarray(valid)
    assert mask.dtype == np.float32
    has_context = (span_ids == 1).any(axis=1)
    np.testing.assert_array_equal(valid, has_context)
    for b in range(batch):
      idx = np.nonzero(mask[b])[0]
      if not valid[b]:
        assert idx.size == 0
        continue
      assert 1 <= idx.size <= 3
      assert np.all(np.diff(idx) == 1), "span must be contiguous"
      assert np.all(span_ids[b, idx] == 1), "span must lie on context tokens only"
    np.testing.assert_array_equal(np.nonzero(mask[2])[0], [7])
    assert mask[1].sum() == 1
  # Length 2 only: isolated context tokens give no candidate.
  mask, valid = fn(jax.random.key(1), jnp.asarray(span_ids), min_len=2, max_len=2)
  assert not bool(valid[1]) and not bool(valid[2]) and float(mask[1].sum()) == 0.0
  rows = np.nonzero(np.asarray(valid))[0]
  assert rows.size > 0 and np.all(np.asarray(mask)[rows].sum(axis=1) == 2)


def test_negative_spans_cover_all_candidates():
  # Three context tokens in a row: candidates (start, len) = 3 + 2 + 1 = 6, each drawn.
  span_ids = np.tile(np.array([[0, 2, 1, 1, 1, 3, 0]], np.int32), (600, 1))
  mask, valid = losses.sample_negative_spans(jax.random.key(4), jnp.asarray(span_ids))
  assert bool(np.all(np.asarray(valid)))
  seen = {tuple(np.nonzero(row)[0]) for row in np.asarray(mask)}
  assert seen == {(2,), (3,), (4,), (2, 3), (3, 4), (2, 3, 4)}


def test_negative_span_bad_lengths():
  with pytest.raises(ValueError):
    losses.sample_negative_spans(jax.random.key(0), jnp.ones((2, 4), jnp.int32), min_len=3,
                                 max_len=2)
  with pytest.raises(ValueError):
    losses.sample_negative_spans(jax.random.key(0), jnp.ones((2, 4), jnp.int32), min_len=0)


# ----------------------------------------------------------------------------- SCL


def _scl_reference(anchors, positives, negatives, labels, weights, neg_valid, tau):
  """Explicit-loop float64 InfoNCE in both directions (TKRE SCL)."""
  a, p, n = (np.asarray(x, np.float64) for x in (anchors, positives, negatives))
  total, per = 0.0, np.zeros(len(labels))
  for i in range(len(labels)):
    if weights[i] == 0:
      continue
    q = a[labels[i]]
    cands = [p[i]]
    for j in range(len(labels)):
      if weights[j] != 0 and neg_valid[j]:
        cands.append(n[j])
    for j in range(len(labels)):
      if weights[j] != 0 and labels[j] != labels[i]:
        cands.append(p[j])
    la = -q @ p[i] / tau + np.log(sum(np.exp(q @ c / tau) for c in cands))
    lb = -p[i] @ a[labels[i]] / tau + np.log(sum(np.exp(p[i] @ a[r] / tau)
                                                  for r in range(len(a))))
    per[i] = 0.5 * (la + lb)
    total += weights[i] * per[i]
  return total, float(np.sum(weights)), per


def _scl_inputs(seed=0):
  rs = np.random.RandomState(seed)
  num_rel, dim = 5, 8
  anchors = _unit(rs.randn(num_rel, dim)).astype(np.float32)
  labels = np.array([0, 1, 0, 2, 1, 0, 3], np.int32)   # repeated relations 0 and 1
  weights = np.array([1.0, 2.0, 0.5, 1.0, 1.0, 1.0, 0.0], np.float32)  # last row: padding
  positives = _unit(rs.randn(len(labels), dim)).astype(np.float32)
  negatives = _unit(rs.randn(len(labels), dim)).astype(np.float32)
  neg_valid = np.array([True, True, False, True, True, True, True])
  return anchors, positives, negatives, labels, weights, neg_valid


def _scl(anchors, positives, negatives, labels, weights, neg_valid, tau=0.1):
  return jax.jit(losses.scl_loss, static_argnames="tau")(
      jnp.asarray(anchors), jnp.asarray(positives), jnp.asarray(negatives), jnp.asarray(labels),
      jnp.asarray(weights), tau=tau, negative_valid=jnp.asarray(neg_valid))


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_scl_matches_numpy_reference(tau):
  inputs = _scl_inputs()
  s, w, aux = _scl(*inputs, tau=tau)
  ref_sum, ref_w, ref_per = _scl_reference(*inputs, tau=tau)
  np.testing.assert_allclose(float(s), ref_sum, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(float(w), ref_w)
  np.testing.assert_allclose(np.asarray(aux["per_example_loss"]), ref_per, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(float(aux["loss_anchor_sum"] + aux["loss_span_sum"]),
                             2 * ref_sum, rtol=1e-6, atol=1e-5)
  assert 0.0 <= float(aux["anchor_to_span_correct"]) <= float(w)
  assert 0.0 <= float(aux["span_to_anchor_correct"]) <= float(w)


def test_scl_accuracy_when_perfectly_aligned():
  anchors, _, negatives, labels, weights, neg_valid = _scl_inputs()
  anchors = np.eye(5, 8, dtype=np.float32)
  positives = anchors[labels]
  negatives = np.tile(_unit(-np.ones((1, 8))).astype(np.float32), (len(labels), 1))
  _, w, aux = _scl(anchors, positives, negatives, labels, weights, neg_valid)
  np.testing.assert_allclose(float(aux["span_to_anchor_correct"]), float(w))
  np.testing.assert_allclose(float(aux["anchor_to_span_correct"]), float(w))


@pytest.mark.slow
def test_scl_padding_rows_change_nothing():
  anchors, positives, negatives, labels, weights, neg_valid = _scl_inputs()
  base = _scl(anchors, positives, negatives, labels, weights, neg_valid)
  p2, n2, l2 = positives.copy(), negatives.copy(), labels.copy()
  p2[-1] = anchors[0]          # would be a strong competitor if it counted
  n2[-1] = anchors[1]
  l2[-1] = 4
  other = _scl(anchors, p2, n2, l2, weights, neg_valid)
  np.testing.assert_allclose(float(other[0]), float(base[0]), rtol=1e-7)
  p2[-1] = np.nan
  n2[-1] = np.nan
  nan_case = _scl(anchors, p2, n2, l2, weights, neg_valid)
  np.testing.assert_allclose(float(nan_case[0]), float(base[0]), rtol=1e-7)

  def f(p, n):
    return losses.scl_loss(jnp.asarray(anchors), p, n, jnp.asarray(labels), jnp.asarray(weights),
                           negative_valid=jnp.asarray(neg_valid))[0]

  gp, gn = jax.grad(f, argnums=(0, 1))(jnp.asarray(p2), jnp.asarray(n2))
  assert np.isfinite(np.asarray(gp)).all() and np.isfinite(np.asarray(gn)).all()
  np.testing.assert_array_equal(np.asarray(gp[-1]), 0.0)
  # An invalid negative (row 2) does not count either.
  n3 = negatives.copy()
  n3[2] = anchors[0]
  np.testing.assert_allclose(float(_scl(anchors, positives, n3, labels, weights, neg_valid)[0]),
                             float(base[0]), rtol=1e-7)


def test_scl_same_relation_spans_are_not_negatives():
  anchors, positives, negatives, labels, weights, neg_valid = _scl_inputs()
  base = np.asarray(_scl(anchors, positives, negatives, labels, weights, neg_valid)[2][
      "per_example_loss"])
  # Row 2 has relation 0, like rows 0 and 5. Make p_2 equal to a_0: if same-relation spans
  # were negatives, rows 0 and 5 would change a lot.
  p2 = positives.copy()
  p2[2] = anchors[0]
  moved = np.asarray(_scl(anchors, p2, negatives, labels, weights, neg_valid)[2][
      "per_example_loss"])
  np.testing.assert_allclose(moved[[0, 5]], base[[0, 5]], rtol=1e-6)
  assert abs(moved[2] - base[2]) > 1e-3          # its own term changes
  assert np.all(np.abs(moved[[1, 3, 4]] - base[[1, 3, 4]]) > 1e-4)  # a negative for the others
  # Same check through the gradient: d loss_0 / d p_2 == 0.
  g = jax.grad(lambda p: losses.scl_loss(
      jnp.asarray(anchors), p, jnp.asarray(negatives), jnp.asarray(labels), jnp.asarray(weights),
      negative_valid=jnp.asarray(neg_valid))[2]["per_example_loss"][0])(jnp.asarray(positives))
  np.testing.assert_array_equal(np.asarray(g[2]), 0.0)
  np.testing.assert_array_equal(np.asarray(g[5]), 0.0)
  assert np.abs(np.asarray(g[1])).sum() > 0


def test_scl_errors():
  a = jnp.zeros((3, 4))
  p = jnp.zeros((2, 4))
  ok = dict(labels=jnp.zeros((2,), jnp.int32), weights=jnp.ones((2,)))
  with pytest.raises(ValueError, match="tau"):
    losses.scl_loss(a, p, p, tau=0.0, **ok)
  with pytest.raises(ValueError):
    losses.scl_loss(a, p, jnp.zeros((3, 4)), **ok)
  with pytest.raises(ValueError):
    losses.scl_loss(a, p, p, labels=jnp.zeros((3,), jnp.int32), weights=jnp.ones((2,)))


def test_top1_correct_matches_argmax_and_counts_ties():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 6, 50)).astype(np.float32)
  labels = rng.integers(0, 50, (4, 6))
  labels[0, :3] = logits[0, :3].argmax(-1)  # some right answers
  got = np.asarray(losses.top1_correct(jnp.asarray(logits), jnp.asarray(labels)))
  np.testing.assert_array_equal(got, logits.argmax(-1) == labels)
  assert got[0, :3].all() and got.sum() >= 3
  tied = np.zeros((2, 5), np.float32)  # every class ties: argmax says 0, top1_correct says any
  np.testing.assert_array_equal(losses.top1_correct(jnp.asarray(tied), jnp.asarray([0, 3])),
                                [True, True])


# ----------------------------------------------------------------------------- SCL, the authors' form


def _reference_scl_np(anchors, pos, neg, labels, tau):
  """The authors' `TKREModel.forward` term, row by row in float64: CE([s(a,p), s(a,n)] / tau, 0)."""
  out = []
  for i, y in enumerate(labels):
    a = np.asarray(anchors[y], np.float64)
    logits = np.array([a @ pos[i], a @ neg[i]], np.float64) / tau
    out.append(-_log_softmax_np(logits)[0])
  return np.array(out)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_scl_reference_matches_a_numpy_two_way_cross_entropy(tau):
  rs = np.random.RandomState(3)
  r, b, d = 4, 7, 5
  anchors = _unit(rs.randn(r, d)).astype(np.float32)
  pos = _unit(rs.randn(b, d)).astype(np.float32)
  neg = _unit(rs.randn(b, d)).astype(np.float32)
  labels = np.array([0, 0, 2, 2, 2, 1, 0], np.int32)  # duplicate relations in the batch
  weights = np.array([1, 1, 1, 0.5, 1, 1, 0], np.float32)  # row 6: padding
  neg_valid = np.array([1, 1, 1, 1, 0, 1, 1], bool)        # row 4: no negative span
  pos[6] = np.nan                                          # a padding row's NaN reaches nothing
  s, w, aux = losses.scl_reference_loss(jnp.asarray(anchors), jnp.asarray(pos), jnp.asarray(neg),
                                        jnp.asarray(labels), jnp.asarray(weights), tau=tau,
                                        negative_valid=jnp.asarray(neg_valid))
  per = _reference_scl_np(anchors, np.nan_to_num(pos), neg, labels, tau)
  use = (weights != 0) & neg_valid
  np.testing.assert_allclose(float(s), float(np.sum(weights[use] * per[use])), rtol=1e-5)
  assert float(w) == pytest.approx(4.5)
  np.testing.assert_allclose(np.asarray(aux["per_example_loss"])[use], per[use], rtol=1e-5)
  assert np.all(np.asarray(aux["per_example_loss"])[~use] == 0)
  # no in-batch negatives: a row's term is the same alone as in the batch
  s0, _, _ = losses.scl_reference_loss(jnp.asarray(anchors), jnp.asarray(pos[:1]),
                                       jnp.asarray(neg[:1]), jnp.asarray(labels[:1]),
                                       jnp.ones((1,), jnp.float32), tau=tau)
  np.testing.assert_allclose(float(s0), per[0], rtol=1e-5)
  hits = (np.einsum("bd,bd->b", anchors[labels], np.nan_to_num(pos))
          > np.einsum("bd,bd->b", anchors[labels], neg))
  assert float(aux["anchor_to_span_correct"]) == pytest.approx(float(np.sum(weights[use & hits])))


def test_scl_reference_gradient_reaches_only_the_rows_anchor():
  rs = np.random.RandomState(4)
  anchors = _unit(rs.randn(5, 6)).astype(np.float32)
  pos = _unit(rs.randn(3, 6)).astype(np.float32)
  neg = _unit(rs.randn(3, 6)).astype(np.float32)
  labels = jnp.asarray([1, 1, 3], jnp.int32)
  g = jax.grad(lambda a: losses.scl_reference_loss(a, jnp.asarray(pos), jnp.asarray(neg), labels,
                                                   jnp.ones((3,)), tau=0.1)[0])(jnp.asarray(anchors))
  norms = np.linalg.norm(np.asarray(g), axis=1)
  assert norms[1] > 0 and norms[3] > 0
  assert norms[0] == norms[2] == norms[4] == 0.0  # InfoNCE's span-to-anchor term would touch these
