"""Self-attention through `jax.nn.dot_product_attention` against the explicit HF formula."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from tkre_jax.model import encoder as enc_lib
from tkre_jax.model.encoder_config import EncoderConfig

# XLA's optimisations off: faster compiles; the implementations agree either way.
pytestmark = pytest.mark.usefixtures("fewer_compiler_optimizations")


def _inputs(seed=0, batch=3, seq=16, vocab=128):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  mask[1, 10:] = 0  # padded rows
  mask[2, 3:] = 0
  return ids, mask


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_fused_attention_matches_the_explicit_formula(dtype, tol):
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((2, 8, 4, 16)).astype(np.float32) for _ in range(3))
  mask = np.ones((2, 8), np.int32)
  mask[1, 5:] = 0
  bias = enc_lib.attention_mask_bias(mask)
  q, k, v = (jax.numpy.asarray(x, dtype) for x in (q, k, v))
  want = np.asarray(enc_lib.explicit_attention(q, k, v, bias), np.float32)
  got = np.asarray(enc_lib.fused_attention(q, k, v, bias), np.float32)
  assert got.shape == (2, 8, 4, 16)
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  # padding keys get no weight: changing the values there changes nothing
  v2 = v.at[1, 5:].set(100.0)
  np.testing.assert_allclose(np.asarray(enc_lib.fused_attention(q, k, v2, bias), np.float32)[1],
                             got[1], atol=tol, rtol=tol)


@pytest.mark.slow
def test_encoder_outputs_agree_across_implementations():
  ids, mask = _inputs()
  cfg = EncoderConfig.tiny()
  out = {impl: np.asarray(enc_lib.Encoder(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))(
      ids, mask)) for impl in enc_lib.ATTENTION_IMPLS}
  np.testing.assert_allclose(out["dot_product"], out["explicit"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out["auto"], out["explicit"], atol=1e-5, rtol=1e-5)
  # real tokens of a padded row equal the same row without its padding
  short = np.asarray(enc_lib.Encoder(cfg.replace(attention_impl="dot_product"), rngs=nnx.Rngs(0))(
      ids[2:3, :3], mask[2:3, :3]))
  np.testing.assert_allclose(out["dot_product"][2, :3], short[0], atol=1e-5, rtol=1e-5)


def test_auto_keeps_attention_dropout_in_training():
  ids, mask = _inputs()
  cfg = EncoderConfig.tiny(attention_dropout=0.5, hidden_dropout=0.0)
  key = jax.random.key(3)
  run = lambda impl: np.asarray(enc_lib.Encoder(cfg.replace(attention_impl=impl),  # noqa: E731
                                                rngs=nnx.Rngs(0))(ids, mask, dropout_rng=key))
  auto, explicit, fused = run("auto"), run("explicit"), run("dot_product")
  np.testing.assert_array_equal(auto, explicit)  # the same dropout masks
  assert np.abs(fused - explicit).max() > 1e-2    # dot_product: no attention-probability dropout
  no_dropout = np.asarray(enc_lib.Encoder(cfg.replace(attention_impl="explicit"),
                                          rngs=nnx.Rngs(0))(ids, mask))
  np.testing.assert_allclose(fused, no_dropout, atol=1e-5, rtol=1e-5)


def test_unknown_impl_is_refused():
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    EncoderConfig.tiny(attention_impl="flash")
