"""The one record type every reader produces and every later stage consumes.

A `RelationInstance` is a tokenized sentence with a subject (head) entity span and an
object (tail) entity span, both as end-exclusive token index ranges into `tokens`, plus the
relation label. Readers of text-with-character-offsets formats (SCDG, EDKG) split the text so
that entity boundaries fall on token boundaries; see `from_char_offsets`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence


class DataError(ValueError):
  """Bad input data. The message names the file, the record and what is wrong."""


@dataclasses.dataclass(frozen=True)
class RelationInstance:
  """One relation mention.

  Attributes:
    tokens: the sentence as a tuple of word tokens (no sub-words).
    subj: (start, end) end-exclusive token span of the subject (head) entity.
    obj: (start, end) end-exclusive token span of the object (tail) entity.
    relation: the relation label as named by the data set (e.g. `P177`, `org:founded_by`).
    subj_type: optional entity type of the subject (`PERSON`, `human`, ...).
    obj_type: optional entity type of the object.
    source: where the record came from, `<file>:<record index>`; used in error messages.
    kind: `gold` (human-annotated), `edkg` (LLM explanation) or `scdg` (LLM synthetic).
  """

  tokens: tuple[str, ...]
  subj: tuple[int, int]
  obj: tuple[int, int]
  relation: str
  subj_type: Optional[str] = None
  obj_type: Optional[str] = None
  source: str = ""
  kind: str = "gold"

  def __post_init__(self):
    validate_spans(self.tokens, self.subj, self.obj, self.source or "<instance>")

  @property
  def text(self) -> str:
    """The sentence as space-joined tokens."""
    return " ".join(self.tokens)

  @property
  def subj_text(self) -> str:
    return " ".join(self.tokens[self.subj[0]:self.subj[1]])

  @property
  def obj_text(self) -> str:
    return " ".join(self.tokens[self.obj[0]:self.obj[1]])


def validate_spans(tokens: Sequence[str], subj: tuple[int, int], obj: tuple[int, int],
                   where: str) -> None:
  """Checks that both spans are non-empty, inside `tokens` and do not overlap.

  Raises:
    DataError: naming `where` and the problem.
  """
  n = len(tokens)
  if n == 0:
    raise DataError(f"{where}: empty token list")
  for name, (s, e) in (("subject", subj), ("object", obj)):
    if not (0 <= s < e <= n):
      raise DataError(f"{where}: {name} span [{s}, {e}) is out of range for {n} tokens")
  if subj[0] < obj[1] and obj[0] < subj[1]:
    raise DataError(f"{where}: subject span {list(subj)} and object span {list(obj)} overlap")


_WS = re.compile(r"\S+")


def _split_words(text: str) -> list[str]:
  return _WS.findall(text)


def from_char_offsets(text: str, subj_start: int, subj_end: int, obj_start: int, obj_end: int,
                      relation: str, *, subj_type: Optional[str] = None,
                      obj_type: Optional[str] = None, source: str = "",
                      kind: str = "gold") -> RelationInstance:
  """Builds an instance from raw text and end-exclusive character offsets.

  The text is cut at the four entity boundaries and each piece is split on whitespace, so the
  entities always start and end on token boundaries (e.g. `Paris's` with the entity `Paris`
  gives the tokens `Paris`, `'s`).

  Raises:
    DataError: offsets out of range, empty or overlapping entities.
  """
  where = source or "<text>"
  n = len(text)
  for name, (s, e) in (("subject", (subj_start, subj_end)), ("object", (obj_start, obj_end))):
    if not (0 <= s < e <= n):
      raise DataError(f"{where}: {name} character offsets [{s}, {e}) are out of range for "
                      f"a text of {n} characters")
    if not text[s:e].strip():
      raise DataError(f"{where}: {name} character span [{s}, {e}) is blank")
  if subj_start < obj_end and obj_start < subj_end:
    raise DataError(f"{where}: subject [{subj_start}, {subj_end}) and object "
                    f"[{obj_start}, {obj_end}) character spans overlap")
  first, second = sorted([("s", subj_start, subj_end), ("o", obj_start, obj_end)],
                         key=lambda x: x[1])
  pieces = [
      (None, text[:first[1]]),
      (first[0], text[first[1]:first[2]]),
      (None, text[first[2]:second[1]]),
      (second[0], text[second[1]:second[2]]),
      (None, text[second[2]:]),
  ]
  tokens: list[str] = []
  spans = {}
  for tag, piece in pieces:
    words = _split_words(piece)
    if tag is not None:
      spans[tag] = (len(tokens), len(tokens) + len(words))
    tokens.extend(words)
  return RelationInstance(tokens=tuple(tokens), subj=spans["s"], obj=spans["o"],
                          relation=relation, subj_type=subj_type, obj_type=obj_type,
                          source=source, kind=kind)
