"""The episodes stage: FewRel's N-way K-shot evaluation of relations never trained on.

`--stage=episodes --workdir=DIR [--init_from=STAGE_WORKDIR]`: the encoder of any stage's workdir
(mslm, scl, finetune, episodic) or, without `--init_from`, the raw HF encoder. Per setting of
`config.episodes.settings` (N-K pairs; K = 0 is zero-shot), `num_episodes` episodes of
`config.episodes.eval_file` (FewRel format) are sampled with `config.episodes.seed` and written
to `DIR/episodes.json` (pool positions). Every instance any episode uses is embedded ONCE
(batched, sharded forward on the mesh), then every episode is scored from that float32
[num_instances, 2H] matrix by prototypes (`eval.prototypes`): no gradient step on the evaluation
relations. Zero-shot and description / mixed prototypes embed each relation's
`description_instance` (name and description from `config.data.schema_file`, pid2name.json), or,
with `config.episodes.descriptions=label_encoder`, take the SaCon label encoder's embedding of
"name [SEP] description" (a sacon workdir; instance vectors L2-normalised): label-fused prototypes
(`prototype=mixed`) and zero-shot from the label encoder.

Writes `summary.json` (per setting: accuracy mean and 95% confidence interval over episodes, in
percent), `episodes.json`, `results.md` and `episode_accuracy.json` (setting -> the accuracy of
each episode, in the order of `episodes.json`: two models scored on the same list compare episode by
episode).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import ml_collections
import numpy as np

from tkre_jax import config as config_lib
from tkre_jax.data import episode_sampler as episodes_lib
from tkre_jax.data import features as features_lib
from tkre_jax.data import preparation, readers
from tkre_jax.eval import prototypes as proto_lib
from tkre_jax.llm.cache import atomic_write_text
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.parallel.mesh import is_primary
from tkre_jax.tasks import prototypical as prototypical_lib
from tkre_jax.tasks import label_contrastive as sacon_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import runtime
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)


def label_descriptions(config: ml_collections.ConfigDict, init_from: str, info: dict,
                       relations, schema) -> tuple[np.ndarray, dict]:
  """Unit SaCon label embeddings of the relations' "name [SEP] description" texts
  (`config.episodes.descriptions=label_encoder`), from the label encoder of
  `config.episodes.label_encoder_from`, else `init_from`.

  Returns:
    `(float32[len(relations), 2H], report)`.

  Raises:
    ValueError: neither is set.
    FileNotFoundError, KeyError: no checkpoint there, or no label encoder in it.
    workdir.MismatchError: it was pre-trained on an evaluated relation.
  """
  source = config.episodes.label_encoder_from or init_from
  if not source:
    raise ValueError("config.episodes.descriptions=label_encoder needs a sacon workdir: "
                     "--config.episodes.label_encoder_from or --init_from")
  src = pathlib.Path(source)
  theirs = workdir_lib.read(src)
  workdir_lib.check_compatible(info, theirs, str(src), what="config.episodes.descriptions",
                               labels=False)
  tree, where = ckpt_lib.restore_param_tree(src)
  texts, missing = sacon_lib.label_texts(relations, schema)
  emb = sacon_lib.embed_labels(workdir_lib.encoder_config(theirs, "float32"),
                               sacon_lib.label_tower_params(tree), workdir_lib.load_tokenizer(src),
                               texts, int(theirs["config"]["sacon"]["label_max_len"]))
  return emb, {"from": where, "relations": len(relations), "missing_from_schema": missing}


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mesh,
        init_from: str = "", **_) -> dict:
  """Evaluates the encoder of `init_from` (or the raw encoder) on episodes; returns the summary.

  Raises:
    FileNotFoundError: the evaluation file, a schema needed for zero-shot, or `init_from`'s
      checkpoint is missing.
    DataError: bad records, too few relations / instances for a setting, a relation without a name.
    ValueError: a malformed setting or option.
  """
  del stage
  t0 = time.time()
  ep = config.episodes
  rules = sharding_lib.RULES[config.mesh.rules]
  specs = episodes_lib.parse_settings(ep.settings, ep.q_query, ep.nota_rate)
  eval_path = config_lib.resolve_path(config, ep.eval_file)
  if not eval_path.is_file():
    raise FileNotFoundError(f"episode evaluation file not found: {eval_path} "
                            "(--config.episodes.eval_file, FewRel format)")
  pool = episodes_lib.flatten(readers.read_fewrel(eval_path))
  need_desc = ep.prototype != "support" or any(s.k_shot == 0 for s in specs)
  schema = preparation.read_schema(config) if need_desc else None
  if need_desc and schema is None:
    log.warning("episodes: no relation schema (%s); zero-shot prototypes use the relation ids' "
                "words", config.data.schema_file or "config.data.schema_file=''")
  episodes = [episodes_lib.sample_episodes(pool, s, ep.num_episodes, seed=ep.seed + i)
              for i, s in enumerate(specs)]
  workdir.mkdir(parents=True, exist_ok=True)
  if is_primary():
    episodes_lib.write_episodes(workdir / "episodes.json", str(eval_path), pool.relations,
                                episodes, ep.seed)

  # The label map is the evaluated relations: weights pre-trained on one of them are refused.
  loaded = prototypical_lib.load_encoder(config, init_from, mesh, rules, stage="episodes",
                                         label_map={r: i for i, r in enumerate(pool.relations)})
  used = np.unique(np.concatenate([e.used() for e in episodes]))
  instances = [pool.instances[int(i)] for i in used]
  fcfg = prototypical_lib.feature_config(config, instances)
  featurizer = features_lib.Featurizer(loaded.tokenizer, {}, fcfg)
  t_embed = time.time()
  arrays = featurizer(instances, allow_unknown_labels=True)
  step = prototypical_lib.compiled_embed_step(loaded.model, mesh)
  batch_size = prototypical_lib.round_up(ep.batch_size, mesh)
  vectors = prototypical_lib.embed(step, loaded.model.params, arrays, batch_size, mesh,
                               ep.length_multiple, desc="embed episodes")
  emb = np.zeros((len(pool.instances), vectors.shape[1]), np.float32)
  emb[used] = vectors
  desc_emb, label_info = None, None
  if need_desc and ep.descriptions == "label_encoder":
    desc_emb, label_info = label_descriptions(config, init_from, loaded.info, pool.relations,
                                              schema)
    # SaCon scores cosine similarities: unit instance vectors (euclidean = 2 - 2 cos)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-6)
  elif need_desc:
    desc_inst = episodes_lib.description_instances(pool.relations, schema)
    desc_emb = prototypical_lib.embed(step, loaded.model.params,
                                  featurizer(desc_inst, allow_unknown_labels=True), batch_size,
                                  mesh, ep.length_multiple, desc="embed descriptions")
  embed_seconds = time.time() - t_embed
  log.info("episodes: embedded %d instances (%d relations) in %.0f s", len(used),
           len(pool.relations), embed_seconds)

  results, per_episode = {}, {}
  for spec, eps in zip(specs, episodes):
    t = time.time()
    acc = proto_lib.episode_accuracy(
        emb, eps.support, eps.query, eps.query_labels,
        descriptions=None if desc_emb is None else desc_emb[eps.relations],
        metric=ep.metric, mode=ep.prototype if spec.k_shot else "description",
        description_weight=ep.description_weight, nota_threshold=ep.nota_threshold)
    mean, half = proto_lib.mean_ci95(acc)
    per_episode[spec.name] = [round(float(a), 6) for a in acc]
    results[spec.name] = {"n_way": spec.n_way, "k_shot": spec.k_shot, "q_query": spec.q_query,
                          "nota_rate": spec.nota_rate, "episodes": len(eps),
                          "accuracy": round(100 * mean, 2), "ci95": round(100 * half, 2),
                          "score_seconds": round(time.time() - t, 2)}
    log.info("episodes: %s: accuracy %.2f +- %.2f (95%% CI, %d episodes)", spec.name, 100 * mean,
             100 * half, len(eps))
  summary = {"stage": "episodes", "encoder_from": loaded.source,
             "init_from": str(pathlib.Path(init_from).resolve()) if init_from else "",
             "eval_file": str(eval_path), "relations": len(pool.relations),
             "instances_embedded": int(len(used)), "metric": ep.metric, "prototype": ep.prototype,
             "nota_threshold": ep.nota_threshold, "seed": ep.seed, "metrics": results,
             "descriptions": ep.descriptions if need_desc else "",
             **({"label_encoder": label_info} if label_info else {}),
             "mesh": dict(mesh.shape),
             "seconds": {"embed": round(embed_seconds, 1), "total": round(time.time() - t0, 1)}}
  if is_primary():
    lines = [f"# Episodes: {loaded.source}\n", "| setting | accuracy (%) | 95% CI | episodes |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['accuracy']:.2f} | +- {v['ci95']:.2f} | {v['episodes']} |"
              for k, v in results.items()]
    atomic_write_text(workdir / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(workdir / "episode_accuracy.json", json.dumps(per_episode))
  runtime.write_summary(workdir, summary)
  return summary
