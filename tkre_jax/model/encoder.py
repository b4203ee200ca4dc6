"""BERT / RoBERTa encoder in `flax.nnx`, numerically matching Hugging Face `BertModel` / `RobertaModel`.

The network is the post-LayerNorm Transformer encoder of Devlin et al. 2019 ("BERT", arXiv:1810.04805)
exactly as implemented by `transformers.models.bert.modeling_bert` (and `modeling_roberta`, which only
changes how position ids are made, see `make_position_ids`):

  embeddings: h0 = LayerNorm((word[ids] + token_type[tt]) + position[pos])
  layer:      a  = LayerNorm(x + Dense(MultiHeadAttention(x)))
              y  = LayerNorm(a + Dense(gelu(Dense(a))))

with exact (erf) GELU, attention scores `q k^T / sqrt(head_dim)` plus an additive mask
`(1 - attention_mask) * finfo(float32).min` computed and soft-maxed in float32, and LayerNorm with the
biased variance `(x - mean) / sqrt(var + eps) * scale + bias` in float32.

Precision: parameters are float32. `EncoderConfig.dtype` is the compute dtype of the matmuls and of the
activations between layers ("float32", "bfloat16" or "float16"); LayerNorm, softmax and attention-score
accumulation stay in float32 and the encoder output is cast to float32.

Dropout never uses `nnx.Rngs` state: it is active only when a `dropout_rng` key is passed to `__call__`,
and every dropout site derives its own key with `jax.random.fold_in` / `jax.random.split`, so a train
step can be a pure `jax.jit` function of `(state, batch, key)`.

Sharding: every parameter carries a tuple of logical axis names as its `out_sharding` metadata (see
`LOGICAL_AXIS_NAMES`); `nnx.get_partition_spec(nnx.state(model))` returns them as `PartitionSpec`s.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tkre_jax.model.attention import (  # noqa: F401  (re-exported: the encoder's public API)
    ATTENTION_IMPLS, attention_mask_bias, dropout, explicit_attention, fused_attention)
from tkre_jax.model.encoder_config import (  # noqa: F401  (re-exported: the encoder's public API)
    INIT_STDDEV, MODEL_TYPES, EncoderConfig, resolve_dtype)

# Every logical axis name used by the parameters of `tkre_jax.model` (None means "replicated").
#   vocab: vocabulary rows; embed: hidden size (model dim); heads: the concatenated attention-head dim
#   of q/k/v; mlp: feed-forward / head intermediate dim; norm: 1-d hidden-sized vectors (LayerNorm scale
#   and bias, output biases); classes: relation classifier outputs.
LOGICAL_AXIS_NAMES = ("vocab", "embed", "heads", "mlp", "norm", "classes")

Axes = tuple[Optional[str], ...]


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU `0.5 * x * (1 + erf(x / sqrt(2)))` (HF `ACT2FN["gelu"]`, Hendrycks & Gimpel 2016)."""
  return jax.nn.gelu(x, approximate=False)


def _normal_init(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """HF `_init_weights`: normal(0, initializer_range) for Linear kernels and embeddings."""
  return INIT_STDDEV * jax.random.normal(key, tuple(shape), jnp.float32)


class Dense(nnx.Module):
  """Affine map `y = x @ kernel + bias` (an HF `nn.Linear` with its weight transposed to [in, out]).

  Attributes:
    kernel: float32[in_features, out_features] Param, logical axes `kernel_axes`.
    bias: float32[out_features] Param, logical axes `bias_axes`.
  """

  def __init__(self, in_features: int, out_features: int, *, kernel_axes: Axes, bias_axes: Axes,
               dtype: str = "float32", rngs: nnx.Rngs):
    resolve_dtype(dtype)
    self.kernel = nnx.Param(_normal_init(rngs.params(), (in_features, out_features)),
                            out_sharding=tuple(kernel_axes))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32), out_sharding=tuple(bias_axes))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[..., in_features] -> `dtype`[..., out_features] (inputs cast to the compute dtype)."""
    dt = resolve_dtype(self.dtype)
    y = jnp.einsum("...i,io->...o", x.astype(dt), self.kernel[...].astype(dt))
    return y + self.bias[...].astype(dt)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32 (Ba et al. 2016; torch `nn.LayerNorm`).

  `y = (x - mean) / sqrt(var + eps) * scale + bias` with the biased variance.

  Attributes:
    scale: float32[size] Param (HF `LayerNorm.weight`), logical axes ("norm",).
    bias: float32[size] Param (HF `LayerNorm.bias`), logical axes ("norm",).
  """

  def __init__(self, size: int, *, eps: float, dtype: str = "float32"):
    resolve_dtype(dtype)
    self.scale = nnx.Param(jnp.ones((size,), jnp.float32), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((size,), jnp.float32), out_sharding=("norm",))
    self.eps = float(eps)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[..., size] -> `dtype`[..., size]."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(resolve_dtype(self.dtype))


def make_position_ids(input_ids: jax.Array, config: EncoderConfig) -> jax.Array:
  """Position ids for `input_ids`: int32[batch, seq_len] -> int32[batch, seq_len].

  BERT (`position_offset == 0`): `0, 1, ..., seq_len - 1` for every row.
  RoBERTa (`position_offset == pad_token_id + 1`), HF `create_position_ids_from_input_ids`:
  `mask = input_ids != pad; pos = cumsum(mask) * mask + pad`, i.e. real tokens count up from
  `pad + 1` and padding tokens get `pad` (the zero padding row of the position table).
  """
  input_ids = jnp.asarray(input_ids)
  batch, seq_len = input_ids.shape
  if config.position_offset == 0:
    return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32)[None, :], (batch, seq_len))
  mask = (input_ids != config.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(mask, axis=1, dtype=jnp.int32) * mask + (config.position_offset - 1)


class SelfAttention(nnx.Module):
  """Multi-head self-attention plus HF `BertSelfOutput` (dense, dropout, residual, LayerNorm)."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    h, dt = config.hidden_size, config.dtype
    self.query = Dense(h, h, kernel_axes=("embed", "heads"), bias_axes=("heads",), dtype=dt, rngs=rngs)
    self.key = Dense(h, h, kernel_axes=("embed", "heads"), bias_axes=("heads",), dtype=dt, rngs=rngs)
    self.value = Dense(h, h, kernel_axes=("embed", "heads"), bias_axes=("heads",), dtype=dt, rngs=rngs)
    self.output = Dense(h, h, kernel_axes=("heads", "embed"), bias_axes=("norm",), dtype=dt, rngs=rngs)
    self.output_norm = LayerNorm(h, eps=config.layer_norm_eps, dtype=dt)
    self.num_heads = config.num_heads
    self.attention_dropout = config.attention_dropout
    self.hidden_dropout = config.hidden_dropout
    self.attention_impl = config.attention_impl

  def keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys and values of `x`: dtype[batch, seq_len, H] -> two [batch, seq_len, heads, head_dim]."""
    batch, seq_len, hidden = x.shape
    shape = (batch, seq_len, self.num_heads, hidden // self.num_heads)
    return self.key(x).reshape(shape), self.value(x).reshape(shape)

  def __call__(self, x: jax.Array, mask_bias: jax.Array, rng: Optional[jax.Array] = None, *,
               kv_prefix: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """dtype[batch, seq_len, H], float32[batch, 1, 1, keys] -> dtype[batch, seq_len, H].

    `kv_prefix`: keys and values ([batch, P, heads, head_dim] each, from `keys_values` of other
    tokens) that the queries attend to before their own; `mask_bias` then covers P + seq_len keys.
    """
    batch, seq_len, hidden = x.shape
    head_dim = hidden // self.num_heads
    split = lambda t: t.reshape(batch, seq_len, self.num_heads, head_dim)
    q = split(self.query(x))
    k, v = self.keys_values(x)
    if kv_prefix is not None:
      k = jnp.concatenate([kv_prefix[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([kv_prefix[1].astype(v.dtype), v], axis=1)
    probs_rng, out_rng = (None, None) if rng is None else tuple(jax.random.split(rng, 2))
    probs_dropout = probs_rng is not None and self.attention_dropout > 0.0
    if self.attention_impl == "dot_product" or (self.attention_impl == "auto" and not probs_dropout):
      context = fused_attention(q, k, v, mask_bias).reshape(batch, seq_len, hidden)
    else:
      context = explicit_attention(q, k, v, mask_bias, dropout_rate=self.attention_dropout,
                                   rng=probs_rng).reshape(batch, seq_len, hidden)
    out = dropout(self.output(context), self.hidden_dropout, out_rng)
    return self.output_norm(out.astype(jnp.float32) + x.astype(jnp.float32))


class EncoderLayer(nnx.Module):
  """One post-LayerNorm Transformer layer (HF `BertLayer`)."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    h, i, dt = config.hidden_size, config.intermediate_size, config.dtype
    self.attention = SelfAttention(config, rngs=rngs)
    self.intermediate = Dense(h, i, kernel_axes=("embed", "mlp"), bias_axes=("mlp",), dtype=dt, rngs=rngs)
    self.output = Dense(i, h, kernel_axes=("mlp", "embed"), bias_axes=("norm",), dtype=dt, rngs=rngs)
    self.output_norm = LayerNorm(h, eps=config.layer_norm_eps, dtype=dt)
    self.hidden_dropout = config.hidden_dropout

  def __call__(self, x: jax.Array, mask_bias: jax.Array, rng: Optional[jax.Array] = None, *,
               kv_prefix: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """dtype[batch, seq_len, H], float32[batch, 1, 1, keys] -> dtype[batch, seq_len, H]
    (`kv_prefix`: see `SelfAttention`)."""
    attn_rng, ffn_rng = (None, None) if rng is None else tuple(jax.random.split(rng, 2))
    a = self.attention(x, mask_bias, attn_rng, kv_prefix=kv_prefix)
    y = dropout(self.output(gelu(self.intermediate(a))), self.hidden_dropout, ffn_rng)
    return self.output_norm(y.astype(jnp.float32) + a.astype(jnp.float32))


class Encoder(nnx.Module):
  """BERT / RoBERTa encoder (HF `BertModel` / `RobertaModel` without the pooler).

  Attributes:
    config: the `EncoderConfig`.
    word_embeddings: float32[vocab_size, H] Param, logical axes ("vocab", "embed"); an MLM head ties
      its decoder to `encoder.word_embeddings[...]`.
    position_embeddings: float32[max_position_embeddings, H] Param, (None, "embed").
    token_type_embeddings: float32[type_vocab_size, H] Param, (None, "embed").
    embeddings_norm: the embedding `LayerNorm`.
    layers: `nnx.List` of `num_layers` `EncoderLayer`s.
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.config = config
    word = _normal_init(rngs.params(), (config.vocab_size, h)).at[config.pad_token_id].set(0.0)
    self.word_embeddings = nnx.Param(word, out_sharding=("vocab", "embed"))
    position = _normal_init(rngs.params(), (config.max_position_embeddings, h))
    if config.position_offset:  # RoBERTa's position table has a zero padding row too.
      position = position.at[config.pad_token_id].set(0.0)
    self.position_embeddings = nnx.Param(position, out_sharding=(None, "embed"))
    self.token_type_embeddings = nnx.Param(_normal_init(rngs.params(), (config.type_vocab_size, h)),
                                           out_sharding=(None, "embed"))
    self.embeddings_norm = LayerNorm(h, eps=config.layer_norm_eps, dtype=config.dtype)
    self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: Optional[jax.Array] = None, *,
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Encodes a batch.

    Args:
      input_ids: int32[batch, seq_len] token ids.
      attention_mask: int32[batch, seq_len], 1 on real tokens and 0 on padding.
      token_type_ids: optional int32[batch, seq_len] segment ids (zeros when None). Must be None when
        `config.use_token_types` is False.
      dropout_rng: PRNG key enabling dropout (training); None (default) means deterministic. Embedding
        dropout uses `fold_in(dropout_rng, 0)`, layer `i` uses `fold_in(dropout_rng, i + 1)`.

    Returns:
      float32[batch, seq_len, hidden_size] last hidden states (padding positions hold values too; they
      are meaningless, as in HF).

    Raises:
      ValueError: bad ranks / shapes, a sequence longer than `config.max_seq_len`, or token-type ids
        given to an encoder that does not use them.
    """
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    attention_mask = jnp.asarray(attention_mask)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, seq_len], got shape {input_ids.shape}")
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    seq_len = input_ids.shape[1]
    if seq_len > cfg.max_seq_len:
      raise ValueError(f"sequence length {seq_len} exceeds the {cfg.max_seq_len} positions this encoder "
                       f"supports (max_position_embeddings {cfg.max_position_embeddings}, "
                       f"position_offset {cfg.position_offset})")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    elif not cfg.use_token_types:
      raise ValueError(f"this {cfg.model_type} encoder does not use token_type_ids; pass None")
    else:
      token_type_ids = jnp.asarray(token_type_ids)
      if token_type_ids.shape != input_ids.shape:
        raise ValueError(f"token_type_ids shape {token_type_ids.shape} != input_ids shape {input_ids.shape}")

    x = self.embed(input_ids, make_position_ids(input_ids, cfg), token_type_ids,
                   dropout_rng=dropout_rng)
    mask_bias = attention_mask_bias(attention_mask)
    for index, layer in enumerate(self.layers):
      layer_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index + 1)
      x = layer(x, mask_bias, layer_rng)
    return x.astype(jnp.float32)


  def embed(self, input_ids: jax.Array, position_ids: jax.Array,
            token_type_ids: Optional[jax.Array] = None, *,
            dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """The embedding layer at given positions: int32[..., seq_len] ids and position ids ->
    dtype[..., seq_len, H] (word + token type + position, LayerNorm, dropout with
    `fold_in(dropout_rng, 0)` as in `__call__`). Token types default to 0."""
    cfg = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = jnp.take(self.word_embeddings[...], input_ids, axis=0)
    x = x + jnp.take(self.token_type_embeddings[...], token_type_ids, axis=0)
    x = x + jnp.take(self.position_embeddings[...], position_ids, axis=0)
    x = self.embeddings_norm(x)
    if dropout_rng is not None:
      x = dropout(x, cfg.hidden_dropout, jax.random.fold_in(dropout_rng, 0))
    return x


def logical_axes(module: nnx.Module) -> dict[str, tuple[Optional[str], ...]]:
  """Logical axis names of every `nnx.Param` of `module`, keyed by '/'-joined path.

  Returns:
    {"layers/0/attention/query/kernel": ("embed", "heads"), ...}; a Param without names maps to ().
  """
  out = {}
  for path, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Param):
      names = var.get_metadata().get("out_sharding") or ()
      out["/".join(str(p) for p in path)] = tuple(names)
  return out
