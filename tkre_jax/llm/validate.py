"""Validation of LLM generations (EDKG explanations and SCDG instances).

Every candidate either becomes an output record or a `Rejection` with one reason from
`REASONS`; nothing is dropped silently. The checks, in order (the first failure is the reason):

SCDG instance (from the model, or a record of a pre-generated file):
  structure (`malformed_instance`, `malformed_record`), relation in the schema
  (`unknown_relation`), non-empty text (`empty_text`), subject and object present verbatim in
  the text (`subject_not_in_text`, `object_not_in_text`; offsets are computed here, preferring
  whole-word matches; a match only inside a longer word is `entity_not_whole_word`), a record's
  own offsets matching its entity strings (`offset_mismatch`), different entities
  (`same_entity`), non-overlapping spans (`entity_overlap`), spans usable by
  `schema.from_char_offsets` (`invalid_span`), types in the allowed list when one is given
  (`type_not_allowed`), no leakage into dev/test (`leak_equal`, `leak_ngram`), not a copy of a
  training sentence (`copies_train`), not a duplicate of an earlier accepted instance
  (`duplicate`).

EDKG explanation:
  structure (`malformed_record`), relation in the schema (`unknown_relation`), non-empty
  explanation (`empty_explanation`), the explanation names the subject and the object
  (`explanation_missing_subject`, `explanation_missing_object`, `explanation_entity_overlap`;
  case-insensitive, whitespace-tolerant), no leakage (`leak_equal`, `leak_ngram`; n-grams that
  also occur in the explanation's own seed context are not counted), no duplicate.

Whole responses can fail before any instance is seen: `refusal`, `truncated_output`
(`stop_reason == "max_tokens"`), `no_structured_output`, `malformed_output` (not valid JSON or
not the requested object), and in batch mode `request_errored`.

Leakage: `tkre_jax.text.LeakageIndex` (texts normalised by `tkre_jax.text.normalize_text`, so
`Bridge.` and `Bridge .` compare equal); a text equal to a dev/test text after this normalisation is
`leak_equal`; a text sharing any run of `n` consecutive words (punctuation ignored) with a dev/test
text is `leak_ngram`. Entity search: `tkre_jax.text.find_mentions` and `best_pair`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from tkre_jax.data.schema import DataError, from_char_offsets
from tkre_jax.text import LeakageIndex, best_pair, find_mentions, normalize_text

REASONS = (
    "refusal", "truncated_output", "no_structured_output", "malformed_output", "request_errored",
    "malformed_instance", "malformed_record", "unknown_relation", "empty_text",
    "subject_not_in_text", "object_not_in_text", "entity_not_whole_word", "offset_mismatch",
    "same_entity", "entity_overlap", "invalid_span", "type_not_allowed", "leak_equal",
    "leak_ngram", "copies_train", "duplicate", "excess_instance", "empty_explanation",
    "explanation_missing_subject", "explanation_missing_object", "explanation_entity_overlap",
)

SCDG_KEYS = ("text", "subj", "subj_start", "subj_end", "obj", "obj_start", "obj_end", "subj_type",
             "obj_type", "relation")
EDKG_KEYS = ("relation", "subject", "object", "context", "generated_text")


@dataclasses.dataclass(frozen=True)
class Rejection:
  """One rejected generation.

  Attributes:
    kind: `edkg` or `scdg`.
    reason: one of `REASONS`.
    where: which request / instance / file record it was.
    detail: a human-readable explanation.
    record: the rejected candidate (as generated), or None when there was none.
  """

  kind: str
  reason: str
  where: str
  detail: str
  record: Optional[Any] = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class OutputError(ValueError):
  """A response with no usable structured output; `reason` is one of `REASONS`."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


# ------------------------------------------------------------------------------------------
# Structured output


def parse_structured_output(message: Mapping[str, Any], tool_name: str) -> dict[str, Any]:
  """Extracts the structured answer from a Messages API response (as a JSON dict).

  A `tool_use` block named `tool_name` wins (its `input`); otherwise the concatenated `text`
  blocks are parsed as JSON (structured outputs via `output_config.format`). Thinking blocks
  are ignored.

  Returns:
    the answer object.

  Raises:
    OutputError: reason `refusal`, `truncated_output`, `no_structured_output` or
      `malformed_output`.
  """
  stop = message.get("stop_reason")
  if stop == "refusal":
    raise OutputError("refusal", "the model refused (stop_reason 'refusal')")
  if stop == "max_tokens":
    raise OutputError("truncated_output", "the answer hit max_tokens and is incomplete")
  content = message.get("content")
  if not isinstance(content, list):
    raise OutputError("malformed_output", "response has no content list")
  texts = []
  for block in content:
    if not isinstance(block, Mapping):
      continue
    if block.get("type") == "tool_use" and block.get("name") == tool_name:
      value = block.get("input")
      if isinstance(value, str):  # tolerate a JSON-encoded string
        try:
          value = json.loads(value)
        except json.JSONDecodeError as e:
          raise OutputError("malformed_output", f"tool input is not valid JSON: {e}") from None
      if not isinstance(value, dict):
        raise OutputError("malformed_output",
                          f"tool input is a {type(value).__name__}, not an object")
      return value
    if block.get("type") == "text" and isinstance(block.get("text"), str):
      texts.append(block["text"])
  text = "".join(texts).strip()
  if not text:
    raise OutputError("no_structured_output",
                      f"no {tool_name!r} tool_use block and no JSON text in the response")
  if text.startswith("```"):  # tolerate a fenced block
    text = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", text)
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise OutputError("malformed_output", f"text answer is not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise OutputError("malformed_output", f"answer is a JSON {type(value).__name__}, not an object")
  return value


# ------------------------------------------------------------------------------------------
# The validator


def _structure_problem(value: Any, noun: str, str_keys: Sequence[str]) -> Optional[str]:
  """Why `value` is not an object with a string at each of `str_keys`, or None when it is."""
  if not isinstance(value, Mapping):
    return f"{noun} is a {type(value).__name__}, not an object"
  for k in str_keys:
    if not isinstance(value.get(k), str):
      return f"field {k!r} is missing or not a string"
  return None


class Validator:
  """Validates EDKG and SCDG candidates and keeps the duplicate sets across calls.

  Args:
    schema: relation id -> (name, description).
    leakage: the dev/test index.
    entity_types: allowed entity types (compared case-insensitively; the list's spelling is
      written out); empty for no constraint (types are then optional).
    train_texts: the seed (training) sentences; an SCDG text equal to one is `copies_train`.
  """

  def __init__(self, schema: Mapping[str, Any], leakage: LeakageIndex,
               entity_types: Sequence[str] = (), train_texts: Iterable[str] = ()):
    self.schema = schema
    self.leakage = leakage
    self.entity_types = {t.lower(): t for t in entity_types}
    self._train = {normalize_text(t) for t in train_texts}
    self._seen_scdg: set[tuple[str, str, str]] = set()
    self._seen_edkg: set[str] = set()

  # -- SCDG ---------------------------------------------------------------------------------

  def _type(self, value: Any, which: str) -> tuple[Optional[str], Optional[tuple[str, str]]]:
    if value is not None and not isinstance(value, str):
      return None, ("malformed_instance", f"{which} type is a {type(value).__name__}")
    value = (value or "").strip() or None
    if not self.entity_types:
      return value, None
    if value is None:
      return None, ("type_not_allowed", f"{which} type is missing; allowed: "
                                        f"{sorted(self.entity_types.values())}")
    canon = self.entity_types.get(value.lower())
    if canon is None:
      return None, ("type_not_allowed", f"{which} type {value!r} is not in the allowed list "
                                        f"{sorted(self.entity_types.values())}")
    return canon, None

  def _finish_scdg(self, text: str, subj: tuple[int, int], obj: tuple[int, int],
                   subj_type: Any, obj_type: Any, relation: str, where: str, raw: Any,
                   malformed: str) -> tuple[Optional[dict], Optional[Rejection]]:
    def reject(reason, detail):
      return None, Rejection("scdg", reason, where, detail, raw)

    subj_text, obj_text = text[subj[0]:subj[1]], text[obj[0]:obj[1]]
    if subj_text.strip().lower() == obj_text.strip().lower():
      return reject("same_entity", f"subject and object are the same entity {subj_text!r}")
    if subj[0] < obj[1] and obj[0] < subj[1]:
      return reject("entity_overlap", f"subject {subj_text!r} {list(subj)} and object "
                                      f"{obj_text!r} {list(obj)} overlap")
    try:
      from_char_offsets(text, subj[0], subj[1], obj[0], obj[1], relation, source=where,
                        kind="scdg")
    except DataError as e:
      return reject("invalid_span", str(e))
    st, problem = self._type(subj_type, "subject")
    if problem is None:
      ot, problem = self._type(obj_type, "object")
    if problem is not None:
      reason, detail = problem
      return reject(malformed if reason == "malformed_instance" else reason, detail)
    leak = self.leakage.check(text)
    if leak is not None:
      return reject(*leak)
    norm = normalize_text(text)
    if norm in self._train:
      return reject("copies_train", "text equals a training (seed) sentence")
    key = (norm, subj_text.lower(), obj_text.lower())
    if key in self._seen_scdg:
      return reject("duplicate", "same text, subject and object as an earlier instance")
    self._seen_scdg.add(key)
    record = {"text": text, "subj": subj_text, "subj_start": subj[0], "subj_end": subj[1],
              "obj": obj_text, "obj_start": obj[0], "obj_end": obj[1], "subj_type": st,
              "obj_type": ot, "relation": relation}
    return record, None

  def scdg_candidate(self, cand: Any, relation: str,
                     where: str) -> tuple[Optional[dict], Optional[Rejection]]:
    """Validates one instance generated by the model for `relation`.

    Args:
      cand: the instance object from the structured answer (`text, subject, object,
        subject_type, object_type`).
      relation: the relation it was requested for.
      where: a label for messages (request and instance index).

    Returns:
      `(record, None)` with the SCDG output record (offsets computed here), or
      `(None, rejection)`.
    """
    def reject(reason, detail):
      return None, Rejection("scdg", reason, where, detail, cand)

    problem = _structure_problem(cand, "instance", ("text", "subject", "object"))
    if problem is not None:
      return reject("malformed_instance", problem)
    if relation not in self.schema:
      return reject("unknown_relation", f"relation {relation!r} is not in the schema")
    text, subj, obj = cand["text"], cand["subject"], cand["object"]
    if not text.strip():
      return reject("empty_text", "text is blank")
    if not subj.strip():
      return reject("subject_not_in_text", "subject is blank")
    if not obj.strip():
      return reject("object_not_in_text", "object is blank")
    subs, objs = find_mentions(text, subj), find_mentions(text, obj)
    if not subs:
      return reject("subject_not_in_text", f"subject {subj!r} does not occur verbatim in the text")
    if not objs:
      return reject("object_not_in_text", f"object {obj!r} does not occur verbatim in the text")
    if subj.strip().lower() == obj.strip().lower():
      return reject("same_entity", f"subject and object are the same entity {subj!r}")
    pair = best_pair(subs, objs)
    if pair is None:
      return reject("entity_overlap", f"every mention of subject {subj!r} overlaps the object "
                                      f"{obj!r}")
    (ss, se, sw), (os_, oe, ow) = pair
    if not (sw and ow):
      which = "subject" if not sw else "object"
      ent = subj if not sw else obj
      return reject("entity_not_whole_word", f"{which} {ent!r} only occurs inside a longer word")
    return self._finish_scdg(text, (ss, se), (os_, oe), cand.get("subject_type"),
                             cand.get("object_type"), relation, where, cand, "malformed_instance")

  def scdg_record(self, rec: Any, where: str) -> tuple[Optional[dict], Optional[Rejection]]:
    """Validates one record of a pre-generated SCDG file (the output format, with offsets).

    Returns:
      `(record, None)` (keys in the output order) or `(None, rejection)`.
    """
    def reject(reason, detail):
      return None, Rejection("scdg", reason, where, detail, rec)

    problem = _structure_problem(rec, "record", ("text", "subj", "obj", "relation"))
    if problem is not None:
      return reject("malformed_record", problem)
    for k in ("subj_start", "subj_end", "obj_start", "obj_end"):
      v = rec.get(k)
      if isinstance(v, bool) or not isinstance(v, int):
        return reject("malformed_record", f"field {k!r} is missing or not an integer")
    relation, text = rec["relation"], rec["text"]
    if relation not in self.schema:
      return reject("unknown_relation", f"relation {relation!r} is not in the schema")
    if not text.strip():
      return reject("empty_text", "text is blank")
    spans = []
    for name, what in (("subj", "subject"), ("obj", "object")):
      ent, s, e = rec[name], rec[f"{name}_start"], rec[f"{name}_end"]
      if not ent.strip():
        return reject(f"{what}_not_in_text", f"{what} is blank")
      if not 0 <= s < e <= len(text) or text[s:e] != ent:
        if not find_mentions(text, ent):
          return reject(f"{what}_not_in_text", f"{what} {ent!r} does not occur in the text")
        return reject("offset_mismatch", f"{what} {ent!r} != text[{s}:{e}] = {text[s:e]!r}")
      spans.append((s, e))
    return self._finish_scdg(text, spans[0], spans[1], rec.get("subj_type"), rec.get("obj_type"),
                             relation, where, rec, "malformed_record")

  # -- EDKG ---------------------------------------------------------------------------------

  def edkg(self, rec: Any, where: str) -> tuple[Optional[dict], Optional[Rejection]]:
    """Validates one EDKG record `{relation, subject, object, context, generated_text}`.

    `context` may be a string or None. Used both for model answers (the stage builds the
    record from the seed instance and the explanation) and for pre-generated files.

    Returns:
      `(record, None)` (keys in the output order) or `(None, rejection)`.
    """
    def reject(reason, detail):
      return None, Rejection("edkg", reason, where, detail, rec)

    problem = _structure_problem(rec, "record", ("relation", "subject", "object", "generated_text"))
    if problem is not None:
      return reject("malformed_record", problem)
    context = rec.get("context")
    if context is not None and not isinstance(context, str):
      return reject("malformed_record", "field 'context' is not a string or null")
    relation, subj, obj, text = (rec["relation"], rec["subject"], rec["object"],
                                 rec["generated_text"])
    if relation not in self.schema:
      return reject("unknown_relation", f"relation {relation!r} is not in the schema")
    if not text.strip():
      return reject("empty_explanation", "the explanation is blank")
    subs, objs = find_mentions(text, subj, loose=True), find_mentions(text, obj, loose=True)
    if not subs:
      return reject("explanation_missing_subject",
                    f"the explanation does not mention the subject {subj!r}")
    if not objs:
      return reject("explanation_missing_object",
                    f"the explanation does not mention the object {obj!r}")
    if best_pair(subs, objs) is None:
      return reject("explanation_entity_overlap",
                    f"subject {subj!r} and object {obj!r} only occur overlapping")
    leak = self.leakage.check(text, ignore=context)
    if leak is not None:
      return reject(*leak)
    norm = normalize_text(text)
    if norm in self._seen_edkg:
      return reject("duplicate", "same explanation as an earlier record")
    self._seen_edkg.add(norm)
    return {"relation": relation, "subject": subj, "object": obj, "context": context,
            "generated_text": text}, None
