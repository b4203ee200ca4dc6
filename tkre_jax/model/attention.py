"""Scaled dot-product self-attention for the encoder: the padding-mask bias, the explicit HF formula
(with attention-probability dropout) and the fused `jax.nn.dot_product_attention` path, plus the
inverted dropout both the attention and the encoder layers use.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

# How self-attention is computed (`EncoderConfig.attention_impl`):
#   auto: `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPUs when shapes and dtypes allow,
#     XLA's einsum-softmax-einsum elsewhere) whenever no attention-probability dropout is applied
#     (evaluation, prediction, `attention_dropout == 0`); the explicit formula when it is (training
#     with attention dropout, which `jax.nn.dot_product_attention` does not offer);
#   dot_product: always `jax.nn.dot_product_attention`; training then skips the dropout on the
#     attention probabilities (hidden dropout stays), a deviation from HF for accelerator speed;
#   explicit: always the explicit formula (the HF reference computation).
ATTENTION_IMPLS = ("auto", "dot_product", "explicit")


DROPOUT_BITS = 16  # resolution of the keep/drop draw: P(drop) is a multiple of 2**-16


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
  """A Bernoulli keep mask from 16-bit uniform integers, two per 32-bit random word.

  `jax.random.bernoulli` spends a full threefry output (one 32-bit word) per element; dropout
  needs far less resolution. Here each 32-bit word of `jax.random.bits` is split into two 16-bit
  integers (`lax.bitcast_convert_type`), so the generator runs half as often: on a 2-core CPU the
  MiniLM-L6 MSLM step's ~29 M dropout draws take ~97 ms instead of ~170 ms
  (`benchmarks/cpu_ceiling.py`). The words are drawn along the last axis (`[..., ceil(n / 2)]`),
  so a mask of a sharded activation is generated shard-locally.

  Args:
    rng: a PRNG key.
    rate: drop probability in (0, 1).
    shape: the mask's shape (any rank; a scalar shape `()` too).

  Returns:
    `(keep, drop_probability)`: `keep` bool[shape], each element False with probability
    `drop_probability = round(rate * 2**16) / 2**16` (within 2**-17 of `rate`), independently.
  """
  threshold = max(1, int(round(rate * (1 << DROPOUT_BITS))))
  shape = tuple(int(d) for d in shape)
  lead, last = (shape[:-1], shape[-1]) if shape else ((), 1)
  words = jax.random.bits(rng, lead + (-(-last // 2),), jnp.uint32)
  halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(lead + (-1,))[..., :last]
  return halves.reshape(shape) >= threshold, threshold / (1 << DROPOUT_BITS)


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
  """Inverted dropout with an explicit key: keeps each element with probability `1 - p`.

  `p` is `rate` rounded to a multiple of 2**-16 (`keep_mask`: 16-bit draws, two per random
  word); the kept elements are scaled by `1 / (1 - p)`, so the expectation is exactly `x`.

  Args:
    x: any float array.
    rate: drop probability in [0, 1).
    rng: a PRNG key, or None for no dropout (evaluation).

  Returns:
    `x` unchanged when `rng is None` or `rate == 0`, else `where(keep, x / (1 - p), 0)`, same
    shape and dtype as `x`.

  Raises:
    ValueError: `rate` outside [0, 1).
  """
  if rng is None or rate == 0.0:
    return x
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  keep, p = keep_mask(rng, rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - p, x.dtype), jnp.zeros((), x.dtype))


def attention_mask_bias(attention_mask: jax.Array) -> jax.Array:
  """Additive attention bias from a 0/1 mask: int[batch, seq_len] -> float32[batch, 1, 1, seq_len].

  `(1 - mask) * finfo(float32).min`, as HF `get_extended_attention_mask`.
  """
  mask = jnp.asarray(attention_mask).astype(jnp.float32)
  return ((1.0 - mask) * jnp.finfo(jnp.float32).min)[:, None, None, :]


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_bias: jax.Array, *,
                       dropout_rate: float = 0.0, rng: Optional[jax.Array] = None) -> jax.Array:
  """Scaled dot-product attention written out, as HF `BertSelfAttention` (Vaswani et al. 2017).

  `softmax(q k^T / sqrt(head_dim) + mask_bias) v`, scores and softmax in float32, dropout on the
  probabilities when `rng` is given.

  Args:
    q, k, v: dtype[batch, seq_len, heads, head_dim].
    mask_bias: float32[batch, 1, 1, seq_len] additive bias (`attention_mask_bias`).
    dropout_rate, rng: attention-probability dropout (None: none).

  Returns:
    dtype[batch, seq_len, heads, head_dim] (the dtype of `v`).
  """
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / math.sqrt(q.shape[-1])) + mask_bias
  probs = jax.nn.softmax(scores, axis=-1)
  probs = dropout(probs, dropout_rate, rng).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_bias: jax.Array) -> jax.Array:
  """The same attention through `jax.nn.dot_product_attention` (no dropout), the padding mask as
  its boolean `mask` argument (`mask_bias == 0`); logits and softmax are float32 there too.

  On a GPU with bfloat16 / float16 inputs it asks for cuDNN's fused kernel
  (`implementation="cudnn"`) and falls back to XLA's version when cuDNN refuses the shapes;
  elsewhere XLA's einsum-softmax-einsum. Shapes as `explicit_attention`.
  """
  mask = mask_bias == 0.0
  scale = 1.0 / math.sqrt(q.shape[-1])
  if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    except Exception:  # pylint: disable=broad-except  # cuDNN version, shape or layout not supported
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
