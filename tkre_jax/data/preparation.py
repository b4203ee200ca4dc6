"""Raw data -> a prepared directory (a TFDS dataset + `meta.json`, see `tkre_jax.data.dataset`): the
library of the prepare stage (`tkre_jax.stages.prepare`).

Splits written: `train` (K per relation), `dev`, `test` (when the data has one), and `corpus`, the
knowledge-guided pre-training corpus (K-shot training instances + EDKG explanations + SCDG synthetic
instances, see `tkre_jax.data.corpus`; its counts and rejects are in `meta.json["corpus"]`) unless
`config.data.corpus` is 'off' (or 'auto' and the LLM files are absent). The label map is
built from the training relations in file order; dev/test relations outside it are an error.

With `config.data.augment_k > 0`, `train` is the K-shot set followed by up to `augment_k` SCDG
instances per relation (`tkre_jax.data.augment`; counts in `meta.json["augment"]` and
`meta["splits"]["train"]["by_kind"]`); dev and test are never augmented, and the corpus is built
from the gold rows only. `unlabelled` (MSLM head warm-up text) is written when
`config.data.unlabelled_file` exists. Every row's `source` names its kind when it is not gold
(`scdg:<file>:<record>`, `edkg:...`, `unlabelled:...`). One marker format for all rows
(`tkre_jax.data.markers`): typed only when the gold training rows have types.

Everything is read, checked and featurized before anything is created; the target folder must be
absent, empty, or a prepared directory (which is then replaced atomically), see
`dataset.check_target`.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Mapping, Optional

import ml_collections

from tkre_jax import config as config_lib
from tkre_jax.data import augment as augment_lib
from tkre_jax.data import corpus as corpus_lib
from tkre_jax.data import inverses as inverses_lib
from tkre_jax.data import dataset, markers, readers, splits
from tkre_jax.data import features as features_lib
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.model import hub

log = logging.getLogger(__name__)


def model_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  """The HF checkpoint directory of the configured encoder (`config.model.hf_dir`)."""
  return hub.model_dir(config.model.hf_dir)


load_tokenizer = hub.load_tokenizer


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_file():
    raise FileNotFoundError(
        f"{what} not found at {path}. Pass --config.data.data_dir=DIR (or set TKRE_DATA_DIR) to a "
        "folder holding it. FewRel 1.0 (val_wiki.json, pid2name.json) is published at "
        "github.com/thunlp/FewRel (data/); val_wiki_split.json is this project's canonical split: "
        "{\"train_pool\": [0, 32], \"dev\": [32, 100], \"test\": [100, 700]} by position per relation.")
  return path


def load_splits(config: ml_collections.ConfigDict) -> dict[str, list[RelationInstance]]:
  """Reads the configured data set and returns {"train", "dev", "test"} instance lists.

  Raises:
    FileNotFoundError: a configured file is missing (the message says where to get it).
    DataError: bad records (named by file and record).
  """
  d = config.data
  if d.dataset == "fewrel":
    data = readers.read_fewrel(_require(config_lib.resolve_path(config, d.fewrel_file), "FewRel file"))
    split_file = _require(config_lib.resolve_path(config, d.split_file), "FewRel split file")
    return splits.fewrel_canonical_split(data, split_file, d.k)
  out = {}
  train = readers.read_tacred(_require(config_lib.resolve_path(config, d.train_file), "train file"))
  out["train"] = splits.sample_k_shot(train, d.k, config.seed) if d.sample_train else train
  for name in ("dev", "test"):
    f = getattr(d, f"{name}_file")
    out[name] = readers.read_tacred(_require(config_lib.resolve_path(config, f), f"{name} file")) if f else []
  return out


def read_schema(config: ml_collections.ConfigDict) -> Optional[dict[str, tuple[str, str]]]:
  """Relation id -> (name, description) from `config.data.schema_file`, or None."""
  if not config.data.schema_file:
    return None
  path = config_lib.resolve_path(config, config.data.schema_file)
  return readers.read_pid2name(path) if path.is_file() else None


def relation_names(label_map: Mapping[str, int],
                   schema: Optional[Mapping[str, tuple[str, str]]]) -> dict[str, str]:
  """Relation id -> its human-readable name from the schema (e.g. "P26" -> "spouse"), for the
  relations of `label_map` the schema names; {} without a schema."""
  return {r: schema[r][0] for r in label_map
          if schema and r in schema and schema[r][0] and schema[r][0] != r}


def names_of(meta: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, str]:
  """The relation names of a prepared dataset: `meta.json`'s `relation_names` (written by prepare),
  else (data prepared before they were recorded) from the config's schema file when it exists."""
  if "relation_names" in meta:
    return dict(meta["relation_names"])
  return relation_names(meta["label_map"], read_schema(config))


def build_label_map(train: list[RelationInstance]) -> dict[str, int]:
  labels: dict[str, int] = {}
  for inst in train:
    labels.setdefault(inst.relation, len(labels))
  return labels


def run_prepare(config: ml_collections.ConfigDict, out_dir: pathlib.Path,
                extra_splits: Optional[dict[str, list[RelationInstance]]] = None,
                overwrite: bool = True) -> dict:
  """Featurizes the configured splits (and `extra_splits`, e.g. a pre-training corpus) into
  `out_dir` (atomically).

  Returns:
    The meta dict written to `out_dir/meta.json`, with each split's `num_examples` (held on disk by
    TFDS's split info) added.

  Raises:
    ForeignFilesError: `out_dir` holds files prepare did not write (checked first; nothing changes).
    FileNotFoundError, DataError, ValueError: missing or bad inputs (before anything is created).
  """
  t0 = time.time()
  dataset.check_target(out_dir)
  data = load_splits(config)
  if extra_splits:
    data.update(extra_splits)
  typed = markers.use_typed_markers(config.data.typed_markers, data["train"])
  corpus_report = None
  if corpus_lib.CORPUS_SPLIT not in data:
    corpus, corpus_report = corpus_lib.corpus_from_config(config, data, typed=typed)
    if corpus is not None:
      data[corpus_lib.CORPUS_SPLIT] = corpus
  label_map = build_label_map(data["train"])
  mdir = model_dir(config)
  tokenizer = load_tokenizer(mdir)
  fcfg = features_lib.FeatureConfig(max_seq_len=config.data.max_seq_len, typed_markers=typed)
  featurizer = features_lib.Featurizer(tokenizer, label_map, fcfg)
  eval_instances = list(data.get("dev", [])) + list(data.get("test", []))
  augment_report = _augment(config, data, eval_instances, featurizer, typed)
  inverse_report = _inverses(config, data, eval_instances, label_map)
  unlabelled_report = _unlabelled(config, data, eval_instances, label_map)
  featurized = {}
  for name, instances in data.items():
    if not instances:
      continue
    stats = features_lib.FeatureStats()
    if name == corpus_lib.CORPUS_SPLIT and corpus_report is not None:
      feats, instances = corpus_lib.featurize_corpus(featurizer, instances, corpus_report, stats)
      log.info("prepare: corpus: %s", corpus_lib.summarize(corpus_report))
    else:
      feats = featurizer(instances, stats=stats,
                         allow_unknown_labels=name == augment_lib.UNLABELLED_SPLIT)
    featurized[name] = (feats, instances, stats)
    log.info("prepare: %s: %d instances, %d truncated, %d with the relation span cut, longest %d "
             "tokens", name, len(instances), stats.num_truncated, stats.num_relation_span_cut,
             stats.max_tokens_seen)
  with dataset.PreparedWriter(out_dir, overwrite=overwrite) as writer:
    for name, (feats, instances, stats) in featurized.items():
      writer.add_split(name, feats, [i.relation for i in instances], [row_source(i) for i in instances],
                       num_shards=config.data.num_shards, stats=stats.as_dict(),
                       num_relations=len({i.relation for i in instances}),
                       by_kind=_by_kind(instances))
    writer.meta.update(
        label_map=label_map,
        relation_names=relation_names(label_map, read_schema(config)),
        max_seq_len=config.data.max_seq_len,
        typed_markers=typed,
        dataset=config.data.dataset,
        k=config.data.k,
        tokenizer_dir=str(mdir),
        special_ids={"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id,
                     "pad": tokenizer.pad_token_id, "mask": tokenizer.mask_token_id},
        vocab_size=len(tokenizer),
        seconds=round(time.time() - t0, 2),
    )
    if corpus_report is not None:
      writer.meta["corpus"] = corpus_report
    if augment_report is not None:
      writer.meta["augment"] = augment_report
    if unlabelled_report is not None:
      writer.meta["unlabelled"] = unlabelled_report
    writer.meta["inverses"] = inverse_report
    meta = json.loads(json.dumps(writer.meta))
  for name, (feats, _, _) in featurized.items():
    meta["splits"][name]["num_examples"] = int(len(feats["label"]))
  return meta


def row_source(inst: RelationInstance) -> str:
  """The `source` text of a prepared row: the record, prefixed with its kind unless gold."""
  return inst.source if inst.kind == "gold" else f"{inst.kind}:{inst.source}"


def _by_kind(instances: list[RelationInstance]) -> dict[str, int]:
  out: dict[str, int] = {}
  for inst in instances:
    out[inst.kind] = out.get(inst.kind, 0) + 1
  return out


def _ngram(config: ml_collections.ConfigDict) -> int:
  return int(config.generate.leakage_ngram)


def _augment(config, data, eval_instances, featurizer, typed) -> Optional[dict]:
  """Appends the SCDG augmentation to `data["train"]` (in place) when `config.data.augment_k`."""
  k = int(config.data.augment_k)
  if k <= 0:
    return None
  if not config.data.scdg_file:
    raise ValueError("config.data.augment_k > 0 needs config.data.scdg_file (the SCDG instances)")
  path = config_lib.resolve_path(config, config.data.scdg_file)
  if not path.is_file():
    raise FileNotFoundError(f"config.data.augment_k={k}: SCDG file not found: {path} "
                            "(config.data.scdg_file)")

  def check(inst):
    try:
      featurizer([inst])
    except DataError as e:
      return str(e)
    return None

  added, report = augment_lib.select_augmentation(
      data["train"], eval_instances, path, k, ngram=_ngram(config),
      ngram_policy=config.data.corpus_leak_ngram, check=check)
  if typed:
    added, report["marker_types"] = markers.fill_types(added, data["train"])
  data["train"] = list(data["train"]) + added
  log.info("prepare: train: %s", augment_lib.summarize(report))
  return report


def declared_inverses(config: ml_collections.ConfigDict):
  """`config.data.inverse_map` as `inverses.resolve` takes it: "auto", "" or the file's mapping.

  Raises:
    FileNotFoundError / DataError: a named file that is missing or malformed.
  """
  spec = config.data.inverse_map
  if spec in (inverses_lib.AUTO, ""):
    return spec
  path = config_lib.resolve_path(config, spec)
  if not path.is_file():
    raise FileNotFoundError(f"config.data.inverse_map: file not found: {path}")
  return inverses_lib.read_inverse_file(path)


def _inverses(config, data, eval_instances, label_map) -> dict:
  """Inverse augmentation of `data["train"]` (in place, `config.data.inverse_augment`) and the
  swapped evaluation splits `<dev|test>_swap`; returns meta.json's `inverses` entry."""
  inverses = inverses_lib.resolve(label_map, declared_inverses(config))
  report = {"declared": config.data.inverse_map, "map": inverses, "augment": None,
            "swap_splits": {}}
  if not inverses:
    return report
  if config.data.inverse_augment:
    copies, report["augment"] = inverses_lib.inverse_copies(data["train"], inverses,
                                                            eval_instances)
    data["train"] = list(data["train"]) + copies
    log.info("prepare: train: %d swapped copies of rows with an inverse (%s)", len(copies),
             report["augment"])
  for split in ("dev", "test"):
    rows = inverses_lib.swapped(data.get(split) or [], inverses)
    if rows:
      data[split + inverses_lib.SWAP_SUFFIX] = rows
      report["swap_splits"][split + inverses_lib.SWAP_SUFFIX] = len(rows)
  log.info("prepare: relation inverses in the label set: %s; swapped evaluation rows: %s",
           inverses, report["swap_splits"])
  return report


def _unlabelled(config, data, eval_instances, label_map) -> Optional[dict]:
  """Adds the `unlabelled` split (MSLM head warm-up text) when `config.data.unlabelled_file`
  exists; a configured but missing file is logged and recorded."""
  name = config.data.unlabelled_file
  if not name:
    return None
  path = config_lib.resolve_path(config, name)
  if not path.is_file():
    log.warning("prepare: no `unlabelled` split (MSLM head warm-up text): %s not found", path)
    return {"built": False, "reason": f"{path} not found"}
  instances, report = augment_lib.select_unlabelled(
      readers.read_fewrel(path), eval_instances, int(config.data.unlabelled_rows),
      task_relations=list(label_map), ngram=_ngram(config), source=str(path))
  data[augment_lib.UNLABELLED_SPLIT] = instances
  log.info("prepare: unlabelled: %d rows from %d relations of %s (%d equal to, %d sharing an "
           "n-gram with dev/test: dropped)", report["rows"], report["relations"], path,
           report["leak_equal_dropped"], report["leak_ngram_dropped"])
  return {"built": True, **report}
