"""Encoder shapes for benchmarks and the analytic FLOP count of every step the stages run.

The count follows the accounting of PaLM (Chowdhery et al. 2022, arXiv:2204.02311, Appendix B) and
MaxText's `calculate_tflops_training_per_device`: only matrix multiplications count, 2 FLOPs per
multiply-add; a training step costs 3x the forward pass (forward, plus gradients with respect to
activations and to weights); attention over a sequence of S tokens adds `4 * S * H` forward FLOPs per
token and layer (scores `q k^T` and `probs v`, bidirectional, so no causal halving). Embedding
lookups, LayerNorm, softmax, GELU, dropout, masking and the optimizer update are not counted (they
are what XLA's `cost_analysis()` counts on top; see `tkre_jax.benchmarking.timing`).

Per token and layer, forward (H hidden, I intermediate, S sequence length):

    q, k, v, output projections   2 * 4 * H * H
    feed-forward                  2 * 2 * H * I
    attention                     2 * 2 * S * H

Heads, forward:

    MLM head, per prediction slot     2 * H * H (transform) + 2 * H * V (decoder tied to the
                                      embeddings); every one of the `max_predictions` static slots
                                      is computed, so every slot counts
    relation classifier, per row      2 * 2H * H + 2 * H * C
    SCL projection, per projected row 2 * H * H + 2 * H * D (span rows: positive and negative per
                                      sequence, plus the R anchors); the InfoNCE similarities
                                      (< 0.1% of the step) are left out
"""

from __future__ import annotations

from typing import Any

from tkre_jax import config as config_lib
from tkre_jax.model.encoder_config import EncoderConfig

# Published encoder shapes (HF config.json of each checkpoint), built with random weights so no
# download is needed: name -> EncoderConfig fields.
ENCODER_SHAPES: dict[str, dict[str, Any]] = {
    "minilm-l6": dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                      intermediate_size=1536, max_position_embeddings=512),
    "bert-base": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                      intermediate_size=3072, max_position_embeddings=512),
    "roberta-base": dict(vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12,
                         intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                         layer_norm_eps=1e-5, pad_token_id=1, position_offset=2,
                         use_token_types=False, model_type="roberta"),
    "roberta-large": dict(vocab_size=50265, hidden_size=1024, num_layers=24, num_heads=16,
                          intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
                          layer_norm_eps=1e-5, pad_token_id=1, position_offset=2,
                          use_token_types=False, model_type="roberta"),
}
TINY = "tiny"  # EncoderConfig.tiny(): 2 layers, hidden 32 (tests)

# The mask token id of each shape's tokenizer ([MASK] of BERT's uncased vocab, <mask> of RoBERTa's).
MASK_TOKEN_IDS = {"minilm-l6": 103, "bert-base": 103, "roberta-base": 50264, "roberta-large": 50264,
                  TINY: 4}

STEP_KINDS = config_lib.BENCH_STAGES


def encoder_shape(name: str, **overrides: Any) -> EncoderConfig:
  """The `EncoderConfig` of a named shape (`ENCODER_SHAPES` or "tiny"), e.g. `dtype="bfloat16"`.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name == TINY:
    return EncoderConfig.tiny(**overrides)
  if name not in ENCODER_SHAPES:
    raise ValueError(f"unknown model shape {name!r}; known: {', '.join([*ENCODER_SHAPES, TINY])}")
  return EncoderConfig(**{**ENCODER_SHAPES[name], **overrides})


def encoder_forward_flops(cfg: EncoderConfig, batch: int, seq_len: int,
                          extra_keys: int = 0) -> int:
  """Forward matmul FLOPs of the encoder on `batch` sequences of `seq_len` positions (every
  position counts, padding included: it is computed); `extra_keys`: cached keys / values each
  query attends to besides its own sequence's (the cached template pass)."""
  h, i = cfg.hidden_size, cfg.intermediate_size
  per_token_layer = 2 * 4 * h * h + 2 * 2 * h * i + 2 * 2 * (seq_len + extra_keys) * h
  return batch * seq_len * cfg.num_layers * per_token_layer


def mlm_head_flops(cfg: EncoderConfig, slots: int) -> int:
  """Forward FLOPs of the MLM head on `slots` gathered positions."""
  h = cfg.hidden_size
  return slots * (2 * h * h + 2 * h * cfg.vocab_size)


def classifier_flops(cfg: EncoderConfig, batch: int, num_labels: int) -> int:
  """Forward FLOPs of the relation classifier (Linear 2H -> H, Linear H -> C) on `batch` rows."""
  h = cfg.hidden_size
  return batch * (2 * 2 * h * h + 2 * h * num_labels)


def projection_flops(cfg: EncoderConfig, rows: int, proj_dim: int = 0) -> int:
  """Forward FLOPs of the SCL span projection (Linear H -> H, Linear H -> D) on `rows` rows."""
  h = cfg.hidden_size
  return rows * (2 * h * h + 2 * h * (proj_dim or h))


def _layer_flops(cfg: EncoderConfig, tokens: int, keys: int) -> int:
  """Forward FLOPs of one encoder layer on `tokens` query tokens that attend to `keys` keys."""
  h, i = cfg.hidden_size, cfg.intermediate_size
  return tokens * (2 * 4 * h * h + 2 * 2 * h * i + 2 * 2 * keys * h)


def predicate_flops(cfg: EncoderConfig, batch: int, templates: int, template_len: int, *,
                    cached_relations: int = 0, static_len: int = 0, fusion_layers: int = 0) -> int:
  """Forward FLOPs of the predicate head's side (`model.predicate`): the template passes through
  the predicate encoder, the instance projection 2H -> H, the predicate projection 3H -> H per
  template, and the cosines.

  The full pass (`cached_relations` 0): `batch * templates` templates of `template_len` tokens.
  The cached pass (`predicate.cached_template_states`): `template_len` is the Q = 4 + 2E instance
  tokens; the `cached_relations` x `static_len` literal tokens go through all layers but the last,
  with keys / values kept for the top F = `fusion_layers` (0: all) layers; the instance tokens go
  through the lower L - F layers once per row (keys: each other), the next F - 1 once per
  (row, template) (keys: S + Q), and the last layer computes keys / values of the Q - 2 other
  instance tokens and the whole layer for the two start markers only."""
  h, L = cfg.hidden_size, cfg.num_layers
  pairs = batch * templates
  head = batch * 2 * 2 * h * h + pairs * (2 * 3 * h * h + 2 * h)
  if not cached_relations:
    return encoder_forward_flops(cfg, pairs, template_len) + head
  S, Q = static_len, template_len
  F = L if fusion_layers <= 0 or fusion_layers >= L else fusion_layers
  kv = 2 * 2 * h * h  # the key and value projections of one token
  static = cached_relations * ((L - 1) * _layer_flops(cfg, S, S) + F * S * kv)
  unfused = (L - F) * _layer_flops(cfg, batch * Q, Q)
  fused = (F - 1) * _layer_flops(cfg, pairs * Q, S + Q)
  last = (batch if F == 1 and F < L else pairs) * (Q - 2) * kv + _layer_flops(cfg, pairs * 2, S + Q)
  return static + unfused + fused + last + head


def step_flops(kind: str, cfg: EncoderConfig, batch: int, seq_len: int, *,
               max_predictions: int = 32, num_labels: int = 16, num_relations: int = 16,
               proj_dim: int = 0, span_input: str = "masked", templates: int = 0,
               template_len: int = 64, cached_relations: int = 0,
               static_len: int = 0, fusion_layers: int = 0) -> dict[str, int]:
  """Analytic FLOPs of one step of `kind` on a global batch of `batch` x `seq_len`.

  Args:
    kind: "mslm" | "scl" | "finetune" (train steps: 3x forward) | "eval" (the classifier's forward
      pass, `finetune.make_predict_step`) | "finetune_predicate" / "eval_predicate" (the same with
      the predicate head: `templates` templates of `template_len` tokens per row; with
      `cached_relations`, the cached template pass with `fusion_layers`, see `predicate_flops`).
    max_predictions: MLM prediction slots per sequence (mslm, scl).
    num_labels: classifier classes (finetune, eval).
    num_relations, proj_dim, span_input: the SCL anchors, projection size (0: H) and whether the
      spans come from a second, clean encoder pass ("clean").

  Returns:
    `{"forward": int, "step": int}`: forward FLOPs and the FLOPs of the step (3x forward for a
    train step, the forward for eval), for the whole global batch.

  Raises:
    ValueError: an unknown `kind`.
  """
  enc = encoder_forward_flops(cfg, batch, seq_len)
  if kind == "mslm":
    fwd = enc + mlm_head_flops(cfg, batch * max_predictions)
  elif kind == "scl":
    passes = 2 if span_input == "clean" else 1
    fwd = (passes * enc + mlm_head_flops(cfg, batch * max_predictions)
           + projection_flops(cfg, 2 * batch + num_relations, proj_dim))
  elif kind in ("finetune", "eval"):
    fwd = enc + classifier_flops(cfg, batch, num_labels)
  elif kind in ("finetune_predicate", "eval_predicate"):
    fwd = (enc + classifier_flops(cfg, batch, num_labels)
           + predicate_flops(cfg, batch, templates or num_labels, template_len,
                             cached_relations=cached_relations, static_len=static_len,
                             fusion_layers=fusion_layers))
  else:
    raise ValueError(f"unknown step kind {kind!r}; expected one of {STEP_KINDS}")
  return {"forward": int(fwd), "step": int(fwd if kind.startswith("eval") else 3 * fwd)}
