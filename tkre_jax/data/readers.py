"""Readers for the raw relation-extraction formats; each returns `RelationInstance`s.

Supported formats (all read in place, UTF-8, an optional byte-order mark is ignored):

* FewRel 1.0 dict (`read_fewrel`): `{relation_id: [{"tokens", "h", "t"}, ...]}`.
* TACRED list or JSON lines (`read_tacred`): TACRED, Wiki80 and TKRE's `few_train.json`.
* SCDG synthetic instances, JSON lines (`read_scdg`): text with character offsets.
* EDKG explanations, JSON lines or a JSON list (`read_edkg`, `edkg_to_instance`).
* FewRel `pid2name.json` (`read_pid2name`) and Wiki80 `rel2id.json` (`read_rel2id`).

Every problem with the input raises `DataError` whose message names the file, the record
(its index; for JSON lines also its 1-based line number; for FewRel `relation[index]`) and
what is wrong. Nothing is skipped silently. Blank lines in a JSON-lines file hold no record
and are passed over (they do not count as records but line numbers stay those of the file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator, Literal, Optional, Sequence, Union, overload

from tkre_jax.data.schema import DataError, RelationInstance, from_char_offsets

PathLike = Union[str, "os.PathLike[str]"]

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


class _RecordError(DataError):
  """A `DataError` about one record; keeps the place (`where`) and the `problem` apart."""

  def __init__(self, where: str, problem: str):
    super().__init__(f"{where}: {problem}")
    self.where = where
    self.problem = problem


def _err(path: str, label: str, problem: str) -> _RecordError:
  return _RecordError(f"{path}, record {label}", problem)


# ------------------------------------------------------------------------------------------
# File loading


def _read_text(path: str) -> str:
  try:
    with open(path, "r", encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e})") from e
  except OSError as e:
    raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from e
  if not text.strip():
    raise DataError(f"{path}: the file is empty")
  return text


def _parse_document(path: str, text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} "
                    f"(character {e.pos}): {e.msg}") from e


@dataclasses.dataclass(frozen=True)
class _Raw:
  """One undecoded-or-decoded record of a list / JSON-lines file."""
  index: int
  label: str  # `3` for a JSON list, `3 (line 5)` for JSON lines.
  value: Any
  problem: Optional[str] = None  # set when the line is not valid JSON.


def _load_records(path: str) -> list[_Raw]:
  """Loads a JSON list or a JSON-lines file (chosen by the first non-space character)."""
  text = _read_text(path)
  first = text.lstrip()[0]
  if first == "[":
    doc = _parse_document(path, text)
    if not isinstance(doc, list):  # e.g. `[1] [2]` cannot parse; kept for safety.
      raise DataError(f"{path}: expected a JSON list of records, got {type(doc).__name__}")
    if not doc:
      raise DataError(f"{path}: the JSON list holds no records")
    return [_Raw(i, str(i), v) for i, v in enumerate(doc)]
  if first != "{":
    raise DataError(f"{path}: expected a JSON list or JSON lines (one object per line), but "
                    f"the file starts with {first!r}")
  records: list[_Raw] = []
  # Split on "\n" only: str.splitlines would also split on U+2028 etc., legal inside JSON strings.
  for lineno, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    label = f"{len(records)} (line {lineno})"
    try:
      records.append(_Raw(len(records), label, json.loads(line)))
    except json.JSONDecodeError as e:
      if not records:
        _raise_if_single_document(path, text)
      records.append(_Raw(len(records), label, None,
                          f"invalid JSON at column {e.colno}: {e.msg}"))
  return records


def _raise_if_single_document(path: str, text: str) -> None:
  try:
    doc = json.loads(text)
  except json.JSONDecodeError:
    return
  raise DataError(f"{path}: the file is a single multi-line JSON {type(doc).__name__}, "
                  "expected a JSON list of records or JSON lines (one object per line)")


# ------------------------------------------------------------------------------------------
# Field access with errors that name the record


def _require_keys(rec: Any, keys: Sequence[str], path: str, label: str) -> dict:
  if not isinstance(rec, dict):
    raise _err(path, label, f"expected a JSON object, got {_json_type(rec)}")
  missing = [k for k in keys if k not in rec]
  if missing:
    raise _err(path, label, "missing key(s) " + ", ".join(repr(k) for k in missing))
  return rec


def _json_type(v: Any) -> str:
  return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
          float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _str(rec: dict, key: str, path: str, label: str, *, optional: bool = False,
         nonblank: bool = True) -> Optional[str]:
  v = rec.get(key)
  if v is None and optional:
    return None
  if not isinstance(v, str):
    raise _err(path, label, f"{key!r} must be a string, got {_json_type(v)}")
  if nonblank and not v.strip():
    raise _err(path, label, f"{key!r} is empty")
  return v


def _int(rec: dict, key: str, path: str, label: str) -> int:
  v = rec[key]
  if isinstance(v, bool) or not isinstance(v, int):
    raise _err(path, label, f"{key!r} must be an integer, got {_json_type(v)} {v!r}")
  return v


def _tokens(v: Any, key: str, path: str, label: str) -> tuple[str, ...]:
  if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
    raise _err(path, label, f"{key!r} must be a list of strings")
  if not v:
    raise _err(path, label, f"{key!r} is an empty token list")
  return tuple(v)


def _check_no_overlap(subj: tuple[int, int], obj: tuple[int, int], path: str, label: str,
                      unit: str) -> None:
  if subj[0] < obj[1] and obj[0] < subj[1]:
    raise _err(path, label, f"subject {unit} span [{subj[0]}, {subj[1]}) and object {unit} "
                            f"span [{obj[0]}, {obj[1]}) overlap")


def _make(path: str, label: str, build) -> RelationInstance:
  """Runs `build()`; re-raises a schema `DataError` (a backstop) with the record named."""
  try:
    return build()
  except _RecordError:
    raise
  except DataError as e:
    raise _err(path, label, str(e)) from e


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
      is not an object of lists; an instance misses `tokens`, `h` or `t`, has malformed entities,
      positions out of range, or overlapping subject and object.
  """
  path = os.fspath(path)
  doc = _parse_document(path, _read_text(path))
  if not isinstance(doc, dict):
    raise DataError(f"{path}: expected a JSON object mapping relation ids to lists of "
                    f"instances (FewRel format), got a JSON {_json_type(doc)}")
  if not doc:
    raise DataError(f"{path}: the FewRel file holds no relations")
  out: dict[str, list[RelationInstance]] = {}
  for relation, items in doc.items():
    if not isinstance(items, list):
      raise DataError(f"{path}, relation {relation!r}: expected a list of instances, got a "
                      f"JSON {_json_type(items)}")
    out[relation] = [_fewrel_instance(path, relation, i, rec) for i, rec in enumerate(items)]
  return out


def _fewrel_span(ent: Any, key: str, n: int, path: str, label: str) -> tuple[int, int]:
  if not (isinstance(ent, list) and len(ent) >= 3 and isinstance(ent[2], list) and ent[2]
          and isinstance(ent[2][0], list) and ent[2][0]):
    raise _err(path, label, f"{key!r} must be [name, id, [[token positions], ...]] with a "
                            "non-empty first mention")
  pos = ent[2][0]
  if not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
    raise _err(path, label, f"{key!r} token positions must be integers, got {pos!r}")
  bad = [p for p in pos if not 0 <= p < n]
  if bad:
    raise _err(path, label, f"{key!r} token positions {bad} are out of range for {n} tokens")
  return min(pos), max(pos) + 1


def _fewrel_instance(path: str, relation: str, index: int, rec: Any) -> RelationInstance:
  label = f"{relation}[{index}]"
  rec = _require_keys(rec, ("tokens", "h", "t"), path, label)
  tokens = _tokens(rec["tokens"], "tokens", path, label)
  subj = _fewrel_span(rec["h"], "h", len(tokens), path, label)
  obj = _fewrel_span(rec["t"], "t", len(tokens), path, label)
  _check_no_overlap(subj, obj, path, label, "token")
  return _make(path, label, lambda: RelationInstance(
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
  for raw in _load_records(path):
    if raw.problem:
      raise _err(path, raw.label, raw.problem)
    out.append(_tacred_instance(path, raw, convert_brackets))
  return out


def _tacred_instance(path: str, raw: _Raw, convert_brackets: bool) -> RelationInstance:
  label = raw.label
  rec = _require_keys(raw.value, ("token", "relation", "subj_start", "subj_end", "obj_start",
                                  "obj_end"), path, label)
  tokens = _tokens(rec["token"], "token", path, label)
  if convert_brackets:
    tokens = tuple(PTB_BRACKETS.get(t, t) for t in tokens)
  relation = _str(rec, "relation", path, label)
  n = len(tokens)
  spans = []
  for name in ("subj", "obj"):
    s, e = _int(rec, f"{name}_start", path, label), _int(rec, f"{name}_end", path, label)
    if not 0 <= s <= e < n:
      raise _err(path, label, f"{name}_start/{name}_end [{s}, {e}] (inclusive) are out of "
                              f"range for {n} tokens")
    spans.append((s, e + 1))
  subj, obj = spans
  _check_no_overlap(subj, obj, path, label, "token")
  subj_type = _str(rec, "subj_type", path, label, optional=True)
  obj_type = _str(rec, "obj_type", path, label, optional=True)
  return _make(path, label, lambda: RelationInstance(
      tokens=tokens, subj=subj, obj=obj, relation=relation, subj_type=subj_type,
      obj_type=obj_type, source=f"{path}:{raw.index}", kind="gold"))


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
  for raw in _load_records(path):
    try:
      if raw.problem:
        raise _err(path, raw.label, raw.problem)
      out.append(_scdg_instance(path, raw))
    except _RecordError as e:
      if on_error == "raise":
        raise
      problems.append((e.where, e.problem))
  return out if on_error == "raise" else (out, problems)


def _scdg_instance(path: str, raw: _Raw) -> RelationInstance:
  label = raw.label
  rec = _require_keys(raw.value, ("text", "subj", "subj_start", "subj_end", "obj", "obj_start",
                                  "obj_end", "relation"), path, label)
  text = _str(rec, "text", path, label)
  relation = _str(rec, "relation", path, label)
  n = len(text)
  spans = []
  for name, what in (("subj", "subject"), ("obj", "object")):
    ent = _str(rec, name, path, label)
    s, e = _int(rec, f"{name}_start", path, label), _int(rec, f"{name}_end", path, label)
    if not 0 <= s < e <= n:
      raise _err(path, label, f"{what} character offsets [{s}, {e}) are out of range for a "
                              f"text of {n} characters")
    if text[s:e] != ent:
      raise _err(path, label, f"{what} text {ent!r} does not match text[{s}:{e}] = "
                              f"{text[s:e]!r}")
    spans.append((s, e))
  (ss, se), (os_, oe) = spans
  _check_no_overlap((ss, se), (os_, oe), path, label, "character")
  subj_type = _str(rec, "subj_type", path, label, optional=True)
  obj_type = _str(rec, "obj_type", path, label, optional=True)
  return _make(path, label, lambda: from_char_offsets(
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
  for raw in _load_records(path):
    label = raw.label
    if raw.problem:
      raise _err(path, label, raw.problem)
    rec = _require_keys(raw.value, ("relation", "subject", "object", "generated_text"), path,
                        label)
    out.append(EdkgRecord(
        relation=_str(rec, "relation", path, label),
        subject=_str(rec, "subject", path, label),
        object=_str(rec, "object", path, label),
        context=_str(rec, "context", path, label, optional=True, nonblank=False),
        generated_text=_str(rec, "generated_text", path, label, nonblank=False),
        source=f"{path}:{raw.index}"))
  return out


def _occurrences(needle: str, haystack: str) -> list[tuple[int, int, bool]]:
  """All case-insensitive occurrences (overlapping ones too) as (start, end, whole_word)."""
  pattern = re.compile("(?=(" + _entity_pattern(needle) + "))", re.IGNORECASE)
  out = []
  for m in pattern.finditer(haystack):
    s, e = m.start(1), m.end(1)
    whole = ((s == 0 or not _is_word(haystack[s - 1]) or not _is_word(haystack[s]))
             and (e == len(haystack) or not _is_word(haystack[e]) or not _is_word(haystack[e - 1])))
    out.append((s, e, whole))
  return out


def _entity_pattern(entity: str) -> str:
  """Regex for `entity` whose inner whitespace matches any whitespace, or none next to
  punctuation (so the TACRED-tokenized `June 3 , 1931` matches `June 3, 1931`)."""
  words = entity.split()
  parts = [re.escape(words[0])]
  for prev, word in zip(words, words[1:]):
    glue = r"\s+" if _is_word(prev[-1]) and _is_word(word[0]) else r"\s*"
    parts.append(glue + re.escape(word))
  return "".join(parts)


def _is_word(c: str) -> bool:
  return c.isalnum() or c == "_"


def find_entity_pair(text: str, subject: str,
                     obj: str) -> Optional[tuple[tuple[int, int], tuple[int, int]]]:
  """Locates a subject and an object mention in `text` by case-insensitive search.

  Whitespace inside an entity matches any run of whitespace, and may be absent next to
  punctuation (TACRED-tokenized entities such as `Columbia 's` match `Columbia's`).
  Among all pairs of non-overlapping occurrences, picks the one with (1) the most whole-word
  matches (an occurrence is whole-word when it is not glued to letters/digits on either side),
  then (2) the smallest gap between the two, then (3) the earliest start.

  Returns:
    `((subj_start, subj_end), (obj_start, obj_end))` end-exclusive character offsets, or None
    when either entity is blank or not found, or no non-overlapping pair exists.
  """
  if not subject.strip() or not obj.strip():
    return None
  subs, objs = _occurrences(subject, text), _occurrences(obj, text)
  best, best_key = None, None
  for ss, se, sw in subs:
    for os_, oe, ow in objs:
      if ss < oe and os_ < se:
        continue
      gap = max(os_ - se, ss - oe)
      key = (int(not sw) + int(not ow), gap, min(ss, os_), ss)
      if best_key is None or key < best_key:
        best, best_key = ((ss, se), (os_, oe)), key
  return best


def edkg_to_instance(record: EdkgRecord) -> Optional[RelationInstance]:
  """Turns an explanation into a relation instance over its `generated_text`.

  The subject and object are located inside `generated_text` with `find_entity_pair`
  (case-insensitive, whole-word matches preferred, the closest non-overlapping pair) and the
  text is tokenized with `schema.from_char_offsets(..., kind="edkg")`; entity types are None.

  Returns:
    The `RelationInstance` (source `record.source`), or None when the subject or the object
    cannot be found (the caller counts and reports these, see `edkg_to_instances`).
  """
  pair = find_entity_pair(record.generated_text, record.subject, record.object)
  if pair is None:
    return None
  (ss, se), (os_, oe) = pair
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


# ------------------------------------------------------------------------------------------
# Label files


def read_pid2name(path: PathLike) -> dict[str, tuple[str, str]]:
  """Reads FewRel's `pid2name.json`: `{property_id: [name, description]}`.

  Returns:
    property id -> (name, description), in file order.

  Raises:
    DataError: unreadable, empty or invalid JSON, not an object, or an entry that is not a
      list of two strings.
  """
  path = os.fspath(path)
  doc = _parse_document(path, _read_text(path))
  if not isinstance(doc, dict):
    raise DataError(f"{path}: expected a JSON object of id -> [name, description], got a "
                    f"JSON {_json_type(doc)}")
  out = {}
  for pid, v in doc.items():
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)):
      raise _err(path, repr(pid), f"expected [name, description] (two strings), got {v!r}")
    out[pid] = (v[0], v[1])
  return out


def read_rel2id(path: PathLike) -> dict[str, int]:
  """Reads a `rel2id.json` label map: `{relation: id}`.

  Returns:
    relation -> id, in file order.

  Raises:
    DataError: unreadable, empty or invalid JSON, not an object, an id that is not a
      non-negative integer, or two relations with the same id.
  """
  path = os.fspath(path)
  doc = _parse_document(path, _read_text(path))
  if not isinstance(doc, dict):
    raise DataError(f"{path}: expected a JSON object of relation -> id, got a JSON "
                    f"{_json_type(doc)}")
  seen: dict[int, str] = {}
  for rel, i in doc.items():
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
      raise _err(path, repr(rel), f"id must be a non-negative integer, got {i!r}")
    if i in seen:
      raise _err(path, repr(rel), f"id {i} is also used by {seen[i]!r}")
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
  text = _read_text(path)
  stripped = text.lstrip()
  first: Any = None
  if stripped[0] == "[":
    doc = _parse_document(path, text)
    first = doc[0] if isinstance(doc, list) and doc else None
  elif stripped[0] == "{":
    line = stripped.split("\n", 1)[0]
    try:
      first = json.loads(line)
    except json.JSONDecodeError:
      first = _parse_document(path, text)  # a multi-line (pretty-printed) JSON object.
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


def iter_relations(data: dict[str, list[RelationInstance]]) -> Iterator[RelationInstance]:
  """Flattens a relation -> instances dict into one stream, relations in dict order.

  Returns:
    an iterator over the instances.
  """
  for items in data.values():
    yield from items
