"""Task heads on top of the encoder: MLM head, relation classifier, SCL span projection, relation anchors.

All heads keep float32 parameters with logical axis names (see `encoder.LOGICAL_AXIS_NAMES`), compute
their matmuls in the given compute dtype and return float32. Dropout follows the encoder convention:
active only when an explicit `dropout_rng` key is passed.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tkre_jax.model.encoder import INIT_STDDEV, Dense, LayerNorm, dropout, gelu, resolve_dtype


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """Picks the hidden states at given positions of each sequence.

  Args:
    hidden: float[batch, seq_len, H].
    positions: int32[batch, P], indices into `seq_len` (must be in [0, seq_len); out-of-range
      indices are not checked under `jit`: JAX's `take_along_axis` fills them with NaN).

  Returns:
    float[batch, P, H] with `out[b, p] = hidden[b, positions[b, p]]` (same dtype as `hidden`).

  Raises:
    ValueError: wrong ranks or batch sizes.
  """
  if hidden.ndim != 3 or positions.ndim != 2 or hidden.shape[0] != positions.shape[0]:
    raise ValueError(f"gather_positions wants hidden [B, L, H] and positions [B, P], got "
                     f"{hidden.shape} and {positions.shape}")
  return jnp.take_along_axis(hidden, positions.astype(jnp.int32)[:, :, None], axis=1)


class MLMHead(nnx.Module):
  """Masked-language-model head, HF BERT `cls.predictions` / RoBERTa `lm_head`.

  `logits = LayerNorm(gelu(hidden @ W + b)) @ embedding^T + bias`, the decoder tied to the word
  embeddings (Devlin et al. 2019, HF `BertLMPredictionHead`).

  Attributes:
    transform: Dense H -> H, logical axes ("embed", "mlp") / ("mlp",).
    norm: LayerNorm over H, ("norm",).
    bias: float32[vocab_size] output bias, ("vocab",).
  """

  def __init__(self, hidden_size: int, vocab_size: int, *, layer_norm_eps: float = 1e-12,
               dtype: str = "float32", rngs: nnx.Rngs):
    self.transform = Dense(hidden_size, hidden_size, kernel_axes=("embed", "mlp"), bias_axes=("mlp",),
                           dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(hidden_size, eps=layer_norm_eps, dtype=dtype)
    self.bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32), out_sharding=("vocab",))
    self.hidden_size = hidden_size
    self.vocab_size = vocab_size
    self.dtype = dtype

  def __call__(self, hidden: jax.Array, embedding: jax.Array) -> jax.Array:
    """MLM logits.

    Args:
      hidden: float[..., H], typically the gathered masked positions [batch, max_predictions, H].
      embedding: float32[vocab_size, H], the encoder's `word_embeddings[...]` (tied decoder).

    Returns:
      float32[..., vocab_size] logits.

    Raises:
      ValueError: shape mismatch between `hidden`, `embedding` and the head.
    """
    if hidden.shape[-1] != self.hidden_size or embedding.shape != (self.vocab_size, self.hidden_size):
      raise ValueError(f"MLMHead({self.hidden_size}, {self.vocab_size}) got hidden {hidden.shape} and "
                       f"embedding {embedding.shape}")
    dt = resolve_dtype(self.dtype)
    x = self.norm(gelu(self.transform(hidden)))
    logits = jnp.einsum("...h,vh->...v", x.astype(dt), embedding.astype(dt),
                        preferred_element_type=jnp.float32)
    return logits + self.bias[...]


class RelationClassifier(nnx.Module):
  """Relation classifier on the entity start markers (Baldini Soares et al. 2019 "entity start").

  `logits = Linear(dropout(relu(Linear([h[subj_pos]; h[obj_pos]]))))`.

  Attributes:
    hidden: Dense 2H -> H, ("embed", "mlp") / ("mlp",).
    output: Dense H -> num_labels, ("mlp", "classes") / ("classes",).
  """

  def __init__(self, hidden_size: int, num_labels: int, *, dropout_rate: float = 0.1,
               dtype: str = "float32", rngs: nnx.Rngs):
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if num_labels < 1:
      raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    self.hidden = Dense(2 * hidden_size, hidden_size, kernel_axes=("embed", "mlp"), bias_axes=("mlp",),
                        dtype=dtype, rngs=rngs)
    self.output = Dense(hidden_size, num_labels, kernel_axes=("mlp", "classes"), bias_axes=("classes",),
                        dtype=dtype, rngs=rngs)
    self.dropout_rate = float(dropout_rate)

  def features(self, hidden: jax.Array, subj_pos: jax.Array, obj_pos: jax.Array) -> jax.Array:
    """Concatenated marker states: float[batch, seq_len, H], int32[batch] x2 -> float[batch, 2H]."""
    if subj_pos.shape != (hidden.shape[0],) or obj_pos.shape != (hidden.shape[0],):
      raise ValueError(f"subj_pos / obj_pos must be int32[batch={hidden.shape[0]}], got "
                       f"{subj_pos.shape} and {obj_pos.shape}")
    pair = gather_positions(hidden, jnp.stack([subj_pos, obj_pos], axis=1))  # [B, 2, H]
    return pair.reshape(hidden.shape[0], 2 * hidden.shape[-1])

  def __call__(self, hidden: jax.Array, subj_pos: jax.Array, obj_pos: jax.Array, *,
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Relation logits.

    Args:
      hidden: float[batch, seq_len, H] encoder output.
      subj_pos: int32[batch] index of the subject start marker `@`.
      obj_pos: int32[batch] index of the object start marker `#`.
      dropout_rng: key enabling dropout (rate `dropout_rate`) after the ReLU; None = deterministic.

    Returns:
      float32[batch, num_labels].
    """
    x = jax.nn.relu(self.hidden(self.features(hidden, subj_pos, obj_pos)))
    x = dropout(x, self.dropout_rate, dropout_rng)
    return self.output(x).astype(jnp.float32)


class SpanProjection(nnx.Module):
  """Shared projection for TKRE span-level contrastive learning: Linear-ReLU-Linear then L2-normalise.

  `z = g / max(||g||_2, 1e-12)` with `g = W2 relu(W1 h + b1) + b2` (torch `F.normalize` formula).

  Attributes:
    hidden: Dense H -> H, ("embed", "mlp") / ("mlp",).
    output: Dense H -> proj_dim, ("mlp", None) / (None,).
  """

  def __init__(self, hidden_size: int, proj_dim: int, *, dtype: str = "float32", rngs: nnx.Rngs):
    self.hidden = Dense(hidden_size, hidden_size, kernel_axes=("embed", "mlp"), bias_axes=("mlp",),
                        dtype=dtype, rngs=rngs)
    self.output = Dense(hidden_size, proj_dim, kernel_axes=("mlp", None), bias_axes=(None,),
                        dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """float[..., H] -> float32[..., proj_dim], unit L2 norm along the last axis."""
    g = self.output(jax.nn.relu(self.hidden(x))).astype(jnp.float32)
    # rsqrt(max(|g|^2, eps^2)) rather than g / max(|g|, eps): the gradient stays finite (zero) when
    # g is exactly 0 (an all-zero input, e.g. a padding row), where d sqrt(s)/ds is infinite.
    sq = jnp.sum(jnp.square(g), axis=-1, keepdims=True)
    return g * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class RelationAnchors(nnx.Module):
  """Learned relation anchor vectors (one per relation) for TKRE contrastive learning.

  Attributes:
    anchors: float32[num_relations, H] Param, logical axes (None, "embed").
  """

  def __init__(self, num_relations: int, hidden_size: int, *, init: Optional[np.ndarray] = None,
               rngs: Optional[nnx.Rngs] = None):
    """Creates the anchor matrix.

    Args:
      num_relations, hidden_size: the anchor matrix shape.
      init: optional float[num_relations, hidden_size] initial values (e.g. encoded relation
        descriptions); else normal(0, 0.02) from `rngs`.
      rngs: required when `init` is None.

    Raises:
      ValueError: `init` of the wrong shape, or neither `init` nor `rngs` given.
    """
    if init is not None:
      value = jnp.asarray(init, jnp.float32)
      if value.shape != (num_relations, hidden_size):
        raise ValueError(f"RelationAnchors init has shape {value.shape}, expected "
                         f"{(num_relations, hidden_size)}")
    elif rngs is None:
      raise ValueError("RelationAnchors needs `init` or `rngs`")
    else:
      value = INIT_STDDEV * jax.random.normal(rngs.params(), (num_relations, hidden_size), jnp.float32)
    self.anchors = nnx.Param(value, out_sharding=(None, "embed"))

  def __call__(self) -> jax.Array:
    """-> float32[num_relations, H]."""
    return self.anchors[...]
