"""Input of relation prediction: plain-text records, and the gold formats the readers know.

A prediction record (a dict; one JSON object per line of a JSON-lines file):

    {"text": "Bill Gates founded Microsoft in 1975.",
     "subject": "Bill Gates",                       # a string to find in the text, or
     "object": {"start": 19, "end": 28},            # a character span, end exclusive
     "subject_type": "PERSON", "object_type": "ORGANIZATION",   # optional
     "id": "doc-1/7",                               # optional, echoed in the output
     "relation": "org:founded_by"}                  # optional gold label, echoed as `gold`

An entity string must occur exactly once in the text: whole-word occurrences are counted first
(`Paris` in `Paris and Parisians` is found once), and a string that occurs nowhere, or more than
once, is an error for that record (give a span instead). The text is cut into words at whitespace
and at the four entity boundaries (`schema.from_char_offsets`), then featurized like every
training instance, so a span and the same entity as a string give the same prediction.

`read_input` also reads the TACRED-format (TACRED, Wiki80, TKRE's files) and FewRel files of
`tkre_jax.data.readers`. A bad record of a JSON-lines or JSON-list file becomes an `InputItem`
with its error (and line number) and the others are still read; a FewRel file is read whole.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from tkre_jax.data import readers
from tkre_jax.data.json_records import json_type, load_records, read_text
from tkre_jax.data.schema import DataError, RelationInstance, from_char_offsets
from tkre_jax.text import find_mentions

RECORD_KEYS = ("text", "subject", "object", "subject_type", "object_type", "id", "relation")
SPAN_KEYS = ("start", "end")


@dataclasses.dataclass(frozen=True)
class InputItem:
  """One input record, read or not.

  Attributes:
    index: 0-based position of the record in its input.
    line: 1-based line of a JSON-lines record (None otherwise).
    id: the record's `id` (or, for the gold formats, its `source`), None when absent.
    instance: the instance to predict (None when the record is bad).
    error: why the record cannot be predicted (None when it can).
    gold: the record's gold relation, when it has one.
  """
  index: int
  line: Optional[int]
  id: Any
  instance: Optional[RelationInstance] = None
  error: Optional[str] = None
  gold: Optional[str] = None


def entity_span(text: str, value: Any, name: str) -> tuple[int, int]:
  """The end-exclusive character span of entity `name` (`subject` / `object`) in `text`.

  Args:
    value: `{"start": int, "end": int}` or a string that occurs exactly once in `text`.

  Raises:
    DataError: a span with other keys, non-integer or out-of-range offsets, or a blank span; a
      string that is blank, absent from the text, or found more than once; any other type.
  """
  if isinstance(value, Mapping):
    keys = set(value)
    if keys != set(SPAN_KEYS):
      raise DataError(f"{name} span must have exactly the keys 'start' and 'end' (end exclusive), "
                      f"got {sorted(keys)}")
    start, end = value["start"], value["end"]
    for k, v in (("start", start), ("end", end)):
      if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(f"{name}.{k} must be an integer, got a JSON {json_type(v)}")
    if not 0 <= start < end <= len(text):
      raise DataError(f"{name} span [{start}, {end}) is out of range for a text of {len(text)} "
                      "characters")
    if not text[start:end].strip():
      raise DataError(f"{name} span [{start}, {end}) is blank")
    return start, end
  if isinstance(value, str):
    if not value.strip():
      raise DataError(f"{name} is a blank string")
    mentions = find_mentions(text, value)
    whole = [m for m in mentions if m.whole_word]
    found = whole or mentions
    if not found:
      raise DataError(f"{name} {value!r} does not occur in the text")
    if len(found) > 1:
      where = ", ".join(f"[{m.start}, {m.end})" for m in found[:5])
      raise DataError(f"{name} {value!r} is ambiguous: it occurs {len(found)} times (characters "
                      f"{where}); give a span {{\"start\": ..., \"end\": ...}} instead")
    return found[0].start, found[0].end
  raise DataError(f"{name} must be a string or a span {{\"start\", \"end\"}}, got a JSON "
                  f"{json_type(value)}")


def _optional_str(rec: Mapping[str, Any], key: str) -> Optional[str]:
  v = rec.get(key)
  if v is not None and not isinstance(v, str):
    raise DataError(f"{key} must be a string, got a JSON {json_type(v)}")
  return v or None


def record_instance(rec: Any, source: str = "") -> RelationInstance:
  """The instance of one prediction record (see the module docstring).

  Args:
    rec: the record.
    source: where it comes from (`file:line`), kept in the instance for later errors.

  Raises:
    DataError: not an object, unknown keys, a missing, empty or mistyped field, an entity that
      cannot be found or is ambiguous, a span out of range, overlapping entities.
  """
  if not isinstance(rec, Mapping):
    raise DataError(f"a record must be a JSON object, got a JSON {json_type(rec)}")
  unknown = sorted(set(rec) - set(RECORD_KEYS))
  if unknown:
    raise DataError(f"unknown field(s) {unknown}; a record has {', '.join(RECORD_KEYS)}")
  for key in ("text", "subject", "object"):
    if key not in rec:
      raise DataError(f"missing field {key!r}")
  text = rec["text"]
  if not isinstance(text, str):
    raise DataError(f"text must be a string, got a JSON {json_type(text)}")
  if not text.strip():
    raise DataError("text is empty")
  rid = rec.get("id")
  if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
    raise DataError(f"id must be a string or an integer, got a JSON {json_type(rid)}")
  s = entity_span(text, rec["subject"], "subject")
  o = entity_span(text, rec["object"], "object")
  if s[0] < o[1] and o[0] < s[1]:
    raise DataError(f"subject [{s[0]}, {s[1]}) and object [{o[0]}, {o[1]}) overlap")
  return from_char_offsets(text, s[0], s[1], o[0], o[1], _optional_str(rec, "relation") or "",
                           subj_type=_optional_str(rec, "subject_type"),
                           obj_type=_optional_str(rec, "object_type"), source=source)


def record_item(rec: Any, index: int, line: Optional[int] = None, source: str = "") -> InputItem:
  """`record_instance` as an `InputItem`: the error instead of an exception."""
  rid = rec.get("id") if isinstance(rec, Mapping) else None
  try:
    inst = record_instance(rec, source)
  except DataError as e:
    return InputItem(index, line, rid, error=str(e))
  return InputItem(index, line, rid, inst, gold=inst.relation or None)


def _gold_item(index: int, line: Optional[int], inst: RelationInstance) -> InputItem:
  return InputItem(index, line, inst.source, inst, gold=inst.relation)


def read_input(path: os.PathLike | str) -> tuple[str, list[InputItem]]:
  """Reads a prediction input file, detecting its format.

  Formats: prediction records (`text` + `subject` + `object`) as JSON lines or a JSON list;
  TACRED-format records (`token`, ...: TACRED, Wiki80, TKRE) likewise; a FewRel dict file. The
  first record decides the format of a list or JSON-lines file.

  Returns:
    `(format, items)`: format "records", "tacred" or "fewrel"; one item per record in file order,
    bad records with their `error` (and `line` for JSON lines).

  Raises:
    DataError: the file cannot be read, is empty or not JSON, its format is none of these, or (a
      FewRel file) it holds a bad instance.
  """
  path = os.fspath(path)
  if _is_fewrel(path):
    flat = [inst for insts in readers.read_fewrel(path).values() for inst in insts]
    return "fewrel", [_gold_item(i, None, inst) for i, inst in enumerate(flat)]
  raws = load_records(path)
  first = next((r.value for r in raws if isinstance(r.value, Mapping)), None)
  if first is not None and "token" in first:
    items = []
    for r in raws:
      try:
        if r.problem:
          raise DataError(r.problem)
        items.append(_gold_item(r.index, r.line, readers.tacred_instance(path, r)))
      except DataError as e:
        items.append(InputItem(r.index, r.line, None, error=str(e)))
    return "tacred", items
  if first is not None and "text" in first:
    return "records", [
        InputItem(r.index, r.line, None, error=r.problem) if r.problem else
        record_item(r.value, r.index, r.line, f"{path}:{r.line or r.index}") for r in raws]
  raise DataError(f"{path}: unknown input format: expected prediction records (text, subject, "
                  "object), TACRED-format records (token, subj_start, ...) or a FewRel file; "
                  f"first record: {str(first)[:80]!r}")


def _is_fewrel(path: str) -> bool:
  if not read_text(path).lstrip().startswith("{"):
    return False
  try:
    return readers.detect_format(path) == "fewrel"
  except DataError:  # JSON lines of other records
    return False
