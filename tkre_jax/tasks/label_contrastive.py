"""SaCon relation-aware pre-training, the library part (the stage is `tkre_jax/stages/sacon.py`).

SaCon (Symmetric anchored Contrastive pre-training; arXiv 2312.12021, code AONE-NLP/FSRE-SaCon)
trains a sentence encoder E_s and a label encoder E_l on labelled sentences of the PRE-TRAINING
relations (FewRel 1.0's 64 training relations, disjoint from the evaluated ones):

* sentences carry entity markers (`data.features`); each entity mention is replaced by one blank
  token (the tokenizer's unknown token) with probability `blank_prob`, drawn once per instance when
  the data set is built (`blank_entities`, seeded);
* labels are `[CLS] relation name [SEP] description [SEP]` (`label_features`);
* s_i = normalize([h(subject start); h(object start)]), l_j = normalize([h_CLS; masked mean]);
* logits Z = exp(t) S L^T over the batch's U distinct labels (`losses.symmetric_anchored_loss`);
* L = lambda_mlm * (MLM(E_s) + MLM(E_l)) + (L_sent + L_label) / 2, MLM with BERT's 15% 80/10/10
  masking (`masking.bert_mask_tokens`), markers never masked.

A batch holds `relations_per_batch` relations (without replacement) x `sentences_per_relation`
sentences of each, sampled with the seed `(seed, step)` (`sacon_batches`), so a killed run resumes
exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tkre_jax.data import episode_sampler as episodes_lib
from tkre_jax.data import pipeline
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.model.tasks import SaconModel
from tkre_jax.tasks import losses, masking
from tkre_jax.train import runtime

LABEL_KEYS = ("label_input_ids", "label_attention_mask", "label_span_ids")
SENTENCE_KEYS = ("input_ids", "attention_mask", "span_ids", "subj_pos", "obj_pos")
TOWER_PARAMS = (("encoder", "label_encoder"), ("mlm_head", "label_mlm_head"))


def builder(enc_config: EncoderConfig, seed: int, *, shared_label_encoder: bool,
            temperature: float):
  """`() -> SaconModel` with random initialisation from `seed` (for `runtime.create_sharded`)."""
  return lambda: SaconModel(enc_config, shared_label_encoder=shared_label_encoder,
                            temperature=temperature, rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------------------------ data

def blank_entities(instances: Sequence[RelationInstance], prob: float, seed: int,
                   blank_word: str) -> tuple[list[RelationInstance], dict[str, int]]:
  """Replaces each entity mention by the single word `blank_word` with probability `prob`.

  The draws are `numpy.random.default_rng(seed).random((n, 2)) < prob` (column 0 the subject,
  1 the object, row i instance i), so the same instances and seed give the same blanking anywhere.

  Returns:
    `(instances, counts)`: the new instances (spans moved to the shortened token lists) and the
    counts `subject_blanked`, `object_blanked`, `instances`.

  (`RelationInstance` guarantees the two spans do not overlap.)
  """
  draws = np.random.default_rng(seed).random((len(instances), 2)) < prob
  out = []
  for i, inst in enumerate(instances):
    tokens: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, (a, b), blank in sorted([("subj", inst.subj, draws[i, 0]),
                                       ("obj", inst.obj, draws[i, 1])], key=lambda t: t[1][0]):
      tokens += inst.tokens[pos:a]
      start = len(tokens)
      tokens += [blank_word] if blank else list(inst.tokens[a:b])
      spans[name] = (start, len(tokens))
      pos = b
    tokens += inst.tokens[pos:]
    out.append(dataclasses.replace(inst, tokens=tuple(tokens), subj=spans["subj"],
                                   obj=spans["obj"]))
  return out, {"instances": len(instances), "subject_blanked": int(draws[:, 0].sum()),
               "object_blanked": int(draws[:, 1].sum())}


def label_texts(relations: Sequence[str],
                schema: Optional[Mapping[str, tuple[str, str]]]) -> tuple[list[tuple[str, str]], int]:
  """`(name, description)` of each relation from `schema` (`readers.read_pid2name`); a relation
  missing from it gets its own words and no description. Returns the pairs and how many were
  missing."""
  out, missing = [], 0
  for r in relations:
    if schema and r in schema:
      out.append(schema[r])
    else:
      missing += 1
      out.append((r.replace("_", " ").replace(":", " "), ""))
  return out, missing


def label_features(tokenizer, texts: Sequence[tuple[str, str]], max_len: int) -> dict[str, np.ndarray]:
  """Tokenizes label texts as `[CLS] name [SEP] description [SEP]` (`[CLS] name [SEP]` without a
  description), the description truncated to `max_len` tokens in all.

  Returns:
    `label_input_ids`, `label_attention_mask`, `label_span_ids` int32[labels, max_len]; span id 1
    (maskable) on real non-special tokens, 0 elsewhere.
  """
  n = len(texts)
  ids = np.full((n, max_len), tokenizer.pad_token_id or 0, np.int32)
  mask = np.zeros((n, max_len), np.int32)
  span = np.zeros((n, max_len), np.int32)
  for i, (name, desc) in enumerate(texts):
    enc = tokenizer(name, desc, truncation="only_second", max_length=max_len,
                    return_special_tokens_mask=True) if desc else tokenizer(
                        name, truncation=True, max_length=max_len, return_special_tokens_mask=True)
    row = np.asarray(enc["input_ids"], np.int32)
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
    span[i, :len(row)] = 1 - np.asarray(enc["special_tokens_mask"], np.int32)
  return {"label_input_ids": ids, "label_attention_mask": mask, "label_span_ids": span}


def sacon_batches(arrays: Mapping[str, np.ndarray], label_arrays: Mapping[str, np.ndarray],
                  pool: episodes_lib.Pool, *, relations_per_batch: int,
                  sentences_per_relation: int, seed: int, start_step: int, rows: int,
                  label_rows: int, length_multiple: int) -> Iterator[dict]:
  """Endless training batches; the batch of step s is drawn with `default_rng(SeedSequence([seed,
  s]))`: `relations_per_batch` relations without replacement, then `sentences_per_relation` of
  each relation's sentences without replacement.

  Args:
    arrays: the featurized pool (rows = pool positions): `SENTENCE_KEYS`.
    label_arrays: `LABEL_KEYS`, one row per pool relation.
    pool: the sentences.
    relations_per_batch, sentences_per_relation: the batch shape (U labels x M sentences).
    seed, start_step: see above.
    rows, label_rows: batch rows (>= U * M) and label rows (>= U); the extra rows are weight-0
      padding (a multiple of the mesh's batch shards).
    length_multiple: both sequence axes are cut to a multiple of it (0: never cut).

  Yields:
    `SENTENCE_KEYS` [rows, L] / [rows]; `label` int32[rows] (the sentence's label row); `weight`
    float32[rows]; `LABEL_KEYS` int32[label_rows, L_label]; `label_weight` float32[label_rows].

  Raises:
    DataError: fewer relations than `relations_per_batch`, or a relation with fewer sentences than
      `sentences_per_relation` (named).
  """
  u, m = relations_per_batch, sentences_per_relation
  sizes = np.diff(pool.offsets)
  if len(pool.relations) < u:
    raise DataError(f"config.sacon.relations_per_batch={u} but the data has "
                    f"{len(pool.relations)} relations")
  short = [f"{pool.relations[r]!r} ({int(sizes[r])})" for r in range(len(sizes)) if sizes[r] < m]
  if short:
    raise DataError(f"config.sacon.sentences_per_relation={m} needs that many sentences per "
                    "relation; too few in " + ", ".join(short))
  if rows < u * m or label_rows < u:
    raise ValueError(f"{rows} rows / {label_rows} label rows cannot hold {u} x {m} sentences")
  step = start_step
  while True:
    rng = np.random.default_rng(np.random.SeedSequence([seed, step]))
    rels = rng.choice(len(pool.relations), u, replace=False)
    idx = np.concatenate([pool.offsets[r] + rng.choice(int(sizes[r]), m, replace=False)
                          for r in rels])
    pad, lpad = rows - u * m, label_rows - u
    batch = {k: np.concatenate([arrays[k][idx],
                                np.zeros((pad,) + arrays[k].shape[1:], arrays[k].dtype)])
             for k in SENTENCE_KEYS}
    batch["attention_mask"][u * m:, 0] = 1
    batch["label"] = np.concatenate([np.repeat(np.arange(u), m), np.zeros(pad)]).astype(np.int32)
    batch["weight"] = np.concatenate([np.ones(u * m), np.zeros(pad)]).astype(np.float32)
    for k in LABEL_KEYS:
      a = label_arrays[k]
      batch[k] = np.concatenate([a[rels], np.zeros((lpad,) + a.shape[1:], a.dtype)])
    batch["label_attention_mask"][u:, 0] = 1
    batch["label_weight"] = np.concatenate([np.ones(u), np.zeros(lpad)]).astype(np.float32)
    if length_multiple:
      L = pipeline.bucket_length(batch["attention_mask"], length_multiple,
                                 batch["input_ids"].shape[1])
      for k in ("input_ids", "attention_mask", "span_ids"):
        batch[k] = batch[k][:, :L]
      L = pipeline.bucket_length(batch["label_attention_mask"], length_multiple,
                                 batch["label_input_ids"].shape[1])
      for k in LABEL_KEYS:
        batch[k] = batch[k][:, :L]
    yield batch
    step += 1


# ------------------------------------------------------------------------------------ loss

@dataclasses.dataclass(frozen=True)
class SaconStepConfig:
  """Static settings of the sacon step.

  Attributes:
    mask_token_id, vocab_size: the tokenizer's mask id and the encoder's vocabulary size.
    max_predictions, label_max_predictions: MLM prediction slots per sentence / label row.
    mlm_prob: BERT selection probability (15%).
    lambda_mlm: weight of the two MLM terms.
    freeze_encoders: the MLM-head warm-up: encoders run without dropout under `stop_gradient`
      and the loss is the MLM terms only.
  """
  mask_token_id: int
  vocab_size: int
  max_predictions: int = 20
  label_max_predictions: int = 12
  mlm_prob: float = 0.15
  lambda_mlm: float = 1.0
  freeze_encoders: bool = False


def _mlm(model, encoder, head, hidden, masked, row_weight, psum):
  w = masked["mlm_weights"] * row_weight[:, None]
  logits = model.mlm_logits(encoder, head, hidden, masked["mlm_positions"])
  s, _ = losses.masked_lm_loss(logits, masked["mlm_labels"], w)
  correct = jnp.sum(jnp.where(losses.top1_correct(logits, masked["mlm_labels"]), w, 0.0))
  norm = jnp.maximum(psum(jnp.sum(w)), 1.0)
  return s / norm, correct / norm


def make_loss_fn(cfg: SaconStepConfig):
  """`graphdef -> LossFn` (`tkre_jax.train.step`) of a `SaconModel`:
  `lambda_mlm * (L_mlm_sentence + L_mlm_label) + (L_sent + L_label) / 2` (the module docstring),
  each term normalised over the global batch. Metrics: `mlm_loss`, `label_mlm_loss`,
  `mlm_accuracy`, `sent_loss`, `label_loss`, `sent_accuracy` (sentences whose nearest label is
  theirs), `label_accuracy`, `logit_scale`."""

  def for_graph(graphdef):
    def loss_fn(params, batch, rng, psum):
      k_ms, k_ml, k_ds, k_dl = jax.random.split(rng, 4)
      model = nnx.merge(graphdef, params)
      w = batch["weight"].astype(jnp.float32)
      v = batch["label_weight"].astype(jnp.float32)
      ms = masking.bert_mask_tokens(k_ms, batch["input_ids"], batch["span_ids"],
                                    mask_token_id=cfg.mask_token_id, vocab_size=cfg.vocab_size,
                                    max_predictions=cfg.max_predictions, prob=cfg.mlm_prob)
      ml = masking.bert_mask_tokens(k_ml, batch["label_input_ids"], batch["label_span_ids"],
                                    mask_token_id=cfg.mask_token_id, vocab_size=cfg.vocab_size,
                                    max_predictions=cfg.label_max_predictions, prob=cfg.mlm_prob)
      label_encoder, label_head = model.label_tower()
      if cfg.freeze_encoders:
        hs = jax.lax.stop_gradient(model.encoder(ms["masked_input_ids"], batch["attention_mask"]))
        hl = jax.lax.stop_gradient(label_encoder(ml["masked_input_ids"],
                                                 batch["label_attention_mask"]))
      else:
        hs = model.encoder(ms["masked_input_ids"], batch["attention_mask"], dropout_rng=k_ds)
        hl = label_encoder(ml["masked_input_ids"], batch["label_attention_mask"], dropout_rng=k_dl)
      mlm_s, acc_s = _mlm(model, model.encoder, model.mlm_head, hs, ms, w, psum)
      mlm_l, acc_l = _mlm(model, label_encoder, label_head, hl, ml, v, psum)
      metrics = {"mlm_loss": mlm_s, "label_mlm_loss": mlm_l, "mlm_accuracy": acc_s,
                 "label_mlm_accuracy": acc_l}
      if cfg.freeze_encoders:
        return mlm_s + mlm_l, metrics
      scale = model.logit_scale()
      c = losses.symmetric_anchored_loss(
          model.sentence_embedding(hs, batch["subj_pos"], batch["obj_pos"]),
          model.label_embedding(hl, batch["label_attention_mask"]), batch["label"], w, v, scale)
      n_s = jnp.maximum(jax.lax.stop_gradient(psum(c["sent_weight"])), 1.0)
      n_l = jnp.maximum(jax.lax.stop_gradient(psum(c["label_weight"])), 1.0)
      l_sent, l_label = c["sent_sum"] / n_s, c["label_sum"] / n_l
      total = cfg.lambda_mlm * (mlm_s + mlm_l) + 0.5 * (l_sent + l_label)
      return total, {**metrics, "sent_loss": l_sent, "label_loss": l_label,
                     "sent_accuracy": c["sent_correct"] / n_s,
                     "label_accuracy": c["label_correct"] / n_l, "logit_scale": scale}
    return loss_fn

  return for_graph


# ------------------------------------------------------------------------------------ after pre-training

def label_tower_params(tree: Mapping) -> Mapping:
  """The label encoder's parameters in a sacon `best/` tree: `label_encoder`, or `encoder` when the
  run shared one encoder (`config.sacon.label_encoder=shared`).

  Raises:
    KeyError: the tree has neither (not a sacon checkpoint).
  """
  if "label_encoder" in tree:
    return tree["label_encoder"]
  if "encoder" in tree and "logit_scale" in tree:
    return tree["encoder"]
  raise KeyError(f"no label encoder in the checkpoint (keys: {sorted(tree)}); "
                 "head_init=labels and label prototypes need a sacon workdir")


def embed_labels(enc_config: EncoderConfig, encoder_params: Mapping, tokenizer,
                 texts: Sequence[tuple[str, str]], max_len: int = 64) -> np.ndarray:
  """SaCon label embeddings `normalize([h_CLS; masked mean])` of `(name, description)` texts, on
  the host's default device (tens of labels; no dropout).

  Returns:
    float32[len(texts), 2 * hidden_size], unit rows.
  """
  from tkre_jax.model.encoder import Encoder  # pylint: disable=import-outside-toplevel
  f = label_features(tokenizer, texts, max_len)
  enc = Encoder(enc_config, rngs=nnx.Rngs(0))
  params = nnx.state(enc, nnx.Param)
  runtime.put_subtree(params, (), encoder_params, None)  # checkpoint keys ("0") -> layer indices
  nnx.update(enc, params)
  graphdef, state = nnx.split(enc)

  @jax.jit
  def run(state, ids, mask):
    hidden = nnx.merge(graphdef, state)(ids, mask)
    return SaconModel.label_embedding(hidden, mask)

  return np.asarray(run(state, f["label_input_ids"], f["label_attention_mask"]), np.float32)


def head_from_labels(label_emb: np.ndarray, hidden_kernel: np.ndarray, hidden_bias: np.ndarray,
                     column_norm: float) -> np.ndarray:
  """Output weights of `heads.RelationClassifier` from label embeddings (`head_init=labels`).

  The classifier scores `W2^T relu(W1 x + b1)`; the label embeddings live in the input space of
  `x` (2H), the output columns in the hidden space (H). Each label is projected by the head's own
  first layer and scaled to `column_norm` (the random columns' norm), so that at initialisation
  class c's logit is a similarity between the sentence's and the label's projections, as SaCon's
  pre-training scored them:

    W2[:, c] = column_norm * normalize(relu(l_c @ W1 + b1))

  Args:
    label_emb: float32[C, 2H] unit label embeddings (`embed_labels`).
    hidden_kernel, hidden_bias: W1 float[2H, H] and b1 float[H].
    column_norm: the L2 norm of each column.

  Returns:
    float32[H, C].
  """
  proj = np.maximum(label_emb @ np.asarray(hidden_kernel, np.float32) +
                    np.asarray(hidden_bias, np.float32), 0.0)
  norms = np.maximum(np.linalg.norm(proj, axis=1, keepdims=True), 1e-6)
  return (column_norm * proj / norms).T.astype(np.float32)
