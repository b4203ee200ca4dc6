"""Requests of the generate stage and the records made from their answers.

* `build_requests`: one EDKG request per seed instance, one SCDG request per relation, each
  with its cache key and a name for errors and the report.
* `Tally`: the rejected generations, counted by kind and reason.
* `edkg_records` / `scdg_records`: the validated records of one response (rejections go to
  the tally); `replay_file`: the same for a pre-generated JSONL file.

Record formats (those of `shared/data/README.md`):

* EDKG: `{relation, subject, object, context, generated_text}`.
* SCDG: `{text, subj, subj_start, subj_end, obj, obj_start, obj_end, subj_type, obj_type,
  relation}` (character offsets, end exclusive).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib
from typing import Any, Iterable, Mapping, Optional

import ml_collections

from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.llm import prompts
from tkre_jax.llm.cache import request_key
from tkre_jax.llm.validate import OutputError, Rejection, Validator, parse_structured_output

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Request:
  """One Messages API request of the stage.

  Attributes:
    kind: `edkg` or `scdg`.
    name: names the request in errors and the report.
    relation: the relation id.
    params: the request body.
    key: its cache key (`request_key(params)`).
    seed: EDKG: the instance explained.
  """

  kind: str
  name: str
  relation: str
  params: dict[str, Any]
  key: str
  seed: Optional[RelationInstance] = None


def build_requests(by_rel: Mapping[str, list[RelationInstance]],
                   schema: Mapping[str, tuple[str, str]], cfg: ml_collections.ConfigDict,
                   kinds: Iterable[str]) -> list[Request]:
  """The EDKG requests (one per seed instance) then the SCDG ones (one per relation).

  Args:
    by_rel: relation id -> its training (seed) instances.
    schema: relation id -> (name, description).
    cfg: `config.generate`.
    kinds: which of `edkg`, `scdg` to build.
  """
  kinds = set(kinds)
  common = dict(model=cfg.model, max_tokens=cfg.max_tokens,
                structured_output=cfg.structured_output, temperature=cfg.temperature,
                effort=cfg.effort or None)
  out = []
  if "edkg" in kinds:
    for rel, insts in by_rel.items():
      name, desc = schema[rel]
      for j, seed in enumerate(insts):
        params = prompts.edkg_request(seed, name, desc, **common)
        where = seed.source or f"{rel}#{j}"
        out.append(Request("edkg", f"EDKG seed instance {where} (relation {rel}, subject "
                                   f"{seed.subj_text!r}, object {seed.obj_text!r})", rel,
                           params, request_key(params), seed))
  if "scdg" in kinds:
    for rel, insts in by_rel.items():
      name, desc = schema[rel]
      params = prompts.scdg_request(rel, name, desc, insts[:cfg.k_demos], cfg.scdg_per_relation,
                                    entity_types=list(cfg.entity_types or []), **common)
      out.append(Request("scdg", f"SCDG relation {rel} ({name!r})", rel, params,
                         request_key(params)))
  return out


class Tally:
  """The rejected generations of a run, and their counts by kind and reason."""

  def __init__(self):
    self.rejections: list[Rejection] = []
    self.by_kind: dict[str, collections.Counter] = {"edkg": collections.Counter(),
                                                    "scdg": collections.Counter()}

  def reject(self, r: Rejection) -> None:
    self.rejections.append(r)
    self.by_kind[r.kind][r.reason] += 1
    log.debug("rejected %s (%s): %s: %s", r.kind, r.where, r.reason, r.detail)


def edkg_records(req: Request, msg: dict, validator: Validator, tally: Tally) -> list[dict]:
  """The EDKG record of one response (none if it is rejected; see `tally`)."""
  text = _answer_field(req, msg, "explanation", str, "string 'explanation'", tally)
  if text is None:
    return []
  seed = req.seed
  rec = {"relation": seed.relation, "subject": seed.subj_text, "object": seed.obj_text,
         "context": seed.text, "generated_text": text.strip()}
  return _accepted(validator.edkg(rec, req.name), tally)


def scdg_records(req: Request, msg: dict, n: int, validator: Validator,
                 tally: Tally) -> list[dict]:
  """The valid SCDG records of one response, at most the `n` asked for (the rest: `tally`)."""
  insts = _answer_field(req, msg, "instances", list, "'instances' list", tally)
  if insts is None:
    return []
  out = []
  for i, cand in enumerate(insts):
    where = f"{req.name}, instance {i}"
    if i >= n:
      tally.reject(Rejection("scdg", "excess_instance", where,
                             f"more than the {n} instances asked for", cand))
      continue
    out += _accepted(validator.scdg_candidate(cand, req.relation, where), tally)
  return out


def _answer_field(req: Request, msg: dict, field: str, want: type, what: str,
                  tally: Tally) -> Any:
  """`field` of the structured answer in `msg`, or None when the answer is unusable (rejected
  into `tally`)."""
  tool = prompts.EDKG_TOOL_NAME if req.kind == "edkg" else prompts.SCDG_TOOL_NAME
  try:
    answer = parse_structured_output(msg, tool)
  except OutputError as e:
    tally.reject(Rejection(req.kind, e.reason, req.name, e.detail, None))
    return None
  value = answer.get(field)
  if not isinstance(value, want):
    tally.reject(Rejection(req.kind, "malformed_output", req.name, f"answer has no {what}",
                           answer))
    return None
  return value


def replay_file(kind: str, path: pathlib.Path, validator: Validator,
                tally: Tally) -> tuple[list[dict], int]:
  """Validates every record of a pre-generated JSONL file of `kind` (`edkg` or `scdg`).

  Returns:
    (the valid records, the number of records read).

  Raises:
    DataError: the file cannot be read or has no record.
  """
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read replay file: {e}") from None
  out: list[dict] = []
  n = 0
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}, record {n} (line {lineno})"
    n += 1
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      tally.reject(Rejection(kind, "malformed_record", where, f"invalid JSON: {e}", line))
      continue
    check = validator.edkg if kind == "edkg" else validator.scdg_record
    out += _accepted(check(rec, where), tally)
  if n == 0:
    raise DataError(f"{path}: replay file has no records")
  return out, n


def _accepted(result: tuple[Optional[dict], Optional[Rejection]], tally: Tally) -> list[dict]:
  record, rej = result
  if rej is not None:
    tally.reject(rej)
    return []
  return [record]
