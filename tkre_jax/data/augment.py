"""Rows added to a prepared dataset besides the K-shot, dev and test splits.

* SCDG augmentation of the fine-tuning set (`select_augmentation`): the TKRE reference fine-tunes
  on `merged_train.json`, the K-shot set plus `add_k = 8` synthetic SCDG instances per relation
  (its `merge_data.py`). `config.data.augment_k` (0: off) takes, per relation and in file order,
  the first `augment_k` SCDG instances of `config.data.scdg_file` that are
    - valid (`llm_files.read_scdg`: offsets, entity texts, no overlap),
    - clean under the corpus leakage rules 2-3 (`corpus.screen_llm`: a text equal to a dev/test
      text is an error, one sharing an n-gram with dev/test is dropped by default),
    - not a duplicate (normalised text) of a K-shot training sentence or of an instance already
      taken,
    - featurizable (`check`, e.g. the entities fit in `max_seq_len`),
  or all that exist. They are appended to `train` after the gold rows; dev and test are never
  augmented. Every reason an instance was not taken is counted in the report.
* Unlabelled text for the MSLM head warm-up (`select_unlabelled`): sentences of a FewRel-format
  file whose relations are disjoint from the task's (FewRel 1.0's train relations for its val
  relations), screened against dev/test the same way; they are used without their labels.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from tkre_jax.data import corpus as corpus_lib
from tkre_jax.data import llm_files
from tkre_jax.data.json_records import PathLike
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.text import normalize_text

log = logging.getLogger(__name__)

UNLABELLED_SPLIT = "unlabelled"


def select_augmentation(train: Sequence[RelationInstance],
                        eval_instances: Sequence[RelationInstance], scdg_path: PathLike, k: int, *,
                        ngram: int = 8, ngram_policy: str = "drop",
                        check: Optional[Callable[[RelationInstance], Optional[str]]] = None
                        ) -> tuple[list[RelationInstance], dict[str, Any]]:
  """The SCDG instances that augment the fine-tuning set (see the module docstring).

  Args:
    train: the K-shot training instances (gold).
    eval_instances: every dev and test instance.
    scdg_path: the SCDG file (JSON lines).
    k: instances per relation, >= 1.
    ngram, ngram_policy: the leakage n-gram check (`corpus.build_corpus`).
    check: `instance -> problem or None`; an instance with a problem is not taken (counted).

  Returns:
    `(instances, report)`: the instances taken (kind `scdg`, file order) and a JSON-able report:
    `augment_k`, `file`, `records`, `invalid`, `leak_ngram_dropped`, `leak_ngram_kept`,
    `duplicate_dropped`, `featurize_rejected` (with `rejected_records`), `added`, `per_relation`
    (every training relation -> instances taken), `relations_short` (relations with fewer than
    `k`), `gold`.

  Raises:
    ValueError: `k` < 1, bad `ngram` / `ngram_policy`.
    DataError: an unreadable SCDG file, or a record naming a relation the training set lacks.
    CorpusLeakError: an SCDG text equal to a dev/test text (or sharing an n-gram under `fail`).
  """
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"augment_k must be an int >= 1, got {k!r}")
  if ngram_policy not in corpus_lib.NGRAM_POLICIES:
    raise ValueError(f"ngram_policy must be one of {corpus_lib.NGRAM_POLICIES}, got {ngram_policy!r}")
  scdg, invalid = llm_files.read_scdg(scdg_path, on_error="collect")
  relations = list(dict.fromkeys(inst.relation for inst in train))
  unknown = [inst for inst in scdg if inst.relation not in set(relations)]
  if unknown:
    raise DataError(f"{unknown[0].source}: SCDG relation {unknown[0].relation!r} is not a training "
                    f"relation ({len(unknown)} such record(s)); config.data.scdg_file belongs to "
                    "another data set")
  index = corpus_lib.EvalIndex.build(eval_instances, ngram)
  screened = corpus_lib.screen_llm(scdg, index, corpus_lib.train_ngrams(train, ngram), ngram_policy)
  corpus_lib.raise_on_leaks(screened.equal_hits, screened.ngram_hits, ngram, ngram_policy,
                            "SCDG augmentation text(s)")
  seen = {normalize_text(inst.text) for inst in train}
  taken: dict[str, list[RelationInstance]] = {r: [] for r in relations}
  chosen: list[RelationInstance] = []
  duplicates, rejected = 0, []
  for inst in screened.kept:
    if len(taken[inst.relation]) >= k:
      continue
    text = normalize_text(inst.text)
    if text in seen:
      duplicates += 1
      continue
    problem = check(inst) if check is not None else None
    if problem:
      rejected.append(f"{inst.source}: {problem}")
      continue
    seen.add(text)
    taken[inst.relation].append(inst)
    chosen.append(inst)
  report = {
      "augment_k": k, "file": str(scdg_path), "records": len(scdg) + len(invalid),
      "invalid": len(invalid), "invalid_records": [f"{w}: {p}" for w, p in invalid],
      "leak_ngram_dropped": screened.dropped, "leak_ngram_kept": screened.kept_with_ngram,
      "duplicate_dropped": duplicates, "featurize_rejected": len(rejected),
      "rejected_records": rejected, "added": len(chosen),
      "per_relation": {r: len(v) for r, v in taken.items()},
      "relations_short": {r: len(v) for r, v in taken.items() if len(v) < k},
      "gold": len(train),
  }
  return chosen, report


def summarize(report: Mapping[str, Any]) -> str:
  """One log line for an augmentation report."""
  short = report["relations_short"]
  return (f"{report['gold']} gold + {report['added']} SCDG (synthetic) training instances, up to "
          f"{report['augment_k']} per relation from {report['file']}: {report['records']} records, "
          f"{report['invalid']} invalid, {report['leak_ngram_dropped']} dropped for a shared "
          f"n-gram with dev/test, {report['duplicate_dropped']} duplicates of a training sentence, "
          f"{report['featurize_rejected']} not featurizable; "
          + (f"{len(short)} relation(s) with fewer than {report['augment_k']}: {short}" if short
             else "every relation complete"))


def select_unlabelled(by_relation: Mapping[str, Sequence[RelationInstance]],
                      eval_instances: Sequence[RelationInstance], max_rows: int, *,
                      task_relations: Sequence[str] = (), ngram: int = 8,
                      source: str = "") -> tuple[list[RelationInstance], dict[str, Any]]:
  """Unlabelled sentences for the MSLM head warm-up, balanced over the file's relations.

  Takes the first `ceil(max_rows / R)` instances of each of the R relations (file order), then
  cuts to `max_rows`. A sentence equal to a dev/test text, or sharing an `ngram`-gram with one, is
  dropped and counted. The rows keep their entities (for the span masking) but not their labels
  (kind `unlabelled`).

  Returns:
    `(instances, report)` with `file`, `relations`, `rows`, `leak_equal_dropped`,
    `leak_ngram_dropped`.

  Raises:
    DataError: a relation of the file is also a task relation (its text would be labelled data of
      the task).
    ValueError: `max_rows` < 1.
  """
  if max_rows < 1:
    raise ValueError(f"unlabelled max_rows must be >= 1, got {max_rows}")
  overlap = sorted(set(by_relation) & set(task_relations))
  if overlap:
    raise DataError(f"{source}: relations {overlap[:5]} are also relations of the task; the MSLM "
                    "head warm-up needs text from other relations (config.data.unlabelled_file)")
  per = math.ceil(max_rows / max(len(by_relation), 1))
  candidates = [inst for items in by_relation.values() for inst in list(items)[:per]]
  index = corpus_lib.EvalIndex.build(eval_instances, ngram)
  screened = corpus_lib.screen_llm(candidates, index, set(), "drop")
  kept = [dataclasses.replace(inst, kind="unlabelled") for inst in screened.kept][:max_rows]
  report = {"file": source, "relations": len(by_relation), "rows": len(kept),
            "leak_equal_dropped": len(screened.equal_hits), "leak_ngram_dropped": screened.dropped}
  return kept, report
