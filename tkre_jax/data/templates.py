"""Relation templates for the instance-adapted predicate head (`config.model.head=predicate`).

The dual encoder of Jiang and Kavuluru ("Relation Extraction with Instance-Adapted Predicate
Descriptions", arXiv 2503.17799) reads, for each candidate relation r, a template of r filled
with *this instance's* marked entities, e.g. for P40 (child):

    @ Marie Curie @ child # Irène Joliot-Curie # : subject has object as child

A template is a string with `{subject}` and `{object}` once each (in either order) and optionally
`{name}` and `{description}`; `{subject}` becomes `@ <subject tokens> @` and `{object}`
`# <object tokens> #`, the markers of the sentence encoder (`data.features`). Where it comes from:

* the schema entry's third element: `pid2name.json`-style `{"P40": [name, description, template]}`
  (`readers.read_pid2name` accepts two or three strings per entry);
* else `DEFAULT_TEMPLATE` = "{subject} {name} {object} : {description}" with the schema's name and
  description;
* else (a relation the schema lacks, or no schema) the relation's own words: "org:founded_by" ->
  name "org founded by", no description.

This module tokenizes the literal text around the entities once per relation (`TemplateTable`);
the entity tokens are copied from each prepared row inside the model (`model.predicate`), so
templates need no re-tokenization per instance and work for every prepared split and for
`predict`'s new text alike. The table is JSON-able: finetune writes it into `run.json`
(`templates`), export into `relation_head.json`, and eval / predict / `RelationExtractor` rebuild
the model from it.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any, Mapping, Optional, Sequence

from tkre_jax import config as config_lib
from tkre_jax.data import readers
from tkre_jax.data.features import OBJ_MARKER, SUBJ_MARKER

DEFAULT_TEMPLATE = "{subject} {name} {object} : {description}"
FIELDS = ("subject", "object", "name", "description")


def relation_words(relation: str) -> str:
  """A relation id as words: "org:founded_by" -> "org founded by"; "P26" stays "P26"."""
  return " ".join(w for w in re.split(r"[:_/\-.]+", relation) if w) or relation


def check_template(template: str, where: str) -> None:
  """Raises ValueError (naming `where`) unless `template` holds `{subject}` and `{object}` once
  each and no field outside `FIELDS`."""
  try:
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ValueError(f"{where}: template {template!r} is not a format string ({e})") from e
  unknown = sorted(set(names) - set(FIELDS))
  if unknown or names.count("subject") != 1 or names.count("object") != 1:
    raise ValueError(f"{where}: template {template!r} must hold {{subject}} and {{object}} once "
                     f"each and only the fields {FIELDS}" +
                     (f"; unknown: {unknown}" if unknown else ""))


@dataclasses.dataclass(frozen=True)
class TemplateTable:
  """The tokenized templates of a label map, in relation id order.

  Attributes:
    pieces: per relation, the token ids of the three literal pieces: before the first entity,
      between the entities, after the second (tuples of ints; no special tokens).
    subject_first: per relation, whether `{subject}` comes before `{object}`.
    texts: per relation, the template with the fields but the entities filled in (for reports).
    cls_id, sep_id, pad_id, subj_marker_id, obj_marker_id: the special and marker token ids.
    max_len: tokens per filled template ([CLS] and [SEP] included): `config.model.template_max_len`,
      or less when no template can be that long; the last piece is cut to fit.
    entity_len: at most this many tokens of each entity are copied.
  """
  pieces: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]
  subject_first: tuple[bool, ...]
  texts: tuple[str, ...]
  cls_id: int
  sep_id: int
  pad_id: int
  subj_marker_id: int
  obj_marker_id: int
  max_len: int
  entity_len: int

  @property
  def num_relations(self) -> int:
    return len(self.pieces)

  @property
  def piece_len(self) -> int:
    """The longest literal piece (the padded width of the model's piece table)."""
    return max([1] + [len(p) for rel in self.pieces for p in rel])

  def to_json(self) -> dict:
    return {"pieces": [[list(p) for p in rel] for rel in self.pieces],
            "subject_first": list(self.subject_first), "texts": list(self.texts),
            **{k: getattr(self, k) for k in ("cls_id", "sep_id", "pad_id", "subj_marker_id",
                                             "obj_marker_id", "max_len", "entity_len")}}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "TemplateTable":
    return cls(pieces=tuple(tuple(tuple(int(t) for t in p) for p in rel) for rel in d["pieces"]),
               subject_first=tuple(bool(x) for x in d["subject_first"]),
               texts=tuple(d["texts"]),
               **{k: int(d[k]) for k in ("cls_id", "sep_id", "pad_id", "subj_marker_id",
                                         "obj_marker_id", "max_len", "entity_len")})


def _single_id(tokenizer, text: str) -> int:
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if len(ids) != 1:
    raise ValueError(f"the marker {text!r} is {len(ids)} tokens for this tokenizer, not one")
  return int(ids[0])


def build_table(label_map: Mapping[str, int], tokenizer, *,
                schema: Optional[Mapping[str, Sequence[str]]] = None,
                templates: Optional[Mapping[str, str]] = None, max_len: int = 64,
                entity_len: int = 16) -> TemplateTable:
  """Tokenizes every relation's template (see the module docstring for where each comes from).

  Args:
    label_map: relation -> id (0..R-1).
    tokenizer: the prepared data's tokenizer (HF, with cls / sep / pad tokens).
    schema: relation -> (name, description[, template]).
    templates: relation -> template, overriding the schema's.
    max_len: tokens per filled template; entity_len: tokens kept per entity.

  Raises:
    ValueError: a malformed template (naming the relation), or a template whose literal text
      before and between the entities leaves no room for two entities of `entity_len` tokens.
  """
  schema = schema or {}
  templates = dict(templates or {})
  cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  if cls_id is None or sep_id is None:
    raise ValueError("the predicate head needs a tokenizer with [CLS] and [SEP] tokens")
  pieces, first, texts = [], [], []
  for rel in sorted(label_map, key=label_map.get):
    entry = schema.get(rel)
    name = entry[0] if entry and entry[0] else relation_words(rel)
    description = entry[1] if entry and len(entry) > 1 else ""
    template = templates.get(rel) or (entry[2] if entry and len(entry) > 2 and entry[2]
                                      else DEFAULT_TEMPLATE)
    check_template(template, f"relation {rel!r}")
    filled = template.replace("{name}", name).replace("{description}", description)
    head, rest = re.split(r"\{subject\}|\{object\}", filled, maxsplit=1)
    middle, tail = re.split(r"\{subject\}|\{object\}", rest, maxsplit=1)
    subject_first = filled.index("{subject}") < filled.index("{object}")
    ids = [tuple(tokenizer(x.strip(), add_special_tokens=False)["input_ids"]) if x.strip() else ()
           for x in (head, middle, tail)]
    fixed = 2 + len(ids[0]) + len(ids[1]) + 4  # [CLS] [SEP], the literal pieces, 4 markers
    if fixed + 2 * entity_len > max_len:
      raise ValueError(f"relation {rel!r}: template {filled!r} has {fixed - 6} literal tokens before "
                       f"and between its entities; with two entities of up to {entity_len} tokens it "
                       f"does not fit config.model.template_max_len={max_len}")
    pieces.append(tuple(ids))
    first.append(subject_first)
    texts.append(re.sub(r"\s+", " ", filled.replace("{subject}", f"{SUBJ_MARKER} subject "
                                                    f"{SUBJ_MARKER}").replace(
        "{object}", f"{OBJ_MARKER} object {OBJ_MARKER}")).strip())
  # the longest template any instance can fill: shorter tables compile to shorter passes
  longest = 6 + max(sum(len(p) for p in rel) for rel in pieces) + 2 * entity_len
  return TemplateTable(tuple(pieces), tuple(first), tuple(texts), int(cls_id), int(sep_id),
                       int(pad_id), _single_id(tokenizer, SUBJ_MARKER),
                       _single_id(tokenizer, OBJ_MARKER), int(min(max_len, longest)),
                       int(entity_len))


def table_from_config(config, label_map: Mapping[str, int], tokenizer) -> TemplateTable:
  """`build_table` with the schema of `config.data.schema_file` (names, descriptions, templates
  of three-string entries), `config.model.template_file` (JSON {relation: template}, overriding)
  and the lengths of `config.model`.

  Raises:
    DataError: an unreadable schema or template file (naming it).
    ValueError: as `build_table`.
  """
  schema: dict = {}
  templates: dict = {}
  if config.data.schema_file:
    path = config_lib.resolve_path(config, config.data.schema_file)
    if path.is_file():
      schema = dict(readers.read_pid2name(path))
      templates = readers.read_pid2name_templates(path)
  if config.model.template_file:
    path = config_lib.resolve_path(config, config.model.template_file)
    doc = readers.read_json(path)
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
      raise readers.DataError(f"{path}: expected a JSON object of relation -> template string")
    templates.update(doc)
  return build_table(label_map, tokenizer, schema=schema, templates=templates,
                     max_len=int(config.model.template_max_len),
                     entity_len=int(config.model.template_entity_len))
