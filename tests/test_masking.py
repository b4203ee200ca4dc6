"""Tests for tkre_jax.tasks.masking (MSLM span masking)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tkre_jax.model.heads import gather_positions
from tkre_jax.tasks import losses
from tkre_jax.tasks import masking

# XLA's optimisations off: faster compiles; nothing here depends on them.
pytestmark = pytest.mark.usefixtures("fewer_compiler_optimizations")

MASK_ID = 103


def _synthetic(batch, seq_len, seed=0):
  """Random ids in [1000, 2000) (never the mask id) and span ids cycling 0..4 (equal counts)."""
  rs = np.random.RandomState(seed)
  input_ids = rs.randint(1000, 2000, size=(batch, seq_len)).astype(np.int32)
  span_ids = (np.arange(batch * seq_len) % 5).reshape(batch, seq_len).astype(np.int32)
  # Shuffle each row so the classes are not at fixed positions.
  span_ids = np.stack([rs.permutation(row) for row in span_ids]).astype(np.int32)
  return jnp.asarray(input_ids), jnp.asarray(span_ids)


def _check_consistent(out, input_ids, max_predictions):
  """Checks the invariants that relate masked input, positions, labels and weights."""
  masked = np.asarray(out["masked_input_ids"])
  ids = np.asarray(input_ids)
  pos = np.asarray(out["mlm_positions"])
  lab = np.asarray(out["mlm_labels"])
  w = np.asarray(out["mlm_weights"])
  assert pos.shape == lab.shape == w.shape == (ids.shape[0], max_predictions)
  assert pos.dtype == np.int32 and lab.dtype == np.int32 and w.dtype == np.float32
  assert set(np.unique(w)) <= {0.0, 1.0}
  for b in range(ids.shape[0]):
    real = pos[b][w[b] == 1.0]
    assert np.all(np.diff(real) > 0), "positions must be distinct and increasing"
    # The real slots come first, padding after.
    n = len(real)
    assert np.all(w[b, :n] == 1.0) and np.all(w[b, n:] == 0.0)
    assert np.all(pos[b, n:] == 0) and np.all(lab[b, n:] == 0)
    expected = ids[b].copy()
    expected[real] = MASK_ID
    np.testing.assert_array_equal(masked[b], expected)
    np.testing.assert_array_equal(lab[b, :n], ids[b, real])
  kept = w.sum(axis=1).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(out["num_selected"]) - np.asarray(out["num_dropped"]),
                                kept)
  # No mask token that is not a prediction.
  np.testing.assert_array_equal((masked == MASK_ID).sum(axis=1), kept)


def test_masking_probabilities_table():
  span_ids = jnp.array([[0, 1, 2, 3, 4, 7, -1]], jnp.int32)
  p = masking.masking_probabilities(span_ids)
  assert p.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(p), [[0.0, 0.2, 0.5, 0.5, 0.8, 0.0, 0.0]], atol=1e-7)
  p = masking.masking_probabilities(span_ids, (0.1, 0.3, 0.6, 0.9))
  np.testing.assert_allclose(np.asarray(p), [[0.1, 0.3, 0.6, 0.6, 0.9, 0.0, 0.0]], atol=1e-7)


def test_masking_rates_match_span_probabilities():
  batch, seq_len = 50, 1000  # 10,000 tokens of each span kind (20,000 entity tokens)
  input_ids, span_ids = _synthetic(batch, seq_len)
  fn = jax.jit(functools.partial(masking.mask_span_tokens, mask_token_id=MASK_ID,
                                 max_predictions=seq_len))
  out = fn(jax.random.key(0), input_ids, span_ids)
  np.testing.assert_array_equal(np.asarray(out["num_dropped"]), 0)
  masked = np.asarray(out["masked_input_ids"]) == MASK_ID
  spans = np.asarray(span_ids)
  for kind, expected in ((0, 0.0), (1, 0.2), (2, 0.5), (3, 0.5), (4, 0.8)):
    sel = spans == kind
    assert sel.sum() >= 10_000
    rate = masked[sel].mean()
    assert abs(rate - expected) < 0.02, (kind, rate, expected)
  assert not masked[spans == 0].any(), "never-mask tokens must never be masked"
  _check_consistent(out, input_ids, seq_len)


def test_custom_probs_and_all_never():
  input_ids, _ = _synthetic(4, 30)
  span_ids = jnp.zeros_like(input_ids)
  out = masking.mask_span_tokens(jax.random.key(1), input_ids, span_ids, mask_token_id=MASK_ID,
                                 max_predictions=8)
  np.testing.assert_array_equal(np.asarray(out["masked_input_ids"]), np.asarray(input_ids))
  assert float(out["mlm_weights"].sum()) == 0.0
  np.testing.assert_array_equal(np.asarray(out["num_selected"]), 0)
  span_ids = jnp.ones_like(input_ids)
  out = masking.mask_span_tokens(jax.random.key(1), input_ids, span_ids, mask_token_id=MASK_ID,
                                 max_predictions=30, probs=masking.MaskingProbs(context=1.0))
  assert (np.asarray(out["masked_input_ids"]) == MASK_ID).all()
  _check_consistent(out, input_ids, 30)


def test_reproducible_and_key_dependent():
  input_ids, span_ids = _synthetic(8, 64)
  kw = dict(mask_token_id=MASK_ID, max_predictions=20)
  key = jax.random.fold_in(jax.random.key(42), 7)
  a = masking.mask_span_tokens(key, input_ids, span_ids, **kw)
  b = masking.mask_span_tokens(key, input_ids, span_ids, **kw)
  c = masking.mask_span_tokens(jax.random.fold_in(jax.random.key(42), 8), input_ids, span_ids,
                               **kw)
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
  assert not np.array_equal(np.asarray(a["masked_input_ids"]), np.asarray(c["masked_input_ids"]))


def test_small_cap_truncates_without_unlabelled_masks():
  input_ids, span_ids = _synthetic(16, 80, seed=3)
  cap = 5
  out = jax.jit(functools.partial(masking.mask_span_tokens, mask_token_id=MASK_ID,
                                  max_predictions=cap))(jax.random.key(5), input_ids, span_ids)
  selected = np.asarray(out["num_selected"])
  kept = np.asarray(out["mlm_weights"]).sum(axis=1)
  assert (selected > cap).all(), "test needs truncation in every row"
  np.testing.assert_array_equal(kept, np.minimum(selected, cap))
  np.testing.assert_array_equal(np.asarray(out["num_dropped"]),
                                selected - np.minimum(selected, cap))
  _check_consistent(out, input_ids, cap)


def test_cap_larger_than_sequence_pads():
  input_ids, span_ids = _synthetic(3, 10)
  out = masking.mask_span_tokens(jax.random.key(2), input_ids, span_ids, mask_token_id=MASK_ID,
                                 max_predictions=16)
  assert out["mlm_positions"].shape == (3, 16)
  np.testing.assert_array_equal(np.asarray(out["num_dropped"]), 0)
  _check_consistent(out, input_ids, 16)


def test_truncation_is_unbiased_over_positions():
  # Every token is selected (context, p=1); P=10 of 40 are kept: each position ~ 1/4.
  batch, seq_len, cap = 2000, 40, 10
  input_ids = jnp.tile(jnp.arange(1000, 1000 + seq_len, dtype=jnp.int32), (batch, 1))
  span_ids = jnp.ones((batch, seq_len), jnp.int32)
  out = masking.mask_span_tokens(jax.random.key(9), input_ids, span_ids, mask_token_id=MASK_ID,
                                 max_predictions=cap, probs=(0.0, 1.0, 0.0, 0.0))
  freq = (np.asarray(out["masked_input_ids"]) == MASK_ID).mean(axis=0)
  np.testing.assert_allclose(freq, 0.25, atol=0.05)
  np.testing.assert_array_equal(np.asarray(out["num_dropped"]), seq_len - cap)


def test_gathered_loss_equals_full_vocabulary_loss():
  batch, seq_len, hidden, vocab = 4, 48, 16, 50
  rs = np.random.RandomState(0)
  input_ids = jnp.asarray(rs.randint(0, vocab, size=(batch, seq_len)), jnp.int32)
  span_ids = jnp.asarray(rs.randint(0, 5, size=(batch, seq_len)), jnp.int32)
  mask_id = vocab - 1
  out = masking.mask_span_tokens(jax.random.key(3), input_ids, span_ids, mask_token_id=mask_id,
                                 max_predictions=12)
  h = jnp.asarray(rs.randn(batch, seq_len, hidden), jnp.float32)
  w = jnp.asarray(rs.randn(hidden, vocab), jnp.float32)

  # Full: logits at every position; CE on the masked positions (from the positions/weights).
  full_logits = h @ w
  ce = optax.softmax_cross_entropy_with_integer_labels(full_logits, input_ids)
  is_pred = np.zeros((batch, seq_len), np.float32)
  pos, wts = np.asarray(out["mlm_positions"]), np.asarray(out["mlm_weights"])
  for b in range(batch):
    is_pred[b, pos[b][wts[b] == 1]] = 1.0
  full_sum = float(jnp.sum(ce * is_pred))
  assert is_pred.sum() > 0

  gathered = gather_positions(h, out["mlm_positions"]) @ w
  loss_sum, weight = losses.masked_lm_loss(gathered, out["mlm_labels"], out["mlm_weights"])
  assert float(weight) == is_pred.sum()
  np.testing.assert_allclose(float(loss_sum), full_sum, rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise():
  ids = jnp.zeros((2, 5), jnp.int32)
  with pytest.raises(ValueError, match="max_predictions"):
    masking.mask_span_tokens(jax.random.key(0), ids, ids, mask_token_id=1, max_predictions=0)
  with pytest.raises(ValueError, match="same shape"):
    masking.mask_span_tokens(jax.random.key(0), ids, ids[:, :4], mask_token_id=1,
                             max_predictions=2)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    masking.masking_probabilities(ids, (0.0, 0.2, 1.5, 0.8))
  with pytest.raises(ValueError, match="4 values"):
    masking.masking_probabilities(ids, (0.2, 0.5))
