"""JSON and JSON-lines record files, read with errors that name the file and the record.

Shared by the readers of `tkre_jax.data.readers` (FewRel, TACRED, label files) and
`tkre_jax.data.llm_files` (EDKG, SCDG). A record is named by its index; for JSON lines also by its
1-based line number (`3 (line 5)`). Every problem raises `DataError` (`RecordError` for one
record, which keeps the place and the problem apart so that a reader can collect it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence, Union

from tkre_jax.data.schema import DataError, RelationInstance

PathLike = Union[str, "os.PathLike[str]"]


class RecordError(DataError):
  """A `DataError` about one record; keeps the place (`where`) and the `problem` apart."""

  def __init__(self, where: str, problem: str):
    super().__init__(f"{where}: {problem}")
    self.where = where
    self.problem = problem


def record_error(path: str, label: str, problem: str) -> RecordError:
  """The error for record `label` of file `path`: `<path>, record <label>: <problem>`."""
  return RecordError(f"{path}, record {label}", problem)


# ------------------------------------------------------------------------------------------
# File loading


def read_text(path: str) -> str:
  """Reads a UTF-8 file (an optional byte-order mark is dropped).

  Raises:
    DataError: the file is unreadable, not UTF-8, or blank.
  """
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


def read_json(path: str) -> Any:
  """Reads and parses a whole JSON file (`read_text` then `parse_document`)."""
  return parse_document(path, read_text(path))


def parse_document(path: str, text: str) -> Any:
  """Parses `text` (the content of `path`) as one JSON document.

  Raises:
    DataError: invalid JSON, with the line, column and character position.
  """
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} "
                    f"(character {e.pos}): {e.msg}") from e


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """One undecoded-or-decoded record of a list / JSON-lines file."""
  index: int
  label: str  # `3` for a JSON list, `3 (line 5)` for JSON lines.
  value: Any
  problem: Optional[str] = None  # set when the line is not valid JSON.
  line: Optional[int] = None  # 1-based line of a JSON-lines record (None in a JSON list).


def load_records(path: str) -> list[RawRecord]:
  """Loads a JSON list or a JSON-lines file (chosen by the first non-space character).

  Blank lines of a JSON-lines file hold no record (line numbers in labels stay those of the
  file). A line that is not valid JSON becomes a `RawRecord` with `problem` set, so that a
  reader may raise or collect it.

  Raises:
    DataError: unreadable or empty file, an invalid or empty JSON list, a file that is neither a
      list nor JSON lines, or a single multi-line JSON object.
  """
  text = read_text(path)
  first = text.lstrip()[0]
  if first == "[":
    doc = parse_document(path, text)
    if not isinstance(doc, list):  # e.g. `[1] [2]` cannot parse; kept for safety.
      raise DataError(f"{path}: expected a JSON list of records, got {type(doc).__name__}")
    if not doc:
      raise DataError(f"{path}: the JSON list holds no records")
    return [RawRecord(i, str(i), v) for i, v in enumerate(doc)]
  if first != "{":
    raise DataError(f"{path}: expected a JSON list or JSON lines (one object per line), but "
                    f"the file starts with {first!r}")
  records: list[RawRecord] = []
  # Split on "\n" only: str.splitlines would also split on U+2028 etc., legal inside JSON strings.
  for lineno, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    label = f"{len(records)} (line {lineno})"
    try:
      records.append(RawRecord(len(records), label, json.loads(line), line=lineno))
    except json.JSONDecodeError as e:
      if not records:
        _raise_if_single_document(path, text)
      records.append(RawRecord(len(records), label, None,
                               f"invalid JSON at column {e.colno}: {e.msg}", line=lineno))
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


def require_keys(rec: Any, keys: Sequence[str], path: str, label: str) -> dict:
  """Returns `rec` when it is an object holding every key of `keys`.

  Raises:
    RecordError: `rec` is not an object, or misses keys (all are named).
  """
  if not isinstance(rec, dict):
    raise record_error(path, label, f"expected a JSON object, got {json_type(rec)}")
  missing = [k for k in keys if k not in rec]
  if missing:
    raise record_error(path, label, "missing key(s) " + ", ".join(repr(k) for k in missing))
  return rec


def json_type(v: Any) -> str:
  """The JSON name of the type of a decoded value (`object`, `list`, `string`, ...)."""
  return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
          float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def get_str(rec: dict, key: str, path: str, label: str, *, optional: bool = False,
            nonblank: bool = True) -> Optional[str]:
  """Field `key` of `rec` as a string (None when absent or null and `optional`).

  Raises:
    RecordError: not a string, or blank when `nonblank`.
  """
  v = rec.get(key)
  if v is None and optional:
    return None
  if not isinstance(v, str):
    raise record_error(path, label, f"{key!r} must be a string, got {json_type(v)}")
  if nonblank and not v.strip():
    raise record_error(path, label, f"{key!r} is empty")
  return v


def get_int(rec: dict, key: str, path: str, label: str) -> int:
  """Field `key` of `rec` as an integer (booleans are refused).

  Raises:
    RecordError: not an integer.
  """
  v = rec[key]
  if isinstance(v, bool) or not isinstance(v, int):
    raise record_error(path, label, f"{key!r} must be an integer, got {json_type(v)} {v!r}")
  return v


def get_tokens(v: Any, key: str, path: str, label: str) -> tuple[str, ...]:
  """A non-empty token list (field `key`) as a tuple of strings.

  Raises:
    RecordError: not a list of strings, or empty.
  """
  if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
    raise record_error(path, label, f"{key!r} must be a list of strings")
  if not v:
    raise record_error(path, label, f"{key!r} is an empty token list")
  return tuple(v)


def check_no_overlap(subj: tuple[int, int], obj: tuple[int, int], path: str, label: str,
                     unit: str) -> None:
  """Raises `RecordError` when the end-exclusive spans overlap (`unit`: token / character)."""
  if subj[0] < obj[1] and obj[0] < subj[1]:
    raise record_error(path, label, f"subject {unit} span [{subj[0]}, {subj[1]}) and object "
                                    f"{unit} span [{obj[0]}, {obj[1]}) overlap")


def build_instance(path: str, label: str, build) -> RelationInstance:
  """Runs `build()`; re-raises a schema `DataError` (a backstop) with the record named."""
  try:
    return build()
  except RecordError:
    raise
  except DataError as e:
    raise record_error(path, label, str(e)) from e
