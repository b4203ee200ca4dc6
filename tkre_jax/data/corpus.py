"""The knowledge-guided pre-training corpus of TKRE (the `corpus` split that `mslm` and `scl` read).

The corpus is the union of three sources, all as `RelationInstance`s (TKRE paper, arXiv 2505.12236,
Sec. 3: the "knowledge-guided" corpus built from the few-shot data and two kinds of LLM knowledge):

* `gold`: the K-shot training instances themselves;
* `edkg`: EDKG explanations. The corpus entry is the explanation (`generated_text`), never its seed
  `context`; the subject and object are located inside it by character offsets with
  `llm_files.edkg_to_instances`. An explanation in which they cannot be found is not used and is
  counted (`edkg.entity_not_found`, with the record sources);
* `scdg`: SCDG synthetic instances, read with `llm_files.read_scdg(..., on_error="collect")`:
  records with bad offsets / overlapping entities are not used and are counted (`scdg.invalid`,
  with the record and the problem).

Leakage rule (nothing from a dev or test split may enter the corpus). Texts are compared after
`tkre_jax.text.normalize_text` (lower case, words and punctuation marks as tokens, so `Paris,` and
`Paris ,` are equal), with the generate stage's index (`tkre_jax.text.LeakageIndex`); "eval"
below means every dev and test instance.

1. Gold instances: a training instance IDENTICAL to an eval instance (same normalised text AND same
   subject and object token spans) is an error (`CorpusLeakError`): that is leakage from our split.
   A training sentence whose TEXT equals an eval sentence but with another entity pair is the
   benchmark's own property (FewRel val_wiki repeats sentences with different entity pairs: 5
   training sentences of the 8-shot split occur in test); it is allowed and counted
   (`leakage.train_text_shared_with_eval`).
2. LLM texts (EDKG explanations, SCDG sentences) EQUAL to an eval text are an error
   (`CorpusLeakError`, naming the records).
3. LLM texts sharing a word n-gram (n = `config.generate.leakage_ngram`, 8) with an eval text, where
   the n-gram does not also occur in a K-shot training text (those the LLM was shown, or that are in
   the corpus anyway), are handled by `ngram_policy`: `drop` (default: not used, counted per source
   in `<kind>.leak_ngram_dropped`), `keep` (used, counted), `fail` (`CorpusLeakError`). The generate
   stage already rejects these; pre-generated files may not have been through it (7 of the 256
   shared FewRel SCDG records share an 8-gram such as "a german professional footballer who plays
   as a" with test sentences; they are dropped by default).
4. LLM instances whose (subject, object) pair, normalised, equals an eval instance's pair are
   counted only (`leakage.entity_pair_in_eval`): famous facts ("Sirius" / "Canis Major") are world
   knowledge of the LLM, not text from our dev/test splits.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from tkre_jax.data import llm_files, markers
from tkre_jax.data.json_records import PathLike
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.text import LeakageIndex, normalize_text, word_ngrams

log = logging.getLogger(__name__)

CORPUS_SPLIT = "corpus"
NGRAM_POLICIES = ("drop", "keep", "fail")
CORPUS_MODES = ("auto", "require", "off")


class CorpusLeakError(DataError):
  """Dev / test data would enter the pre-training corpus. The message names the records."""


def _identity(inst: RelationInstance) -> tuple:
  return (normalize_text(inst.text), tuple(inst.subj), tuple(inst.obj))


def _pair(inst: RelationInstance) -> tuple[str, str]:
  return (normalize_text(inst.subj_text), normalize_text(inst.obj_text))


@dataclasses.dataclass
class EvalIndex:
  """Dev/test data for the checks above: texts and n-grams (`text.LeakageIndex`), and the
  instance identities (normalised text, subject span, object span) and entity pairs."""
  texts: LeakageIndex
  identities: dict[tuple, str]   # (text, subj, obj) -> source of the first eval instance with it
  pairs: set[tuple[str, str]]

  @classmethod
  def build(cls, eval_instances: Sequence[RelationInstance], n: Optional[int]) -> "EvalIndex":
    eval_instances = list(eval_instances)
    sources = [inst.source or f"eval[{i}]" for i, inst in enumerate(eval_instances)]
    texts = LeakageIndex([inst.text for inst in eval_instances], n, sources=sources)
    identities: dict[tuple, str] = {}
    for inst, src in zip(eval_instances, sources):
      identities.setdefault(_identity(inst), src)
    return cls(texts, identities, {_pair(inst) for inst in eval_instances})


def train_ngrams(train: Sequence[RelationInstance], ngram: int) -> set:
  """The word n-grams of the K-shot training texts (not held against LLM text, rule 3)."""
  grams: set = set()
  for inst in train:
    grams.update(word_ngrams(inst.text, ngram))
  return grams


@dataclasses.dataclass
class Screened:
  """What `screen_llm` did with a list of LLM instances (rules 2-4).

  Attributes:
    kept: the instances that may be used, in input order.
    equal_hits: `(source, eval source, normalised text)` of texts equal to an eval text (rule 2).
    ngram_hits: `(source, one shared n-gram)` of texts sharing an n-gram with an eval text (rule 3).
    dropped: rule-3 hits not used (`drop` policy); kept_with_ngram: rule-3 hits used (`keep`).
    pair_hits: kept instances whose entity pair is an eval instance's (rule 4, counted only).
  """
  kept: list[RelationInstance] = dataclasses.field(default_factory=list)
  equal_hits: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  ngram_hits: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  dropped: int = 0
  kept_with_ngram: int = 0
  pair_hits: int = 0


def screen_llm(instances: Sequence[RelationInstance], index: "EvalIndex", train_grams: set,
               ngram_policy: str) -> Screened:
  """Applies leakage rules 2-4 to LLM (or other non-gold) instances; raises nothing (see
  `raise_on_leaks`). `index` from `EvalIndex.build(eval_instances, n)`."""
  out = Screened()
  for inst in instances:
    equal = index.texts.equal(inst.text)
    if equal is not None:
      out.equal_hits.append((inst.source, equal, normalize_text(inst.text)))
      continue
    grams = index.texts.shared_ngrams(inst.text, exclude=train_grams)
    if grams:
      out.ngram_hits.append((inst.source, " ".join(sorted(grams)[0])))
      if ngram_policy == "drop":
        out.dropped += 1
        continue
      out.kept_with_ngram += 1
    if _pair(inst) in index.pairs:
      out.pair_hits += 1
    out.kept.append(inst)
  return out


def raise_on_leaks(equal_hits: Sequence[tuple[str, str, str]], ngram_hits: Sequence[tuple[str, str]],
                   ngram: int, ngram_policy: str, what: str) -> None:
  """Raises `CorpusLeakError` for rule-2 hits, and for rule-3 hits under the `fail` policy."""
  if equal_hits:
    shown = "; ".join(f"{a} == {b} ({t[:60]!r})" for a, b, t in equal_hits[:5])
    raise CorpusLeakError(f"{len(equal_hits)} {what} equal a dev/test text: "
                          f"{shown}" + (" ..." if len(equal_hits) > 5 else ""))
  if ngram_hits and ngram_policy == "fail":
    shown = "; ".join(f"{a}: {g!r}" for a, g in ngram_hits[:5])
    raise CorpusLeakError(f"{len(ngram_hits)} {what} share a {ngram}-gram with "
                          f"dev/test texts (data.corpus_leak_ngram='fail'): {shown}"
                          + (" ..." if len(ngram_hits) > 5 else ""))


def check_train_not_in_eval(train: Sequence[RelationInstance],
                            eval_instances: Sequence[RelationInstance]) -> int:
  """Rule 1: no training instance may be identical to a dev/test instance.

  Args:
    train: the K-shot training instances.
    eval_instances: every dev and test instance.

  Returns:
    How many training instances share only their TEXT (another entity pair) with an eval instance
    (allowed; the benchmark's property).

  Raises:
    CorpusLeakError: some training instance has the same normalised text, subject span and object
      span as an eval instance; the message gives how many and the first few sources.
  """
  return _check_train(train, EvalIndex.build(eval_instances, n=None))


def _check_train(train: Sequence[RelationInstance], index: EvalIndex) -> int:
  hits, shared = [], 0
  for i, inst in enumerate(train):
    ident = _identity(inst)
    if ident in index.identities:
      hits.append((inst.source or f"train[{i}]", index.identities[ident], ident[0]))
    elif index.texts.equal(inst.text) is not None:
      shared += 1
  if hits:
    shown = "; ".join(f"{a} == {b} ({t[:60]!r})" for a, b, t in hits[:5])
    raise CorpusLeakError(f"{len(hits)} training instance(s) are identical (text and entity spans) "
                          f"to dev/test instances: {shown}" + (" ..." if len(hits) > 5 else ""))
  return shared


@dataclasses.dataclass
class LlmKnowledge:
  """The LLM sources read and turned into instances, with what could not be used.

  Attributes:
    edkg: instances over EDKG `generated_text` (kind `edkg`).
    edkg_records: number of EDKG records read.
    edkg_not_found: sources of the explanations whose subject or object is not in their text.
    scdg: SCDG instances (kind `scdg`).
    scdg_records: number of SCDG records read (valid + invalid).
    scdg_invalid: `(where, problem)` of every SCDG record that could not be used.
    edkg_seeds: EDKG instance source -> `(context, subject, object)` of its record (the seed
      training instance it explains; `markers.fill_types` takes its entity types from there).
  """
  edkg: list[RelationInstance] = dataclasses.field(default_factory=list)
  edkg_records: int = 0
  edkg_not_found: list[str] = dataclasses.field(default_factory=list)
  scdg: list[RelationInstance] = dataclasses.field(default_factory=list)
  scdg_records: int = 0
  scdg_invalid: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  edkg_seeds: dict[str, tuple[Optional[str], str, str]] = dataclasses.field(default_factory=dict)


def read_llm_knowledge(edkg_path: Optional[PathLike] = None,
                       scdg_path: Optional[PathLike] = None) -> LlmKnowledge:
  """Reads the EDKG and SCDG files (either may be None) into instances.

  Returns:
    `LlmKnowledge` with the usable instances and the counted rejects.

  Raises:
    DataError: a file is unreadable or malformed as a whole, or an EDKG record is malformed (bad
      SCDG records are collected, not raised).
  """
  out = LlmKnowledge()
  if edkg_path is not None:
    records = llm_files.read_edkg(edkg_path)
    out.edkg, out.edkg_not_found = llm_files.edkg_to_instances(records)
    out.edkg_records = len(records)
    out.edkg_seeds = {r.source: (r.context, r.subject, r.object) for r in records}
  if scdg_path is not None:
    out.scdg, out.scdg_invalid = llm_files.read_scdg(scdg_path, on_error="collect")
    out.scdg_records = len(out.scdg) + len(out.scdg_invalid)
  return out


def build_corpus(train: Sequence[RelationInstance], eval_instances: Sequence[RelationInstance],
                 knowledge: LlmKnowledge, *, ngram: int = 8,
                 ngram_policy: str = "drop") -> tuple[list[RelationInstance], dict[str, Any]]:
  """Applies the leakage rules of the module docstring and assembles the corpus.

  Args:
    train: the K-shot training instances (kind `gold`), all in the corpus.
    eval_instances: every dev and test instance (may be empty, e.g. a training file alone).
    knowledge: from `read_llm_knowledge`.
    ngram: n of the shared-n-gram check, >= 1.
    ngram_policy: `drop`, `keep` or `fail` (rule 3).

  Returns:
    `(instances, report)`: the corpus in the order gold, edkg, scdg (file order within each), and a
    JSON-able report: `num_instances`, `by_kind`, per-source counts (`edkg`, `scdg`) and `leakage`.

  Raises:
    ValueError: a bad `ngram` or `ngram_policy`.
    CorpusLeakError: rules 1 and 2, or rule 3 with `ngram_policy="fail"`.
  """
  if ngram_policy not in NGRAM_POLICIES:
    raise ValueError(f"ngram_policy must be one of {NGRAM_POLICIES}, got {ngram_policy!r}")
  if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
    raise ValueError(f"ngram must be a positive int, got {ngram!r}")
  index = EvalIndex.build(eval_instances, ngram)
  shared_text = _check_train(train, index)
  train_grams = train_ngrams(train, ngram)
  screened = {kind: screen_llm(instances, index, train_grams, ngram_policy)
              for kind, instances in (("edkg", knowledge.edkg), ("scdg", knowledge.scdg))}
  raise_on_leaks([h for s in screened.values() for h in s.equal_hits],
                 [h for s in screened.values() for h in s.ngram_hits], ngram, ngram_policy,
                 "LLM-generated corpus text(s)")
  kept = {kind: s.kept for kind, s in screened.items()}
  dropped = {kind: s.dropped for kind, s in screened.items()}
  kept_with_ngram = {kind: s.kept_with_ngram for kind, s in screened.items()}
  pair_hits = {kind: s.pair_hits for kind, s in screened.items()}
  ngram_hits = [h for s in screened.values() for h in s.ngram_hits]

  instances = list(train) + kept["edkg"] + kept["scdg"]
  report = {
      "num_instances": len(instances),
      "by_kind": {"gold": len(train), "edkg": len(kept["edkg"]), "scdg": len(kept["scdg"])},
      "edkg": {
          "records": knowledge.edkg_records,
          "entity_not_found": len(knowledge.edkg_not_found),
          "entity_not_found_sources": list(knowledge.edkg_not_found),
          "leak_ngram_dropped": dropped["edkg"],
          "leak_ngram_kept": kept_with_ngram["edkg"],
          "used": len(kept["edkg"]),
      },
      "scdg": {
          "records": knowledge.scdg_records,
          "invalid": len(knowledge.scdg_invalid),
          "invalid_records": [f"{w}: {p}" for w, p in knowledge.scdg_invalid],
          "leak_ngram_dropped": dropped["scdg"],
          "leak_ngram_kept": kept_with_ngram["scdg"],
          "used": len(kept["scdg"]),
      },
      "leakage": {
          "eval_instances": index.texts.size,
          "ngram": ngram,
          "ngram_policy": ngram_policy,
          "train_text_shared_with_eval": shared_text,
          "ngram_hits": [f"{a}: {g!r}" for a, g in ngram_hits],
          "entity_pair_in_eval": pair_hits,
      },
  }
  return instances, report


def featurize_corpus(featurizer, instances: Sequence[RelationInstance], report: dict,
                     stats=None) -> tuple[dict[str, np.ndarray], list[RelationInstance]]:
  """Featurizes the corpus; an LLM instance the featurizer rejects (e.g. entities too far apart
  for `max_seq_len`) is dropped and counted in `report[kind]["featurize_rejected"]`.

  Args:
    featurizer: a `features.Featurizer` (the same one, with the same label map, as the splits).
    instances: from `build_corpus`.
    report: its report; updated in place (`featurize_rejected`, `featurize_rejected_records`,
      `used`, `by_kind`, `num_instances`).
    stats: optional `features.FeatureStats`.

  Returns:
    `(features, kept_instances)`.

  Raises:
    DataError: a gold instance cannot be featurized, or an LLM instance names a relation outside
      the label map (a wrong LLM file; the message names the record).
  """
  try:
    return featurizer(instances, stats=stats), list(instances)
  except DataError:
    pass
  kept, rejected = [], {"edkg": [], "scdg": []}
  for inst in instances:
    try:
      featurizer([inst])
    except DataError as e:
      if inst.kind == "gold" or inst.relation not in featurizer.label_map:
        raise
      rejected[inst.kind].append(f"{inst.source}: {e}")
      continue
    kept.append(inst)
  for kind, items in rejected.items():
    report[kind]["featurize_rejected"] = len(items)
    report[kind]["featurize_rejected_records"] = items
    report[kind]["used"] -= len(items)
    report["by_kind"][kind] -= len(items)
  report["num_instances"] = len(kept)
  return featurizer(kept, stats=stats), kept


def resolve_sources(config) -> tuple[dict[str, pathlib.Path], list[str]]:
  """The configured LLM files (`data.edkg_file`, `data.scdg_file`), resolved, and the missing ones.

  Returns:
    `({kind: path} of configured files, [missing paths])`.
  """
  from tkre_jax import config as config_lib
  paths, missing = {}, []
  for kind, name in (("edkg", config.data.edkg_file), ("scdg", config.data.scdg_file)):
    if name:
      p = config_lib.resolve_path(config, name)
      paths[kind] = p
      if not p.is_file():
        missing.append(str(p))
  return paths, missing


def corpus_from_config(config, data: dict[str, list[RelationInstance]], typed: bool = False
                       ) -> tuple[Optional[list[RelationInstance]], dict[str, Any]]:
  """Builds the corpus for the prepare stage from `config.data` (see `base_config`).

  `config.data.corpus`: `off` never builds one; `require` builds it and fails when an LLM file
  is missing; `auto` (default) builds it when every configured LLM file exists, skips it (with a
  warning, recorded in the report) when none exists, and fails when only some exist. Without any
  configured LLM file, `auto` and `require` build a corpus of the training instances alone.
  `typed`: the prepared rows use typed markers (`markers.gold_has_types`); LLM rows lacking a type get one
  (`markers.fill_types`, counted in `report["marker_types"]`).

  Returns:
    `(instances or None when skipped, report)`.

  Raises:
    FileNotFoundError: a missing LLM file under `require`, or some (not all) missing under `auto`.
    ValueError: a bad `config.data.corpus` / `corpus_leak_ngram`.
    CorpusLeakError, DataError: see `build_corpus` and the readers.
  """
  mode = config.data.corpus
  if mode not in CORPUS_MODES:
    raise ValueError(f"config.data.corpus must be one of {CORPUS_MODES}, got {mode!r}")
  if mode == "off":
    return None, {"built": False, "reason": "config.data.corpus='off'"}
  paths, missing = resolve_sources(config)
  if missing:
    if mode == "require" or len(missing) < len(paths):
      raise FileNotFoundError(
          f"pre-training corpus: LLM file(s) not found: {', '.join(missing)} (config.data.edkg_file"
          f" / scdg_file are relative to config.data.data_dir; set them to '' to leave a source out"
          f", or config.data.corpus='off')")
    reason = f"LLM files not found ({', '.join(missing)}); config.data.corpus='auto'"
    log.warning("prepare: no pre-training corpus: %s", reason)
    return None, {"built": False, "reason": reason}
  knowledge = read_llm_knowledge(paths.get("edkg"), paths.get("scdg"))
  ngram = int(config.generate.leakage_ngram)
  instances, report = build_corpus(
      data["train"], list(data.get("dev", [])) + list(data.get("test", [])), knowledge,
      ngram=ngram, ngram_policy=config.data.corpus_leak_ngram)
  report = {"built": True, "files": {k: str(v) for k, v in paths.items()}, **report}
  if typed:
    instances, report["marker_types"] = markers.fill_types(instances, data["train"], knowledge.edkg_seeds)
  return instances, report


def summarize(report: dict) -> str:
  """One log line for a corpus report."""
  if not report.get("built"):
    return f"no corpus ({report.get('reason')})"
  e, s, lk = report["edkg"], report["scdg"], report["leakage"]
  return (f"{report['num_instances']} instances {report['by_kind']}; EDKG {e['records']} records, "
          f"{e['entity_not_found']} without their entities, {e['leak_ngram_dropped']} dropped for a "
          f"shared {lk['ngram']}-gram; SCDG {s['records']} records, {s['invalid']} invalid, "
          f"{s['leak_ngram_dropped']} dropped for a shared {lk['ngram']}-gram; "
          f"{lk['train_text_shared_with_eval']} training sentence(s) also in dev/test with another "
          f"entity pair")
