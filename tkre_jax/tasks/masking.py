"""Knowledge-guided token masking for Masked Span Language Modeling (MSLM).

TKRE pre-training stage 1 ("Masked Span Language Modeling", TKRE paper, arXiv 2505.12236)
masks tokens with a probability that depends on which span they belong to: the relation span
(the tokens strictly between the two entities, `span_ids == 4`) is masked most often because
it carries the relational knowledge, the entity mentions (`span_ids` 2 and 3) less often, and
the remaining context (`span_ids == 1`) least often. Padding, special tokens and the entity
markers (`span_ids == 0`) are never masked. Unlike BERT's 80/10/10 rule, every selected token is
replaced by the mask token.

Selection is an independent Bernoulli draw per token. As in BERT's pre-training
(`max_predictions_per_seq`), at most a static number `P` of the selected tokens per row are
predicted, so the vocabulary projection is computed for `[batch, P]` positions only. When a row
selects more than `P` tokens, a uniformly random subset of size `P` is kept (each selected
token gets an independent uniform priority and the `P` highest priorities win, so every
subset of size `P` is equally likely and no position is favoured). Tokens that are dropped
are left unmasked in the input, so the masked input and the labels always agree.

All randomness comes from the `rng` argument; everything here is jit-able with static shapes.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from tkre_jax.data.features import NUM_SPAN_KINDS  # `span_ids` values, docs/architecture.md


class MaskingProbs(NamedTuple):
  """Per-span masking probabilities (TKRE MSLM).

  Attributes:
    never: probability for `span_ids == 0` (padding, special tokens, entity markers).
    context: probability for `span_ids == 1` (context tokens).
    entity: probability for `span_ids` 2 and 3 (subject and object entity tokens).
    relation: probability for `span_ids == 4` (the relation span between the entities).
  """

  never: float = 0.0
  context: float = 0.2
  entity: float = 0.5
  relation: float = 0.8


DEFAULT_MASKING_PROBS = MaskingProbs()

ProbsLike = Union[MaskingProbs, tuple]


def _as_probs(probs: ProbsLike) -> MaskingProbs:
  """Converts a 4-tuple `(never, context, entity, relation)` and checks the values.

  Raises:
    ValueError: not four values, or a (concrete) value outside [0, 1].
  """
  if not isinstance(probs, MaskingProbs):
    probs = tuple(probs)
    if len(probs) != 4:
      raise ValueError("masking probabilities must be 4 values (never, context, entity, "
                       f"relation), got {len(probs)}: {probs!r}")
    probs = MaskingProbs(*probs)
  for name, value in probs._asdict().items():
    if isinstance(value, numbers.Real) and not 0.0 <= float(value) <= 1.0:
      raise ValueError(f"masking probability `{name}` must lie in [0, 1], got {value}")
  return probs


def _check_2d(name: str, x: jax.Array) -> None:
  if x.ndim != 2:
    raise ValueError(f"`{name}` must be [batch, seq_len], got shape {tuple(x.shape)}")


def masking_probabilities(span_ids: jax.Array,
                          probs: ProbsLike = DEFAULT_MASKING_PROBS) -> jax.Array:
  """Per-token masking probability from the span kind.

  Args:
    span_ids: int32[batch, seq_len], values 0..4 (see `docs/architecture.md`). Values outside
      0..4 get probability 0 (never masked).
    probs: `MaskingProbs` or a 4-tuple `(never, context, entity, relation)`.

  Returns:
    float32[batch, seq_len]: `probs.relation` where `span_ids == 4`, `probs.entity` where
    `span_ids` is 2 or 3, `probs.context` where it is 1, `probs.never` where it is 0.

  Raises:
    ValueError: bad `probs` or `span_ids` not 2-D.
  """
  probs = _as_probs(probs)
  _check_2d("span_ids", span_ids)
  table = jnp.stack([jnp.asarray(v, jnp.float32) for v in
                     (probs.never, probs.context, probs.entity, probs.entity, probs.relation)])
  in_range = (span_ids >= 0) & (span_ids < NUM_SPAN_KINDS)
  p = jnp.take(table, jnp.clip(span_ids, 0, NUM_SPAN_KINDS - 1), axis=0)
  return jnp.where(in_range, p, 0.0).astype(jnp.float32)


def mask_span_tokens(rng: jax.Array,
                     input_ids: jax.Array,
                     span_ids: jax.Array,
                     *,
                     mask_token_id: int,
                     max_predictions: int,
                     probs: ProbsLike = DEFAULT_MASKING_PROBS) -> dict[str, jax.Array]:
  """Selects tokens by span kind, keeps at most `max_predictions` per row and masks them.

  TKRE MSLM: token t of row b is selected with probability `p(span_ids[b, t])`
  (`masking_probabilities`), independently. If a row selects more than `P = max_predictions`
  tokens, a uniformly random subset of `P` of them is kept (random priorities, top-P); the
  rest are "dropped": they stay unmasked and are not predicted. Every kept token is replaced
  by `mask_token_id` (no 80/10/10 replacement).

  Args:
    rng: a PRNG key (e.g. `jax.random.fold_in(key, step)`, split per use).
    input_ids: int32[batch, seq_len] token ids.
    span_ids: int32[batch, seq_len] span kinds, 0..4.
    mask_token_id: the tokenizer's mask token id (`[MASK]` / `<mask>`).
    max_predictions: static P >= 1, the number of prediction slots per row. P may exceed
      seq_len (the extra slots are padding).
    probs: `MaskingProbs` or `(never, context, entity, relation)`.

  Returns:
    A dict with
      `masked_input_ids`: int32[batch, seq_len], `mask_token_id` at the kept positions,
        `input_ids` elsewhere.
      `mlm_positions`: int32[batch, P], the kept positions in increasing order, then 0 for
        padding slots.
      `mlm_labels`: int32[batch, P], the original ids at `mlm_positions` (0 for padding).
      `mlm_weights`: float32[batch, P], 1.0 for a real prediction, 0.0 for padding.
      `num_selected`: int32[batch], tokens selected by the Bernoulli draw.
      `num_dropped`: int32[batch], selected tokens not kept because of the P cap
        (`num_selected - sum(mlm_weights)`).

  Raises:
    ValueError: `max_predictions` not a positive int, arrays not 2-D or of different shapes,
      or bad `probs`.
  """
  if isinstance(max_predictions, bool) or not isinstance(max_predictions, numbers.Integral) \
      or max_predictions < 1:
    raise ValueError(f"`max_predictions` must be a positive int (static), got {max_predictions!r}")
  _check_2d("input_ids", input_ids)
  _check_2d("span_ids", span_ids)
  if input_ids.shape != span_ids.shape:
    raise ValueError(f"`input_ids` {tuple(input_ids.shape)} and `span_ids` "
                     f"{tuple(span_ids.shape)} must have the same shape")
  batch, seq_len = input_ids.shape
  num_slots = int(max_predictions)
  k = min(num_slots, seq_len)

  select_rng, keep_rng = jax.random.split(rng)
  p = masking_probabilities(span_ids, probs)
  selected = jax.random.uniform(select_rng, (batch, seq_len), jnp.float32) < p
  num_selected = jnp.sum(selected, axis=1, dtype=jnp.int32)

  # Uniformly random subset of at most k selected tokens: iid priorities in [0, 1), unselected
  # tokens get -1 so they lose to every selected one; indices from top_k (no threshold, so
  # ties between priorities cannot keep more than k).
  priority = jnp.where(selected, jax.random.uniform(keep_rng, (batch, seq_len), jnp.float32),
                       -1.0)
  top_vals, top_idx = jax.lax.top_k(priority, k)
  rows = jnp.arange(batch)[:, None]
  keep = jnp.zeros((batch, seq_len), jnp.bool_).at[rows, top_idx].set(top_vals >= 0.0)

  # Kept positions in increasing order first (stable sort of "not kept").
  order = jnp.argsort(jnp.logical_not(keep).astype(jnp.int32), axis=1, stable=True)[:, :k]
  real = jnp.take_along_axis(keep, order, axis=1)
  positions = jnp.where(real, order, 0).astype(jnp.int32)
  labels = jnp.where(real, jnp.take_along_axis(input_ids, positions, axis=1), 0)
  weights = real.astype(jnp.float32)
  if k < num_slots:
    pad = ((0, 0), (0, num_slots - k))
    positions, labels, weights = (jnp.pad(x, pad) for x in (positions, labels, weights))

  masked_input_ids = jnp.where(keep, jnp.asarray(mask_token_id, input_ids.dtype), input_ids)
  num_kept = jnp.sum(keep, axis=1, dtype=jnp.int32)
  return {
      "masked_input_ids": masked_input_ids.astype(jnp.int32),
      "mlm_positions": positions.astype(jnp.int32),
      "mlm_labels": labels.astype(jnp.int32),
      "mlm_weights": weights,
      "num_selected": num_selected,
      "num_dropped": num_selected - num_kept,
  }


def bert_mask_tokens(rng: jax.Array,
                     input_ids: jax.Array,
                     span_ids: jax.Array,
                     *,
                     mask_token_id: int,
                     vocab_size: int,
                     max_predictions: int,
                     prob: float = 0.15) -> dict[str, jax.Array]:
  """BERT's masking (Devlin et al. 2019, Sec. 3.1), as SaCon pre-trains (arXiv 2312.12021).

  Every maskable token (`span_ids` 1-4; special tokens, entity markers, padding and blanked
  entities carry 0 and are never selected) is selected with probability `prob`, at most
  `max_predictions` per row (`mask_span_tokens`, the same uniform cap). Of the kept tokens, 80%
  become `mask_token_id`, 10% a uniformly random id in [0, vocab_size), 10% stay as they are; all
  kept tokens are predicted.

  Args:
    rng: a PRNG key.
    input_ids, span_ids: int32[batch, seq_len].
    mask_token_id: the tokenizer's mask id; vocab_size: the encoder's vocabulary size.
    max_predictions: static prediction slots per row P >= 1.
    prob: the selection probability, in [0, 1].

  Returns:
    The dict of `mask_span_tokens` (`masked_input_ids` with the 80/10/10 replacement,
    `mlm_positions`, `mlm_labels`, `mlm_weights` [batch, P], `num_selected`, `num_dropped`).

  Raises:
    ValueError: as `mask_span_tokens`; `vocab_size` < 1.
  """
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
  select_rng, replace_rng, random_rng = jax.random.split(rng, 3)
  out = mask_span_tokens(select_rng, input_ids, span_ids, mask_token_id=mask_token_id,
                         max_predictions=max_predictions,
                         probs=MaskingProbs(0.0, prob, prob, prob))
  kept = out["masked_input_ids"] == mask_token_id
  kept &= input_ids != mask_token_id
  u = jax.random.uniform(replace_rng, input_ids.shape, jnp.float32)
  random_ids = jax.random.randint(random_rng, input_ids.shape, 0, vocab_size, jnp.int32)
  replaced = jnp.where(u < 0.8, jnp.int32(mask_token_id),
                       jnp.where(u < 0.9, random_ids, input_ids.astype(jnp.int32)))
  out["masked_input_ids"] = jnp.where(kept, replaced, input_ids).astype(jnp.int32)
  return out
