"""The episodic protocol, the library part: the marker-state encoder, its prototypical loss and
episode batches (training), encoder loading and batched embedding (evaluation). The Python API
on top, `PrototypeClassifier`, is `tkre_jax.infer.prototype_classifier`.

Representation of an instance (`model.tasks.MarkerEncoder`): the subject-start and object-start
marker states concatenated, float32[2 * hidden], from any stage's checkpoint (mslm, scl, finetune,
episodic: their `encoder` parameters) or the raw HF encoder. Instances are marked by the same
featurizer as fine-tuning (`data.features`, untyped markers unless the instances carry types,
`data.markers`). The stages are `tkre_jax/stages/episodic.py` and `tkre_jax/stages/episodes.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from tkre_jax.data import episode_sampler as episodes_lib
from tkre_jax.data import features as features_lib
from tkre_jax.data import markers, pipeline
from tkre_jax.data.schema import RelationInstance
from tkre_jax.model import hub
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.model.tasks import MarkerEncoder
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.tasks import losses
from tkre_jax.train import loading, runtime
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)


def builder(enc_config: EncoderConfig, seed: int):
  """`() -> MarkerEncoder` with random initialisation from `seed` (for `runtime.create_sharded`)."""
  return lambda: MarkerEncoder(enc_config, rngs=nnx.Rngs(seed))


def make_loss_fn(n_way: int, metric: str):
  """`graphdef -> LossFn` (`tkre_jax.train.step`): `losses.prototypical_loss` of the episode in the
  batch, normalised by its number of queries; metrics `accuracy` (query accuracy of the episode)
  and `weight` (queries)."""

  def for_graph(graphdef):
    def loss_fn(params, batch, rng, psum):
      emb = nnx.merge(graphdef, params)(batch, dropout_rng=rng)
      s, w, correct = losses.prototypical_loss(emb, batch["label"], batch["is_query"],
                                               batch["weight"], n_way, metric)
      w_all = jax.lax.stop_gradient(psum(w))
      return s / jax.numpy.maximum(w_all, 1.0), {"accuracy": correct / jax.numpy.maximum(w_all, 1.0),
                                                 "weight": w}
    return loss_fn

  return for_graph


def compiled_embed_step(model: runtime.ShardedModel, mesh) -> runtime.CompiledStep:
  """`(params, batch) -> float32[batch, 2H]` marker representations without dropout, compiled with
  the model's shardings; the output is replicated so every host can read it."""

  def embed_step(params, batch):
    return nnx.merge(model.graphdef, params)(batch)

  return runtime.CompiledStep(embed_step, "embed_step",
                              in_shardings=(model.shardings, sharding_lib.batch_sharding(mesh)),
                              out_shardings=sharding_lib.replicated(mesh))


def embed(step, params, arrays: Mapping[str, np.ndarray], batch_size: int, mesh,
          length_multiple: int, desc: str = "embed") -> np.ndarray:
  """float32[n, 2H] representations of the featurized rows of `arrays`, in row order (batched,
  shortest first, on the mesh: `finetune.predict` with the embedding step)."""
  return classifier_lib.predict(step, params, arrays, batch_size, mesh, length_multiple, desc=desc)


def round_up(n: int, mesh) -> int:
  """`n` rounded up to a multiple of the mesh's batch shards (data x fsdp)."""
  shards = int(np.prod([mesh.shape[a] for a in sharding_lib.batch_sharding(mesh).spec[0]]))
  return -(-n // shards) * shards


def feature_config(config: ml_collections.ConfigDict,
                   instances: Sequence[RelationInstance]) -> features_lib.FeatureConfig:
  """The featurizer settings: `config.data.max_seq_len`, and typed markers only when configured and
  the instances carry types (FewRel: untyped; `data.markers.use_typed_markers`)."""
  return features_lib.FeatureConfig(
      max_seq_len=config.data.max_seq_len,
      typed_markers=markers.use_typed_markers(config.data.typed_markers, instances))


# ------------------------------------------------------------------------------------ training

def episode_batches(arrays: Mapping[str, np.ndarray], pool: episodes_lib.Pool,
                    spec: episodes_lib.EpisodeSpec, *, seed: int, start_step: int, rows: int,
                    length_multiple: int, max_seq_len: int) -> Iterator[dict]:
  """Endless training batches, one episode each; the episode of step s is sampled with the seed
  `(seed, s)`, so a resumed run sees the batches an uninterrupted one would.

  Args:
    arrays: the featurized pool (rows = pool positions).
    pool: the training instances.
    spec: the training episode shape (no NOTA).
    seed, start_step: see above.
    rows: batch rows, >= N * (K + Q); rows past the episode are weight-0 padding.
    length_multiple: the sequence axis is cut to a multiple of it (0: `max_seq_len`).
    max_seq_len: the featurized length.

  Yields:
    `input_ids`, `attention_mask`, `span_ids` int32[rows, L]; `subj_pos`, `obj_pos`, `label` (the
    episode label), `is_query` int32[rows]; `weight` float32[rows]. Support rows come first.
  """
  n, k, q = spec.n_way, spec.k_shot, spec.q_query
  used = n * (k + q)
  if rows < used:
    raise ValueError(f"{rows} batch rows cannot hold a {spec.name} episode with {q} queries "
                     f"({used} rows)")
  step = start_step
  while True:
    ep = episodes_lib.sample_episodes(pool, spec, 1, seed=np.random.SeedSequence([seed, step])
                                      .generate_state(1)[0].item())
    idx = np.concatenate([ep.support[0].ravel(), ep.query[0].ravel()])
    label = np.concatenate([np.repeat(np.arange(n), k), ep.query_labels[0]]).astype(np.int32)
    is_query = np.concatenate([np.zeros(n * k, np.int32), np.ones(n * q, np.int32)])
    pad = rows - used
    batch = {key: np.concatenate([arrays[key][idx], np.zeros((pad,) + arrays[key].shape[1:],
                                                             arrays[key].dtype)])
             for key in ("input_ids", "attention_mask", "span_ids", "subj_pos", "obj_pos")}
    batch["attention_mask"][used:, 0] = 1
    batch["label"] = np.concatenate([label, np.zeros(pad, np.int32)])
    batch["is_query"] = np.concatenate([is_query, np.zeros(pad, np.int32)])
    batch["weight"] = np.concatenate([np.ones(used, np.float32), np.zeros(pad, np.float32)])
    if length_multiple:
      L = pipeline.bucket_length(batch["attention_mask"], length_multiple, max_seq_len)
      for key in ("input_ids", "attention_mask", "span_ids"):
        batch[key] = batch[key][:, :L]
    yield batch
    step += 1


# ------------------------------------------------------------------------------------ loading

@dataclasses.dataclass
class LoadedEncoder:
  """A marker-state encoder with its weights, on a mesh.

  Attributes:
    model: graph, parameters (loaded) and shardings.
    enc_config: the encoder shape.
    tokenizer: the tokenizer it was trained with.
    source: where the weights came from; info: the `run.json` written for this run.
  """
  model: runtime.ShardedModel
  enc_config: EncoderConfig
  tokenizer: Any
  source: str
  info: dict


def load_encoder(config: ml_collections.ConfigDict, init_from: str, mesh, rules, *,
                 stage: str = "episodes", label_map: Optional[Mapping[str, int]] = None
                 ) -> LoadedEncoder:
  """The marker-state encoder from a stage workdir (`init_from`: any of mslm, scl, finetune,
  episodic; its `encoder` parameters, tokenizer and encoder shape from its own files) or, without
  it, from the HF checkpoint of `config.model.hf_dir`.

  Raises:
    FileNotFoundError: `init_from` has no checkpoint or no `run.json`.
    workdir.MismatchError: its encoder does not fit.
  """
  if init_from:
    src = pathlib.Path(init_from)
    theirs = workdir_lib.read(src)
    enc_cfg = workdir_lib.encoder_config(theirs, config.model.dtype)
    tokenizer = workdir_lib.load_tokenizer(src)
  else:
    enc_cfg = loading.encoder_config(config)
    tokenizer = hub.load_tokenizer(hub.model_dir(config.model.hf_dir))
  info = workdir_lib.describe(stage, config, label_map=dict(label_map or {}), enc_config=enc_cfg,
                              tokenizer=tokenizer, prepared_dir="", init_from=init_from)
  model = runtime.create_sharded(builder(enc_cfg, config.seed), mesh, rules)
  source, _ = loading.init_weights(config, model, init_from, info, optional=())
  return LoadedEncoder(model, enc_cfg, tokenizer, source, info)
