"""Readers of the LLM-generated files: SCDG synthetic instances and EDKG explanations.

* SCDG synthetic instances, JSON lines or a JSON list (`read_scdg`): text with character
  offsets.
* EDKG explanations, JSON lines or a JSON list (`read_edkg`), turned into instances over their
  `generated_text` by `edkg_to_instance(s)`.

Errors name the file and the record as in `tkre_jax.data.json_records`; nothing is skipped
silently (`read_scdg(..., on_error="collect")` and `edkg_to_instances` return what they could
not use).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal, Optional, Sequence, overload

from tkre_jax.data.json_records import (PathLike, RawRecord, RecordError, build_instance,
                                        check_no_overlap, get_int, get_str, load_records,
                                        record_error, require_keys)
from tkre_jax.data.schema import RelationInstance, from_char_offsets
from tkre_jax.text import find_entity_pair


# ------------------------------------------------------------------------------------------
# SCDG


@overload
def read_scdg(path: PathLike, *, on_error: Literal["raise"] = "raise"
              ) -> list[RelationInstance]:
  ...


@overload
def read_scdg(path: PathLike, *, on_error: Literal["collect"]
              ) -> tuple[list[RelationInstance], list[tuple[str, str]]]:
  ...


def read_scdg(path, *, on_error="raise"):
  """Reads SCDG synthetic instances: JSON lines (a JSON list is accepted too).

  Each record has `text, subj, subj_start, subj_end, obj, obj_start, obj_end, relation` and
  optionally `subj_type, obj_type`; offsets are character offsets into `text`, end exclusive.
  `text[subj_start:subj_end]` must equal `subj` and likewise for the object. The text is
  tokenized with `schema.from_char_offsets` (entities always on token boundaries).

  Args:
    path: the file (e.g. `scdg_*.jsonl`, TKRE's `llm_da_8.json`, which is JSON lines).
    on_error: `"raise"` (default): the first bad record raises. `"collect"`: bad records
      (including lines that are not valid JSON) are not returned but listed, so the caller can
      report them; problems with the whole file still raise.

  Returns:
    With `on_error="raise"`: list of `RelationInstance` (kind `scdg`, `source`
    `<path>:<record index>`) in file order. With `"collect"`: `(instances, problems)`, where
    `problems` is a list of `(where, problem)` string pairs, `where` like
    `<path>, record 8 (line 9)`.

  Raises:
    DataError: the file is unreadable, empty, not a list / JSON lines; with `"raise"` also a
      record with invalid JSON, a missing key, a non-integer offset, offsets out of range,
      entity text not matching its span, blank entity, or overlapping subject and object.
    ValueError: `on_error` is not `"raise"` or `"collect"`.
  """
  if on_error not in ("raise", "collect"):
    raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
  path = os.fspath(path)
  out: list[RelationInstance] = []
  problems: list[tuple[str, str]] = []
  for raw in load_records(path):
    try:
      if raw.problem:
        raise record_error(path, raw.label, raw.problem)
      out.append(_scdg_instance(path, raw))
    except RecordError as e:
      if on_error == "raise":
        raise
      problems.append((e.where, e.problem))
  return out if on_error == "raise" else (out, problems)


def _scdg_instance(path: str, raw: RawRecord) -> RelationInstance:
  label = raw.label
  rec = require_keys(raw.value, ("text", "subj", "subj_start", "subj_end", "obj", "obj_start",
                                  "obj_end", "relation"), path, label)
  text = get_str(rec, "text", path, label)
  relation = get_str(rec, "relation", path, label)
  n = len(text)
  spans = []
  for name, what in (("subj", "subject"), ("obj", "object")):
    ent = get_str(rec, name, path, label)
    s, e = get_int(rec, f"{name}_start", path, label), get_int(rec, f"{name}_end", path, label)
    if not 0 <= s < e <= n:
      raise record_error(path, label, f"{what} character offsets [{s}, {e}) are out of range "
                                      f"for a text of {n} characters")
    if text[s:e] != ent:
      raise record_error(path, label, f"{what} text {ent!r} does not match text[{s}:{e}] = "
                                      f"{text[s:e]!r}")
    spans.append((s, e))
  (ss, se), (os_, oe) = spans
  check_no_overlap((ss, se), (os_, oe), path, label, "character")
  subj_type = get_str(rec, "subj_type", path, label, optional=True)
  obj_type = get_str(rec, "obj_type", path, label, optional=True)
  return build_instance(path, label, lambda: from_char_offsets(
      text, ss, se, os_, oe, relation, subj_type=subj_type, obj_type=obj_type,
      source=f"{path}:{raw.index}", kind="scdg"))


# ------------------------------------------------------------------------------------------
# EDKG


@dataclasses.dataclass(frozen=True)
class EdkgRecord:
  """One LLM explanation (EDKG) of why a relation holds between two entities.

  Attributes:
    relation: the relation label.
    subject: the subject entity as a string.
    object: the object entity as a string.
    context: the seed sentence the explanation was written from, or None when absent.
    generated_text: the explanation; this (not `context`) is the pre-training corpus entry.
    source: `<file>:<record index>`.
  """

  relation: str
  subject: str
  object: str
  context: Optional[str]
  generated_text: str
  source: str


def read_edkg(path: PathLike) -> list[EdkgRecord]:
  """Reads EDKG explanations from JSON lines or a JSON list.

  Each record has `relation, subject, object, generated_text` (non-empty strings) and an
  optional `context` (string or null); other keys are ignored.

  Returns:
    list of `EdkgRecord` in file order.

  Raises:
    DataError: unreadable, empty, invalid JSON (line number for JSON lines), wrong top-level
      type, a record that is not an object, misses a key or has a non-string / empty field.
  """
  path = os.fspath(path)
  out = []
  for raw in load_records(path):
    label = raw.label
    if raw.problem:
      raise record_error(path, label, raw.problem)
    rec = require_keys(raw.value, ("relation", "subject", "object", "generated_text"), path,
                        label)
    out.append(EdkgRecord(
        relation=get_str(rec, "relation", path, label),
        subject=get_str(rec, "subject", path, label),
        object=get_str(rec, "object", path, label),
        context=get_str(rec, "context", path, label, optional=True, nonblank=False),
        generated_text=get_str(rec, "generated_text", path, label, nonblank=False),
        source=f"{path}:{raw.index}"))
  return out


def edkg_to_instance(record: EdkgRecord) -> Optional[RelationInstance]:
  """Turns an explanation into a relation instance over its `generated_text`.

  The subject and object are located inside `generated_text` with
  `tkre_jax.text.find_entity_pair` (case-insensitive, whole-word matches preferred, the closest
  non-overlapping pair) and the text is tokenized with `schema.from_char_offsets(...,
  kind="edkg")`; entity types are None.

  Returns:
    The `RelationInstance` (source `record.source`), or None when the subject or the object
    cannot be found (the caller counts and reports these, see `edkg_to_instances`).
  """
  pair = find_entity_pair(record.generated_text, record.subject, record.object)
  if pair is None:
    return None
  (ss, se, _), (os_, oe, _) = pair
  return from_char_offsets(record.generated_text, ss, se, os_, oe, record.relation,
                           source=record.source, kind="edkg")


def edkg_to_instances(
    records: Sequence[EdkgRecord]) -> tuple[list[RelationInstance], list[str]]:
  """Applies `edkg_to_instance` to every record.

  Returns:
    `(instances, unusable)`: the instances in record order, and the `source` of each record
    whose subject or object was not found in its `generated_text`.
  """
  instances, unusable = [], []
  for rec in records:
    inst = edkg_to_instance(rec)
    if inst is None:
      unusable.append(rec.source)
    else:
      instances.append(inst)
  return instances, unusable
