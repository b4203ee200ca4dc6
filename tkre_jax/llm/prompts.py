"""TKRE prompts and the Messages API requests built from them.

Two kinds of request, as in TKRE (IJCAI 2025):

* EDKG (explanation-driven knowledge generation): one request per seed (training) instance. The
  model is shown the seed sentence, the relation's name and description and the two entities,
  and explains why the subject has the relation with the object in that sentence.
* SCDG (schema-constrained data generation): one request per relation. The model is shown the
  relation's name and description, up to K seed instances as demonstrations and the allowed
  entity types, and writes N new instances (sentence, subject, object and their types).

The answer is always asked for as structured output, never parsed from free text. Two ways are
supported (`cfg.structured_output`):

* `"tool"`: one tool whose `input_schema` is the wanted JSON, forced with
  `tool_choice={"type": "tool", "name": ...}`; the answer is the `tool_use` block's `input`.
  Claude Sonnet / Opus 5.5 reject a forced tool choice (400), so use this with models that
  accept it (e.g. `claude-haiku-4-5`, `claude-sonnet-4-6`).
* `"json_schema"`: structured outputs, `output_config={"format": {"type": "json_schema",
  "schema": ...}}`; the answer is the JSON text block. Works with current models.

Either way the same JSON schema is used, and `validate.parse_structured_output` reads both.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from tkre_jax import config as config_lib
from tkre_jax.data.schema import RelationInstance

EDKG_TOOL_NAME = "record_explanation"
SCDG_TOOL_NAME = "record_instances"
STRUCTURED_OUTPUT_MODES = config_lib.STRUCTURED_OUTPUT_MODES

SYSTEM_PROMPT = (
    "You help build training data for relation extraction research. Relations come from a "
    "fixed schema (Wikidata-style properties or similar); each relation links a subject (head) "
    "entity to an object (tail) entity and has a name and a description. Follow the "
    "relation's description and direction exactly, and answer only through the requested "
    "structured output.")


def edkg_schema() -> dict[str, Any]:
  """JSON schema of an EDKG answer: `{"explanation": str}`."""
  return {
      "type": "object",
      "properties": {
          "explanation": {
              "type": "string",
              "description": ("A short paragraph (2-4 sentences) explaining why the subject has "
                              "the relation with the object in the given context. It must "
                              "name both the subject and the object, spelled as given."),
          },
      },
      "required": ["explanation"],
      "additionalProperties": False,
  }


def scdg_schema(entity_types: Sequence[str] = ()) -> dict[str, Any]:
  """JSON schema of an SCDG answer: `{"instances": [{text, subject, object, subject_type,
  object_type}, ...]}`; with `entity_types` the two type fields are enums over that list."""
  type_field: dict[str, Any] = {"type": "string"}
  if entity_types:
    type_field = {"type": "string", "enum": list(entity_types)}
  return {
      "type": "object",
      "properties": {
          "instances": {
              "type": "array",
              "items": {
                  "type": "object",
                  "properties": {
                      "text": {"type": "string",
                               "description": "One new, self-contained sentence."},
                      "subject": {"type": "string",
                                  "description": "The subject (head) entity, copied exactly "
                                                 "as it appears in the text."},
                      "object": {"type": "string",
                                 "description": "The object (tail) entity, copied exactly as "
                                                "it appears in the text."},
                      "subject_type": dict(type_field, description="Entity type of the subject."),
                      "object_type": dict(type_field, description="Entity type of the object."),
                  },
                  "required": ["text", "subject", "object", "subject_type", "object_type"],
                  "additionalProperties": False,
              },
          },
      },
      "required": ["instances"],
      "additionalProperties": False,
  }


def _relation_block(relation: str, name: str, description: str) -> str:
  """Name and id, the description (only when there is one: no schema, no line), direction."""
  desc = f"Description: {description.strip()}\n" if description.strip() else ""
  return (f"Relation: {name} (id {relation})\n{desc}"
          f"Direction: the subject (head) entity has this relation with the object (tail) "
          f"entity.")


def edkg_prompt(seed: RelationInstance, name: str, description: str) -> str:
  """The EDKG user prompt for one seed instance.

  Args:
    seed: the training instance (its text, subject and object are shown).
    name: the relation's name (e.g. `crosses`).
    description: the relation's description from the schema.

  Returns:
    the prompt text.
  """
  desc = description.strip()
  gloss = f" ({desc})" if desc else ""  # no empty "()" without a schema
  anchor = "the relation's description" if desc else "the relation's name"
  return (
      f"{_relation_block(seed.relation, name, description)}\n\n"
      f"Context: {seed.text}\n"
      f"Subject: {seed.subj_text}\n"
      f"Object: {seed.obj_text}\n\n"
      f"Given the context, explain why {seed.subj_text} has the relation \"{name}\"{gloss} "
      f"with {seed.obj_text}. Point to the words in the context that express the relation and "
      f"connect them to {anchor}. Name both "
      f"\"{seed.subj_text}\" and \"{seed.obj_text}\" in the explanation, spelled exactly as "
      f"given. Write 2-4 sentences of plain prose.")


def _demo_line(i: int, demo: RelationInstance) -> str:
  d = {"text": demo.text, "subject": demo.subj_text, "object": demo.obj_text}
  if demo.subj_type:
    d["subject_type"] = demo.subj_type
  if demo.obj_type:
    d["object_type"] = demo.obj_type
  return f"{i}. {json.dumps(d, ensure_ascii=False)}"


def scdg_prompt(relation: str, name: str, description: str,
                demos: Sequence[RelationInstance], n: int,
                entity_types: Sequence[str] = ()) -> str:
  """The SCDG user prompt for one relation.

  Args:
    relation: the relation id (e.g. `P177`).
    name: the relation's name.
    description: the relation's description.
    demos: the demonstrations (seed instances of this relation), shown in order.
    n: how many new instances to ask for.
    entity_types: the allowed entity types; empty for no constraint.

  Returns:
    the prompt text.
  """
  lines = [_relation_block(relation, name, description), ""]
  if demos:
    lines.append(f"Here are {len(demos)} examples of this relation:")
    lines.extend(_demo_line(i + 1, d) for i, d in enumerate(demos))
    lines.append("")
  if entity_types:
    lines.append("Allowed entity types (use exactly one of these for each entity): "
                 + ", ".join(entity_types) + ".")
  else:
    lines.append("Give each entity a short upper-case entity type such as PERSON, LOCATION or "
                 "ORGANIZATION, consistent with the examples.")
  lines += [
      "",
      f"Write {n} new instances of the relation \"{name}\". Each instance is one natural, "
      f"self-contained sentence in which the subject has this relation with the object"
      + (", as defined by the description." if description.strip() else ".") + " Requirements:",
      "- the subject and the object appear in the sentence verbatim, with the same spelling "
      "and capitalisation as in your subject and object fields;",
      "- the subject and the object are different, non-overlapping mentions;",
      "- vary the entities, the wording and the position of the two entities; do not copy or "
      "lightly edit the examples, and do not repeat a sentence;",
      "- prefer real, well-known facts; the sentence must be about the stated entities.",
  ]
  return "\n".join(lines)


def _structured(params: dict[str, Any], mode: str, tool_name: str, tool_description: str,
                schema: dict[str, Any], effort: Optional[str]) -> dict[str, Any]:
  if mode not in STRUCTURED_OUTPUT_MODES:
    raise ValueError(f"structured_output must be one of {STRUCTURED_OUTPUT_MODES}, got {mode!r}")
  output_config: dict[str, Any] = {}
  if effort:
    output_config["effort"] = effort
  if mode == "tool":
    params["tools"] = [{"name": tool_name, "description": tool_description,
                        "input_schema": schema}]
    params["tool_choice"] = {"type": "tool", "name": tool_name}
  else:
    output_config["format"] = {"type": "json_schema", "schema": schema}
  if output_config:
    params["output_config"] = output_config
  return params


def _base_params(model: str, max_tokens: int, prompt: str,
                 temperature: Optional[float]) -> dict[str, Any]:
  params: dict[str, Any] = {
      "model": model,
      "max_tokens": int(max_tokens),
      "system": SYSTEM_PROMPT,
      "messages": [{"role": "user", "content": prompt}],
  }
  if temperature is not None:
    params["temperature"] = float(temperature)
  return params


def edkg_request(seed: RelationInstance, name: str, description: str, *, model: str,
                 max_tokens: int, structured_output: str = "json_schema",
                 temperature: Optional[float] = None,
                 effort: Optional[str] = None) -> dict[str, Any]:
  """Messages API parameters (a JSON-serialisable dict) for one EDKG request.

  The dict is exactly what is sent as the request body (and what the cache key hashes):
  `model, max_tokens, system, messages` plus `tools`/`tool_choice` (mode `"tool"`) or
  `output_config.format` (mode `"json_schema"`), `output_config.effort` when `effort` is set
  and `temperature` when it is not None.

  Raises:
    ValueError: unknown `structured_output`.
  """
  params = _base_params(model, max_tokens, edkg_prompt(seed, name, description), temperature)
  return _structured(params, structured_output, EDKG_TOOL_NAME,
                     "Record the explanation of why the relation holds.", edkg_schema(), effort)


def scdg_request(relation: str, name: str, description: str,
                 demos: Sequence[RelationInstance], n: int, *, model: str, max_tokens: int,
                 entity_types: Sequence[str] = (), structured_output: str = "json_schema",
                 temperature: Optional[float] = None,
                 effort: Optional[str] = None) -> dict[str, Any]:
  """Messages API parameters for one SCDG request (N instances of one relation).

  See `edkg_request` for the layout.

  Raises:
    ValueError: unknown `structured_output`.
  """
  prompt = scdg_prompt(relation, name, description, demos, n, entity_types)
  params = _base_params(model, max_tokens, prompt, temperature)
  return _structured(params, structured_output, SCDG_TOOL_NAME,
                     f"Record the {n} new relation instances.", scdg_schema(entity_types), effort)
