"""Readers for the gold relation-extraction formats; each returns `RelationInstance`s.

Supported formats (all read in place, UTF-8, an optional byte-order mark is ignored):

* FewRel 1.0 dict (`read_fewrel`): `{relation_id: [{"tokens", "h", "t"}, ...]}`.
* TACRED list or JSON lines (`read_tacred`): TACRED, Wiki80 and TKRE's `few_train.json`.
* FewRel `pid2name.json` (`read_pid2name`) and Wiki80 `rel2id.json` (`read_rel2id`).
* The LLM files (SCDG, EDKG) are read by `tkre_jax.data.llm_files`; `read_scdg` and `read_edkg`
  are re-exported here, and `detect_format` / `read_any` know all four formats.

Every problem with the input raises `DataError` whose message names the file, the record
(its index; for JSON lines also its 1-based line number; for FewRel `relation[index]`) and
what is wrong. Nothing is skipped silently. Blank lines in a JSON-lines file hold no record
and are passed over (they do not count as records but line numbers stay those of the file).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from tkre_jax.data.json_records import (PathLike, RawRecord, build_instance, check_no_overlap,
                                        get_int, get_str, get_tokens, json_type, load_records,
                                        parse_document, read_json, read_text, record_error,
                                        require_keys)
from tkre_jax.data.llm_files import EdkgRecord, read_edkg, read_scdg
from tkre_jax.data.schema import DataError, RelationInstance

FORMATS = ("fewrel", "tacred", "scdg", "edkg")

# Penn Treebank bracket escapes used by TACRED's tokens, mapped back to the characters.
PTB_BRACKETS = {
    "-LRB-": "(",
    "-RRB-": ")",
    "-LSB-": "[",
    "-RSB-": "]",
    "-LCB-": "{",
    "-RCB-": "}",
}


# ------------------------------------------------------------------------------------------
# FewRel


def read_fewrel(path: PathLike) -> dict[str, list[RelationInstance]]:
  """Reads a FewRel 1.0 dict file (`val_wiki.json`, `train_wiki.json`, ...).

  The file is `{relation_id: [{"tokens": [...], "h": [name, wikidata_id, [[positions], ...]],
  "t": [...]}, ...]}` with `h` the subject (head) and `t` the object (tail). An entity's span is
  (min, max + 1) of its first mention's token positions `h[2][0]` (the FewRel convention; later
  mentions are ignored). Tokens are kept exactly as in the file (FewRel has some whitespace-only
  tokens such as `" "`; none lies inside an entity in the released files).

  Args:
    path: the JSON file.

  Returns:
    relation id -> list of `RelationInstance` (kind `gold`, no entity types), relations and
    instances in file order. `source` is `<path>:<relation>[<index>]`.

  Raises:
    DataError: unreadable, empty or invalid JSON (with the JSON error position); the top level
      is not an object of lists; an instance misses `tokens`, `h` or `t`, has malformed
      entities, positions out of range, or overlapping subject and object.
  """
  path = os.fspath(path)
  doc = read_json(path)
  if not isinstance(doc, dict):
    raise DataError(f"{path}: expected a JSON object mapping relation ids to lists of "
                    f"instances (FewRel format), got a JSON {json_type(doc)}")
  if not doc:
    raise DataError(f"{path}: the FewRel file holds no relations")
  out: dict[str, list[RelationInstance]] = {}
  for relation, items in doc.items():
    if not isinstance(items, list):
      raise DataError(f"{path}, relation {relation!r}: expected a list of instances, got a "
                      f"JSON {json_type(items)}")
    out[relation] = [_fewrel_instance(path, relation, i, rec) for i, rec in enumerate(items)]
  return out


def _fewrel_span(ent: Any, key: str, n: int, path: str, label: str) -> tuple[int, int]:
  if not (isinstance(ent, list) and len(ent) >= 3 and isinstance(ent[2], list) and ent[2]
          and isinstance(ent[2][0], list) and ent[2][0]):
    raise record_error(path, label, f"{key!r} must be [name, id, [[token positions], ...]] "
                                    "with a non-empty first mention")
  pos = ent[2][0]
  if not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
    raise record_error(path, label, f"{key!r} token positions must be integers, got {pos!r}")
  bad = [p for p in pos if not 0 <= p < n]
  if bad:
    raise record_error(path, label,
                       f"{key!r} token positions {bad} are out of range for {n} tokens")
  return min(pos), max(pos) + 1


def _fewrel_instance(path: str, relation: str, index: int, rec: Any) -> RelationInstance:
  label = f"{relation}[{index}]"
  rec = require_keys(rec, ("tokens", "h", "t"), path, label)
  tokens = get_tokens(rec["tokens"], "tokens", path, label)
  subj = _fewrel_span(rec["h"], "h", len(tokens), path, label)
  obj = _fewrel_span(rec["t"], "t", len(tokens), path, label)
  check_no_overlap(subj, obj, path, label, "token")
  return build_instance(path, label, lambda: RelationInstance(
      tokens=tokens, subj=subj, obj=obj, relation=relation, source=f"{path}:{label}",
      kind="gold"))


# ------------------------------------------------------------------------------------------
# TACRED / Wiki80


def read_tacred(path: PathLike, *, convert_brackets: bool = True) -> list[RelationInstance]:
  """Reads TACRED-format records: a JSON list, or JSON lines (one record per line).

  The format is chosen by the first non-space character: `[` a JSON list, `{` JSON lines.
  Each record has `token` (list of strings), `relation`, `subj_start`, `subj_end`, `obj_start`,
  `obj_end` (INCLUSIVE token indices) and optionally `subj_type`, `obj_type`; other keys
  (Stanford annotations, ids) are ignored. Used for TACRED, Wiki80 and TKRE's `few_train.json`.

  Args:
    path: the file.
    convert_brackets: when True (default), TACRED's Penn Treebank escapes `-LRB-`, `-RRB-`,
      `-LSB-`, `-RSB-`, `-LCB-`, `-RCB-` become `(`, `)`, `[`, `]`, `{`, `}` (what a
      sub-word tokenizer expects; token count and spans do not change).

  Returns:
    The instances in file order; spans end-exclusive (`(subj_start, subj_end + 1)`), kind
    `gold`, `source` `<path>:<record index>`.

  Raises:
    DataError: unreadable, empty or invalid JSON (line number for JSON lines, position for a
      list); wrong top-level type; a record that is not an object, misses a key, has a
      non-integer index, indices out of range or start > end, or overlapping entities.
  """
  path = os.fspath(path)
  out = []
  for raw in load_records(path):
    if raw.problem:
      raise record_error(path, raw.label, raw.problem)
    out.append(tacred_instance(path, raw, convert_brackets))
  return out


def tacred_instance(path: str, raw: RawRecord, convert_brackets: bool = True) -> RelationInstance:
  """One TACRED-format record (see `read_tacred`) as an instance.

  Raises:
    DataError: naming the file and record (a missing key, bad indices, overlapping entities).
  """
  label = raw.label
  rec = require_keys(raw.value, ("token", "relation", "subj_start", "subj_end", "obj_start",
                                  "obj_end"), path, label)
  tokens = get_tokens(rec["token"], "token", path, label)
  if convert_brackets:
    tokens = tuple(PTB_BRACKETS.get(t, t) for t in tokens)
  relation = get_str(rec, "relation", path, label)
  n = len(tokens)
  spans = []
  for name in ("subj", "obj"):
    s, e = get_int(rec, f"{name}_start", path, label), get_int(rec, f"{name}_end", path, label)
    if not 0 <= s <= e < n:
      raise record_error(path, label, f"{name}_start/{name}_end [{s}, {e}] (inclusive) are "
                                      f"out of range for {n} tokens")
    spans.append((s, e + 1))
  subj, obj = spans
  check_no_overlap(subj, obj, path, label, "token")
  subj_type = get_str(rec, "subj_type", path, label, optional=True)
  obj_type = get_str(rec, "obj_type", path, label, optional=True)
  return build_instance(path, label, lambda: RelationInstance(
      tokens=tokens, subj=subj, obj=obj, relation=relation, subj_type=subj_type,
      obj_type=obj_type, source=f"{path}:{raw.index}", kind="gold"))


# ------------------------------------------------------------------------------------------
# Label files


def _pid2name_entries(path: PathLike) -> tuple[str, dict[str, list[str]]]:
  path = os.fspath(path)
  doc = read_json(path)
  if not isinstance(doc, dict):
    raise DataError(f"{path}: expected a JSON object of id -> [name, description], got a "
                    f"JSON {json_type(doc)}")
  for pid, v in doc.items():
    if not (isinstance(v, list) and len(v) in (2, 3) and all(isinstance(x, str) for x in v)):
      raise record_error(path, repr(pid), "expected [name, description] or [name, description, "
                         f"template] (strings), got {v!r}")
  return path, doc


def read_pid2name(path: PathLike) -> dict[str, tuple[str, str]]:
  """Reads FewRel's `pid2name.json`: `{property_id: [name, description]}` (an entry may add a
  third string, the relation's predicate-head template: `read_pid2name_templates`).

  Returns:
    property id -> (name, description), in file order.

  Raises:
    DataError: unreadable, empty or invalid JSON, not an object, or an entry that is not a
      list of two or three strings.
  """
  _, doc = _pid2name_entries(path)
  return {pid: (v[0], v[1]) for pid, v in doc.items()}


def read_pid2name_templates(path: PathLike) -> dict[str, str]:
  """The templates of a `pid2name.json`-style schema: property id -> the third string of the
  entries that have one (`data.templates`). Raises as `read_pid2name`."""
  _, doc = _pid2name_entries(path)
  return {pid: v[2] for pid, v in doc.items() if len(v) == 3 and v[2].strip()}


def read_rel2id(path: PathLike) -> dict[str, int]:
  """Reads a `rel2id.json` label map: `{relation: id}`.

  Returns:
    relation -> id, in file order.

  Raises:
    DataError: unreadable, empty or invalid JSON, not an object, an id that is not a
      non-negative integer, or two relations with the same id.
  """
  path = os.fspath(path)
  doc = read_json(path)
  if not isinstance(doc, dict):
    raise DataError(f"{path}: expected a JSON object of relation -> id, got a JSON "
                    f"{json_type(doc)}")
  seen: dict[int, str] = {}
  for rel, i in doc.items():
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
      raise record_error(path, repr(rel), f"id must be a non-negative integer, got {i!r}")
    if i in seen:
      raise record_error(path, repr(rel), f"id {i} is also used by {seen[i]!r}")
    seen[i] = rel
  return dict(doc)


# ------------------------------------------------------------------------------------------
# Format detection


def _classify_record(rec: Any) -> Optional[str]:
  if not isinstance(rec, dict):
    return None
  if "token" in rec:
    return "tacred"
  if "generated_text" in rec:
    return "edkg"
  if "text" in rec and "subj_start" in rec:
    return "scdg"
  return None


def _looks_like_fewrel(doc: Any) -> bool:
  if not (isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values())):
    return False
  items = next((v for v in doc.values() if v), None)
  return items is not None and isinstance(items[0], dict) and "tokens" in items[0]


def detect_format(path: PathLike) -> str:
  """Guesses the format of a data file from its content.

  A JSON object whose values are lists of objects with `tokens` is FewRel; otherwise the first
  record (of a JSON list or of JSON lines) decides: `token` -> tacred, `generated_text` ->
  edkg, `text` and `subj_start` -> scdg.

  Returns:
    one of `FORMATS`: "fewrel", "tacred", "scdg", "edkg".

  Raises:
    DataError: unreadable, empty, invalid JSON, or a format that is none of these.
  """
  path = os.fspath(path)
  text = read_text(path)
  stripped = text.lstrip()
  first: Any = None
  if stripped[0] == "[":
    doc = parse_document(path, text)
    first = doc[0] if isinstance(doc, list) and doc else None
  elif stripped[0] == "{":
    line = stripped.split("\n", 1)[0]
    try:
      first = json.loads(line)
    except json.JSONDecodeError:
      first = parse_document(path, text)  # a multi-line (pretty-printed) JSON object.
    if _classify_record(first) is None and _looks_like_fewrel(first):
      return "fewrel"
  fmt = _classify_record(first)
  if fmt is None:
    raise DataError(f"{path}: unknown data format (expected one of {', '.join(FORMATS)}; "
                    f"first record: {str(first)[:80]!r})")
  return fmt


def read_any(path: PathLike, fmt: str = "auto") -> Union[
    dict[str, list[RelationInstance]], list[RelationInstance], list[EdkgRecord]]:
  """Reads a data file in the given or detected format.

  Args:
    path: the file.
    fmt: "auto" (see `detect_format`), or one of "fewrel", "tacred", "scdg", "edkg".

  Returns:
    "fewrel": relation -> instances (`read_fewrel`); "tacred"/"scdg": a list of instances;
    "edkg": a list of `EdkgRecord` (convert with `edkg_to_instances`).

  Raises:
    DataError: unknown `fmt` or undetectable format (naming the file), or any error of the
      chosen reader. SCDG records are read with `on_error="raise"`.
  """
  path = os.fspath(path)
  if fmt == "auto":
    fmt = detect_format(path)
  readers = {"fewrel": read_fewrel, "tacred": read_tacred, "scdg": read_scdg,
             "edkg": read_edkg}
  if fmt not in readers:
    raise DataError(f"{path}: unknown format {fmt!r}; expected 'auto' or one of "
                    f"{', '.join(FORMATS)}")
  return readers[fmt](path)
