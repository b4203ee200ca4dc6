"""The generate stage: EDKG explanations and SCDG synthetic instances through the Anthropic API.

`run_generate` turns K-shot training instances and a relation schema into `edkg.jsonl` and
`scdg.jsonl` (the formats of `shared/data/README.md`), validating every generation (see
`validate`), caching every response on disk (see `client`) and writing a report. Outputs in
`workdir`:

* `edkg.jsonl`: `{relation, subject, object, context, generated_text}` per line.
* `scdg.jsonl`: `{text, subj, subj_start, subj_end, obj, obj_start, obj_end, subj_type,
  obj_type, relation}` per line (character offsets, end exclusive).
* `rejected.jsonl`: every rejected generation with its reason, where it came from and the
  candidate itself.
* `generate_report.json`: status (`complete`, `budget_exhausted` or `incomplete`), requests,
  attempts, retries, tokens, estimated cost (USD), cache hits, rejections by reason per kind.
* `cache/` (or `cfg.cache_dir`): one JSON file per request, keyed by the sha256 of the request.
* `batch_state.json` (batch mode): the submitted batch's id and custom ids, for resuming.

All files are written atomically; when the run fails (an API error that retries do not fix, a
replay miss, bad input) no output file is written or changed, and what was paid for is in the
cache, so rerunning resumes without repeating a paid request.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import pathlib
import random
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import ml_collections
from ml_collections import config_dict

from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.llm import prompts
from tkre_jax.llm.client import (Budget, BudgetExhausted, GenerateError, Messenger, Price,
                                 ReplayMissError, RequestCache, RequestFailedError, RetryPolicy,
                                 UsageStats, atomic_write_json, atomic_write_jsonl, make_client,
                                 prices_from_config, request_key)
from tkre_jax.llm.validate import (EDKG_KEYS, SCDG_KEYS, LeakageIndex, OutputError, Rejection,
                                   Validator, parse_structured_output)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "claude-sonnet-5-5"
EDKG_FILE = "edkg.jsonl"
SCDG_FILE = "scdg.jsonl"
REJECTED_FILE = "rejected.jsonl"
REPORT_FILE = "generate_report.json"
BATCH_STATE_FILE = "batch_state.json"

# USD per million tokens (Anthropic list prices); the Batch API costs `batch_discount` of these.
DEFAULT_PRICES = {
    "claude-sonnet-5-5": (2.0, 10.0),
    "claude-sonnet-5": (2.0, 10.0),
    "claude-opus-5-5": (4.0, 20.0),
    "claude-opus-5": (5.0, 25.0),
    "claude-fable-5-1": (10.0, 50.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
}


def default_generate_config() -> ml_collections.ConfigDict:
  """The generate stage's configuration with its defaults.

  Fields:
    model: Claude model id (`claude-sonnet-5-5`, the current Sonnet).
    structured_output: `json_schema` (structured outputs via `output_config.format`; works with
      current models) or `tool` (a tool with the schema as `input_schema`, forced with
      `tool_choice`; for models that accept forced tool choice, e.g. `claude-haiku-4-5`).
    temperature: sampling temperature, or None to leave the model default (current models
      reject non-default sampling parameters).
    effort: `output_config.effort` (`low` ... `max`), or None to leave it out (needed for
      models without effort support).
    max_tokens: per request, in tokens (includes thinking).
    edkg, scdg: which kinds to generate.
    scdg_per_relation: N, new instances per relation (16).
    k_demos: K, demonstrations per SCDG prompt (8), the first K training instances.
    entity_types: allowed entity types for SCDG; empty for no constraint.
    leakage_ngram: n of the shared word n-gram leakage check (8).
    max_concurrency: parallel requests in live (non-batch) mode.
    max_requests: cap on paid requests in this run (0: none).
    max_total_tokens: cap on tokens used in this run, input + output (0: none).
    max_retries, retry_base_delay_s, retry_max_delay_s: the retry policy (seconds).
    timeout_s: per-request timeout in seconds.
    poll_interval_s: seconds between Message Batch polls.
    batch_max_wait_s: stop polling after this many seconds (a rerun resumes the batch).
    cache_dir: response cache folder; empty for `<workdir>/cache`.
    prices: model -> {input_per_mtok, output_per_mtok} in USD per million tokens.
    batch_discount: fraction of the price paid for Batch API requests (0.5).
    seed: seed of the retry jitter.
  """
  cfg = ml_collections.ConfigDict()
  cfg.model = DEFAULT_MODEL
  cfg.structured_output = "json_schema"
  cfg.temperature = config_dict.placeholder(float)
  cfg.effort = "low"
  cfg.max_tokens = 8192
  cfg.edkg = True
  cfg.scdg = True
  cfg.scdg_per_relation = 16
  cfg.k_demos = 8
  cfg.entity_types = []
  cfg.leakage_ngram = 8
  cfg.max_concurrency = 4
  cfg.max_requests = 0
  cfg.max_total_tokens = 0
  cfg.max_retries = 5
  cfg.retry_base_delay_s = 1.0
  cfg.retry_max_delay_s = 60.0
  cfg.timeout_s = 300.0
  cfg.poll_interval_s = 30.0
  cfg.batch_max_wait_s = 25 * 3600.0
  cfg.cache_dir = ""
  cfg.prices = ml_collections.ConfigDict(
      {m: {"input_per_mtok": i, "output_per_mtok": o} for m, (i, o) in DEFAULT_PRICES.items()})
  cfg.batch_discount = 0.5
  cfg.seed = 0
  return cfg


# ------------------------------------------------------------------------------------------
# Work items


@dataclasses.dataclass
class _Item:
  kind: str  # edkg | scdg
  name: str  # names the item in errors and the report
  relation: str
  params: dict[str, Any]
  key: str
  seed: Optional[RelationInstance] = None


def _check_config(cfg: ml_collections.ConfigDict) -> None:
  def need(cond: bool, field: str, what: str):
    if not cond:
      raise ValueError(f"generate config: {field} {what}, got {cfg.get(field)!r}")

  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  need(isinstance(cfg.model, str) and cfg.model.strip(), "model", "must be a model id")
  need(cfg.structured_output in prompts.STRUCTURED_OUTPUT_MODES, "structured_output",
       f"must be one of {prompts.STRUCTURED_OUTPUT_MODES}")
  need(is_int(cfg.max_tokens) and cfg.max_tokens > 0, "max_tokens", "must be a positive int")
  need(is_int(cfg.scdg_per_relation) and cfg.scdg_per_relation > 0, "scdg_per_relation",
       "must be a positive int")
  need(is_int(cfg.k_demos) and cfg.k_demos >= 0, "k_demos", "must be an int >= 0")
  need(is_int(cfg.leakage_ngram) and cfg.leakage_ngram > 0, "leakage_ngram",
       "must be a positive int")
  need(is_int(cfg.max_concurrency) and cfg.max_concurrency > 0, "max_concurrency",
       "must be a positive int")
  for f in ("max_requests", "max_total_tokens", "max_retries"):
    need(is_int(cfg[f]) and cfg[f] >= 0, f, "must be an int >= 0")
  for f in ("retry_base_delay_s", "retry_max_delay_s", "timeout_s", "poll_interval_s",
            "batch_max_wait_s", "batch_discount"):
    need(isinstance(cfg[f], (int, float)) and cfg[f] >= 0, f, "must be a number >= 0")
  types = list(cfg.entity_types or [])
  need(all(isinstance(t, str) and t.strip() for t in types), "entity_types",
       "must be a list of non-empty strings")
  need(isinstance(cfg.edkg, bool) and isinstance(cfg.scdg, bool), "edkg/scdg", "must be bools")
  need(cfg.edkg or cfg.scdg, "edkg/scdg", "must not both be False")


def _check_schema(schema: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
  if not isinstance(schema, Mapping) or not schema:
    raise ValueError("relation schema must be a non-empty dict relation -> (name, description)")
  out = {}
  for rel, v in schema.items():
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, str) for x in v)):
      raise ValueError(f"relation schema, relation {rel!r}: expected (name, description) "
                       f"strings, got {v!r}")
    out[rel] = (v[0], v[1])
  return out


def _check_replay_files(replay_files: Optional[Mapping[str, Any]],
                        mode: str) -> dict[str, pathlib.Path]:
  if not replay_files:
    return {}
  if mode != "replay":
    raise ValueError("replay_files are only used with mode='replay'")
  out = {}
  for kind, path in replay_files.items():
    if kind not in ("edkg", "scdg"):
      raise ValueError(f"replay_files: unknown kind {kind!r} (expected 'edkg' and/or 'scdg')")
    p = pathlib.Path(path)
    if not p.is_file():
      raise FileNotFoundError(f"replay_files[{kind!r}]: {p} does not exist")
    out[kind] = p
  return out


def _group(train: Sequence[RelationInstance],
           schema: Mapping[str, Any]) -> dict[str, list[RelationInstance]]:
  by_rel: dict[str, list[RelationInstance]] = {}
  for i, inst in enumerate(train):
    if not isinstance(inst, RelationInstance):
      raise TypeError(f"train_instances[{i}] is a {type(inst).__name__}, not a RelationInstance")
    if inst.relation not in schema:
      raise DataError(f"{inst.source or f'train_instances[{i}]'}: relation {inst.relation!r} is "
                      f"not in the relation schema ({len(schema)} relations)")
    by_rel.setdefault(inst.relation, []).append(inst)
  return by_rel


def _build_items(by_rel: Mapping[str, list[RelationInstance]], schema: Mapping[str, Any],
                 cfg: ml_collections.ConfigDict, kinds: Iterable[str]) -> list[_Item]:
  kinds = set(kinds)
  common = dict(model=cfg.model, max_tokens=cfg.max_tokens,
                structured_output=cfg.structured_output, temperature=cfg.temperature,
                effort=cfg.effort or None)
  items = []
  if "edkg" in kinds:
    for rel, insts in by_rel.items():
      name, desc = schema[rel]
      for j, seed in enumerate(insts):
        params = prompts.edkg_request(seed, name, desc, **common)
        where = seed.source or f"{rel}#{j}"
        items.append(_Item("edkg", f"EDKG seed instance {where} (relation {rel}, subject "
                                   f"{seed.subj_text!r}, object {seed.obj_text!r})", rel,
                           params, request_key(params), seed))
  if "scdg" in kinds:
    for rel, insts in by_rel.items():
      name, desc = schema[rel]
      params = prompts.scdg_request(rel, name, desc, insts[:cfg.k_demos], cfg.scdg_per_relation,
                                    entity_types=list(cfg.entity_types or []), **common)
      items.append(_Item("scdg", f"SCDG relation {rel} ({name!r})", rel, params,
                         request_key(params)))
  return items


# ------------------------------------------------------------------------------------------
# Live requests


def _run_live(messenger: Messenger, todo: Sequence[_Item], max_concurrency: int
              ) -> tuple[dict[str, dict], list[str]]:
  """Sends `todo` (unique keys) with a thread pool. Returns (key -> message, keys skipped for
  the budget). On a fatal error, lets the requests in flight finish (they are cached), then
  raises the first fatal error in item order."""
  messages: dict[str, dict] = {}
  skipped: list[str] = []
  errors: dict[str, BaseException] = {}
  stop = threading.Event()
  lock = threading.Lock()

  def work(item: _Item) -> None:
    if stop.is_set():
      with lock:
        skipped.append(item.key)
      return
    try:
      msg = messenger.create(item.key, item.params, item.name)
    except BudgetExhausted:
      stop.set()
      with lock:
        skipped.append(item.key)
      return
    except BaseException as e:  # noqa: BLE001 - re-raised below in the main thread
      stop.set()
      with lock:
        errors[item.key] = e
      return
    with lock:
      messages[item.key] = msg

  ex = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency,
                                             thread_name_prefix="tkre-generate")
  try:
    futures = [ex.submit(work, item) for item in todo]
    for f in concurrent.futures.as_completed(futures):
      f.result()
  except BaseException:
    stop.set()
    raise
  finally:
    ex.shutdown(wait=True, cancel_futures=True)
  for item in todo:
    if item.key in errors:
      err = errors[item.key]
      log.error("stopping: %s (%d response(s) of this run are cached; rerun to resume)", err,
                len(messages))
      raise err
  return messages, skipped


# ------------------------------------------------------------------------------------------
# Validation of responses and replay files


class _Tally:
  def __init__(self):
    self.rejections: list[Rejection] = []
    self.by_kind: dict[str, collections.Counter] = {"edkg": collections.Counter(),
                                                    "scdg": collections.Counter()}

  def reject(self, r: Rejection) -> None:
    self.rejections.append(r)
    self.by_kind[r.kind][r.reason] += 1
    log.debug("rejected %s (%s): %s: %s", r.kind, r.where, r.reason, r.detail)


def _validate_edkg_message(item: _Item, msg: dict, validator: Validator, tally: _Tally,
                           out: list[dict]) -> None:
  seed = item.seed
  try:
    answer = parse_structured_output(msg, prompts.EDKG_TOOL_NAME)
  except OutputError as e:
    tally.reject(Rejection("edkg", e.reason, item.name, e.detail, None))
    return
  text = answer.get("explanation")
  if not isinstance(text, str):
    tally.reject(Rejection("edkg", "malformed_output", item.name,
                           "answer has no string 'explanation'", answer))
    return
  rec = {"relation": seed.relation, "subject": seed.subj_text, "object": seed.obj_text,
         "context": seed.text, "generated_text": text.strip()}
  record, rej = validator.edkg(rec, item.name)
  if rej is not None:
    tally.reject(rej)
  else:
    out.append(record)


def _validate_scdg_message(item: _Item, msg: dict, n: int, validator: Validator, tally: _Tally,
                           out: list[dict]) -> None:
  try:
    answer = parse_structured_output(msg, prompts.SCDG_TOOL_NAME)
  except OutputError as e:
    tally.reject(Rejection("scdg", e.reason, item.name, e.detail, None))
    return
  insts = answer.get("instances")
  if not isinstance(insts, list):
    tally.reject(Rejection("scdg", "malformed_output", item.name,
                           "answer has no 'instances' list", answer))
    return
  for i, cand in enumerate(insts):
    where = f"{item.name}, instance {i}"
    if i >= n:
      tally.reject(Rejection("scdg", "excess_instance", where,
                             f"more than the {n} instances asked for", cand))
      continue
    record, rej = validator.scdg_candidate(cand, item.relation, where)
    if rej is not None:
      tally.reject(rej)
    else:
      out.append(record)


def _replay_file(kind: str, path: pathlib.Path, validator: Validator, tally: _Tally,
                 out: list[dict]) -> int:
  """Validates every record of a pre-generated JSONL file; returns the number of records."""
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read replay file: {e}") from None
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
    if kind == "edkg":
      record, rej = validator.edkg(rec, where)
    else:
      record, rej = validator.scdg_record(rec, where)
    if rej is not None:
      tally.reject(rej)
    else:
      out.append(record)
  if n == 0:
    raise DataError(f"{path}: replay file has no records")
  return n


# ------------------------------------------------------------------------------------------
# The stage


def run_generate(train_instances: Sequence[RelationInstance],
                 schema: Mapping[str, tuple[str, str]],
                 eval_instances: Sequence[RelationInstance],
                 cfg: ml_collections.ConfigDict,
                 workdir: pathlib.Path,
                 *,
                 mode: str = "live",
                 use_batch: bool = False,
                 client: Any = None,
                 replay_files: Optional[Mapping[str, Any]] = None,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
  """Generates (or replays) EDKG explanations and SCDG instances and writes them to `workdir`.

  Args:
    train_instances: the K-shot training (seed) instances; EDKG explains each one, SCDG uses
      the first `cfg.k_demos` of each relation as demonstrations and generates
      `cfg.scdg_per_relation` new instances per relation.
    schema: relation id -> (name, description), e.g. `readers.read_pid2name(...)`; must cover
      every training relation.
    eval_instances: dev and test instances; generations equal to one of their texts or sharing
      a `cfg.leakage_ngram`-word n-gram with one are rejected.
    cfg: `default_generate_config()` (possibly overridden).
    workdir: output folder (created).
    mode: `live` (cache, then the API; needs `ANTHROPIC_API_KEY` unless `client` is given) or
      `replay` (cache and `replay_files` only; no API key, no request; a miss is an error).
    use_batch: live mode: send the uncached requests through the Message Batches API (50%
      price), resuming the batch in `workdir/batch_state.json` on rerun.
    client: an `anthropic.Anthropic` to use instead of one built from `ANTHROPIC_API_KEY`
      (tests pass one with a mock transport). Its retries are turned off: ours apply.
    replay_files: replay mode: `{"edkg": path, "scdg": path}` pre-generated JSONL files (either
      or both) validated like live generations; kinds without a file come from the cache.
    sleep: sleep function (seconds) for retry backoff and batch polling.

  Returns:
    The report (also written to `generate_report.json`): `status` (`complete`,
    `budget_exhausted`: the budget stopped the run and the outputs hold what was generated;
    `incomplete`: some batch requests failed, a rerun resubmits them), `requests`,
    `attempts`, `retries`, `cache_hits`, `input_tokens`, `output_tokens`,
    `estimated_cost_usd`, per kind `{requested, accepted, rejected, rejections,
    not_generated}`, total `rejections` by reason, `not_generated` and `failed_requests`
    (item names), `batch`, `outputs` and more.

  Raises:
    ValueError: bad config, schema, mode or replay_files argument; unknown model price in
      live mode.
    DataError: a training relation missing from the schema; an unreadable replay file.
    MissingApiKeyError: live mode, no `client` and no `ANTHROPIC_API_KEY` (before any work).
    ReplayMissError: replay mode and requests neither cached nor replayed (names them).
    RequestFailedError: an API request failed for good (retries exhausted or not retryable);
      nothing is written, the responses received so far are cached.
    BatchError: a Message Batch could not be submitted or read, or polling timed out.
  """
  if mode not in ("live", "replay"):
    raise ValueError(f"mode must be 'live' or 'replay', got {mode!r}")
  _check_config(cfg)
  schema = _check_schema(schema)
  replay = _check_replay_files(replay_files, mode)
  if not train_instances:
    raise ValueError("train_instances is empty")
  by_rel = _group(train_instances, schema)
  price: Optional[Price] = None
  if mode == "live" or cfg.model in (cfg.prices or {}):
    price = prices_from_config(cfg.prices, cfg.model, cfg.batch_discount)
  if mode == "live" and client is None:
    client = make_client(cfg.timeout_s)  # raises MissingApiKeyError before any work
  if mode == "replay":
    client = None
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cache = RequestCache(pathlib.Path(cfg.cache_dir) if cfg.cache_dir else workdir / "cache")
  stats = UsageStats(price)
  budget = Budget(stats, cfg.max_requests, cfg.max_total_tokens)
  policy = RetryPolicy(cfg.max_retries, cfg.retry_base_delay_s, cfg.retry_max_delay_s)
  messenger = Messenger(client, cache, stats, budget, policy, sleep=sleep,
                        rng=random.Random(cfg.seed), timeout_s=cfg.timeout_s)

  kinds = [k for k in ("edkg", "scdg") if cfg[k]]
  items = _build_items(by_rel, schema, cfg, [k for k in kinds if k not in replay])
  unique: dict[str, _Item] = {}
  for item in items:
    unique.setdefault(item.key, item)
  messages: dict[str, dict] = {}
  for key in unique:
    msg = messenger.cached(key)
    if msg is not None:
      messages[key] = msg
  missing = [it for k, it in unique.items() if k not in messages]
  log.info("generate: %d request(s) (%d unique), %d cached, %d to send (%s mode%s)",
           len(items), len(unique), len(messages), len(missing), mode,
           ", batch" if use_batch and mode == "live" else "")

  not_sent: set[str] = set()
  failed: dict[str, str] = {}
  batch_info = None
  if missing and mode == "replay":
    names = [it.name for it in missing]
    shown = "; ".join(names[:5]) + (f"; ... ({len(names) - 5} more)" if len(names) > 5 else "")
    raise ReplayMissError(
        f"replay mode: {len(names)} request(s) are neither in the cache {cache.root} nor "
        f"covered by replay_files: {shown}. Run in live mode first, or pass "
        f"replay_files={{'edkg': ..., 'scdg': ...}}.")
  if missing and use_batch:
    outcome = messenger.run_batch({it.key: it.params for it in missing},
                                  {it.key: it.kind for it in missing},
                                  workdir / BATCH_STATE_FILE,
                                  poll_interval_s=cfg.poll_interval_s,
                                  max_wait_s=cfg.batch_max_wait_s)
    messages.update({k: v for k, v in outcome.messages.items() if k in unique})
    failed = {k: v for k, v in outcome.failed.items() if k in unique and k not in messages}
    not_sent = set(outcome.not_submitted)
    batch_info = {"batch_ids": outcome.batch_ids, "polls": outcome.polls,
                  "state_file": BATCH_STATE_FILE}
  elif missing:
    got, skipped = _run_live(messenger, missing, cfg.max_concurrency)
    messages.update(got)
    not_sent = set(skipped)

  # Validate everything, in a deterministic order.
  leakage = LeakageIndex([inst.text for inst in eval_instances], cfg.leakage_ngram)
  validator = Validator(schema, leakage, list(cfg.entity_types or []),
                        [inst.text for inst in train_instances])
  tally = _Tally()
  records: dict[str, list[dict]] = {"edkg": [], "scdg": []}
  requested = {"edkg": 0, "scdg": 0}
  not_generated: dict[str, list[str]] = {"edkg": [], "scdg": []}
  failed_requests = []
  for kind in kinds:
    if kind in replay:
      requested[kind] = _replay_file(kind, replay[kind], validator, tally, records[kind])
      continue
    for item in (it for it in items if it.kind == kind):
      requested[kind] += 1 if kind == "edkg" else cfg.scdg_per_relation
      msg = messages.get(item.key)
      if msg is None:
        if item.key in failed:
          tally.reject(Rejection(kind, "request_errored", item.name, failed[item.key], None))
          failed_requests.append({"item": item.name, "error": failed[item.key]})
        else:
          not_generated[kind].append(item.name)
        continue
      if kind == "edkg":
        _validate_edkg_message(item, msg, validator, tally, records[kind])
      else:
        _validate_scdg_message(item, msg, cfg.scdg_per_relation, validator, tally, records[kind])

  if budget.exhausted or not_sent:
    status = "budget_exhausted"
  elif failed_requests:
    status = "incomplete"
  else:
    status = "complete"
  total = collections.Counter()
  for c in tally.by_kind.values():
    total.update(c)
  usage = stats.to_json()
  report: dict[str, Any] = {
      "status": status,
      "mode": mode,
      "use_batch": bool(use_batch and mode == "live"),
      "model": cfg.model,
      "structured_output": cfg.structured_output,
      **usage,
      "price_usd_per_mtok": (None if price is None else {
          "input": price.input_per_mtok, "output": price.output_per_mtok,
          "batch_discount": price.batch_discount}),
      "budget": {"max_requests": cfg.max_requests, "max_total_tokens": cfg.max_total_tokens,
                 "exhausted": bool(budget.exhausted or not_sent), "reason": budget.reason},
      "rejections": dict(sorted(total.items())),
      "not_generated": not_generated["edkg"] + not_generated["scdg"],
      "failed_requests": failed_requests,
      "batch": batch_info,
      "replay_files": {k: str(v) for k, v in replay.items()},
      "leakage": {"ngram": cfg.leakage_ngram, "eval_texts": leakage.size},
      "cache_dir": str(cache.root),
      "outputs": {},
  }
  for kind in ("edkg", "scdg"):
    report[kind] = {
        "enabled": kind in kinds,
        "requested": requested[kind],
        "accepted": len(records[kind]),
        "rejected": sum(tally.by_kind[kind].values()),
        "rejections": dict(sorted(tally.by_kind[kind].items())),
        "not_generated": len(not_generated[kind]),
    }

  # Write: data files first, the report last (its presence marks a finished run).
  files = {"edkg": EDKG_FILE, "scdg": SCDG_FILE}
  order = {"edkg": EDKG_KEYS, "scdg": SCDG_KEYS}
  for kind in kinds:
    atomic_write_jsonl(workdir / files[kind],
                       ({k: r[k] for k in order[kind]} for r in records[kind]))
    report["outputs"][kind] = files[kind]
  atomic_write_jsonl(workdir / REJECTED_FILE, (r.to_json() for r in tally.rejections))
  report["outputs"]["rejected"] = REJECTED_FILE
  report["outputs"]["report"] = REPORT_FILE
  atomic_write_json(workdir / REPORT_FILE, report)
  log.info("generate %s: EDKG %d accepted / %d rejected, SCDG %d accepted / %d rejected; "
           "%d request(s), %d input + %d output tokens, ~$%.4f, %d cache hit(s)", status,
           report["edkg"]["accepted"], report["edkg"]["rejected"], report["scdg"]["accepted"],
           report["scdg"]["rejected"], usage["requests"], usage["input_tokens"],
           usage["output_tokens"], usage["estimated_cost_usd"], usage["cache_hits"])
  return report


__all__ = ["run_generate", "default_generate_config", "GenerateError", "ReplayMissError",
           "RequestFailedError", "DEFAULT_MODEL"]
