"""The generate stage: EDKG explanations and SCDG synthetic instances for the K-shot training split.

`run` reads the prepared inputs of the config (K-shot train, dev and test, relation schema) and
calls `run_generate`, which turns the training instances and the schema into `edkg.jsonl` and
`scdg.jsonl` through the Anthropic API (or replays them), validating every generation
(`llm.validate`) and caching every response on disk (`llm.cache`). Outputs in `workdir`:

* `edkg.jsonl`: `{relation, subject, object, context, generated_text}` per line.
* `scdg.jsonl`: `{text, subj, subj_start, subj_end, obj, obj_start, obj_end, subj_type,
  obj_type, relation}` per line (character offsets, end exclusive).
* `rejected.jsonl`: every rejected generation with its reason, where it came from and the
  candidate itself.
* `generate_report.json`: status (`complete`, `budget_exhausted` or `incomplete`), requests,
  attempts, retries, tokens, estimated cost (USD), cache hits, rejections by reason per kind.
* `cache/` (or `config.generate.cache_dir`): one JSON file per request, keyed by the sha256 of
  the request.
* `batch_state.json` (batch mode): the submitted batch's id and custom ids, for resuming.
* `summary.json`: the stage summary (with the report).

All files are written atomically; when the run fails (an API error that the SDK's retries do not
fix, a replay miss, bad input) no output file is written or changed, and what was paid for is in
the cache, so rerunning resumes without repeating a paid request.
"""

from __future__ import annotations

import collections
import logging
import pathlib
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

from tkre_jax import config as config_lib
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.llm import batch as llm_batch_lib
from tkre_jax.llm import records
from tkre_jax.llm.cache import RequestCache, atomic_write_json, atomic_write_jsonl
from tkre_jax.llm.client import (Budget, Messenger, Price, ReplayMissError, UsageStats,
                                 make_client, prices_from_config)
from tkre_jax.llm.validate import EDKG_KEYS, SCDG_KEYS, LeakageIndex, Rejection, Validator
from tkre_jax.train import runtime

log = logging.getLogger(__name__)

EDKG_FILE = "edkg.jsonl"
SCDG_FILE = "scdg.jsonl"
REJECTED_FILE = "rejected.jsonl"
REPORT_FILE = "generate_report.json"
BATCH_STATE_FILE = "batch_state.json"
KINDS = ("edkg", "scdg")


def run(stage, config, workdir: pathlib.Path, *, llm="live", llm_batch=False, **_) -> dict:
  """EDKG explanations and SCDG synthetic instances for the K-shot training split.

  Args:
    stage: `generate`.
    config: the full config; reads `data` (splits, schema, and in replay mode
      `edkg_file`/`scdg_file`) and `generate`.
    workdir: output folder (created).
    llm: `live` or `replay` (see `run_generate`'s `mode`).
    llm_batch: live mode through the Message Batches API.

  Returns:
    The summary (also in `<workdir>/summary.json`), with the report under `report`.
  """
  del stage
  from tkre_jax.data import preparation
  data = preparation.load_splits(config)  # the workdir is created only once the inputs are checked
  schema = preparation.read_schema(config) or {}
  if not schema:
    # No schema file: the relation label is its own name, with no description.
    schema = {inst.relation: (inst.relation, "") for inst in data["train"]}
  replay_files = None
  if llm == "replay":
    replay_files = {k: str(config_lib.resolve_path(config, f)) for k, f in
                    (("edkg", config.data.edkg_file), ("scdg", config.data.scdg_file)) if f}
  report = run_generate(data["train"], schema, data["dev"] + data["test"], config.generate,
                        workdir, mode=llm, use_batch=llm_batch, replay_files=replay_files)
  summary = {"stage": "generate", "steps": 0, "mode": llm, "batch": llm_batch, "report": report}
  runtime.write_summary(workdir, summary)
  return summary


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
    cfg: `config.base_config().generate` (possibly overridden), its values checked by
      `config.validate(config, "generate")` (which `stages.run` calls before `run`).
    workdir: output folder (created).
    mode: `live` (cache, then the API; needs `ANTHROPIC_API_KEY` unless `client` is given) or
      `replay` (cache and `replay_files` only; no API key, no request; a miss is an error).
    use_batch: live mode: send the uncached requests through the Message Batches API (50%
      price), resuming the batch in `workdir/batch_state.json` on rerun.
    client: an `anthropic.Anthropic` to use instead of one built from `ANTHROPIC_API_KEY`
      (tests pass one with a mock transport); used with `cfg.max_retries` and `cfg.timeout_s`.
    replay_files: replay mode: `{"edkg": path, "scdg": path}` pre-generated JSONL files (either
      or both) validated like live generations; kinds without a file come from the cache.
    sleep: called with `cfg.poll_interval_s` between Message Batch polls (seconds).

  Returns:
    The report (also written to `generate_report.json`): `status` (`complete`,
    `budget_exhausted`: the budget stopped the run and the outputs hold what was generated;
    `incomplete`: some batch requests failed, a rerun resubmits them), `requests`,
    `attempts`, `retries`, `cache_hits`, `input_tokens`, `output_tokens`,
    `estimated_cost_usd`, per kind `{requested, accepted, rejected, rejections,
    not_generated}`, total `rejections` by reason, `not_generated` and `failed_requests`
    (request names), `batch`, `outputs` and more.

  Raises:
    ValueError: bad schema, mode or replay_files argument; unknown model price in
      live mode.
    DataError: a training relation missing from the schema; an unreadable replay file.
    MissingApiKeyError: live mode, no `client` and no `ANTHROPIC_API_KEY` (before any work).
    ReplayMissError: replay mode and requests neither cached nor replayed (names them).
    RequestFailedError: an API request failed for good (not retryable, or the SDK's retries
      exhausted); nothing is written, the responses received so far are cached.
    BatchError: a Message Batch could not be read, or polling timed out.
  """
  if mode not in ("live", "replay"):
    raise ValueError(f"mode must be 'live' or 'replay', got {mode!r}")
  schema = _check_schema(schema)
  replay = _check_replay_files(replay_files, mode)
  if not train_instances:
    raise ValueError("train_instances is empty")
  by_rel = _group(train_instances, schema)
  price: Optional[Price] = None
  if mode == "live" or cfg.model in (cfg.prices or {}):
    price = prices_from_config(cfg.prices, cfg.model, cfg.batch_discount)
  if mode == "live" and client is None:
    client = make_client(cfg.timeout_s, cfg.max_retries)  # MissingApiKeyError before any work
  if mode == "replay":
    client = None
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cache = RequestCache(pathlib.Path(cfg.cache_dir) if cfg.cache_dir else workdir / "cache")
  stats = UsageStats(price)
  budget = Budget(stats, cfg.max_requests, cfg.max_total_tokens)
  messenger = Messenger(client, cache, stats, budget, max_retries=cfg.max_retries,
                        timeout_s=cfg.timeout_s)

  kinds = [k for k in KINDS if cfg[k]]
  reqs = records.build_requests(by_rel, schema, cfg, [k for k in kinds if k not in replay])
  got = _responses(messenger, reqs, cfg, workdir, mode, use_batch and mode == "live", sleep)

  # Validate everything, in a deterministic order.
  leakage = LeakageIndex([inst.text for inst in eval_instances], cfg.leakage_ngram)
  validator = Validator(schema, leakage, list(cfg.entity_types or []),
                        [inst.text for inst in train_instances])
  tally = records.Tally()
  out: dict[str, list[dict]] = {k: [] for k in KINDS}
  requested = {k: 0 for k in KINDS}
  not_generated: dict[str, list[str]] = {k: [] for k in KINDS}
  failed_requests = []
  for kind in kinds:
    if kind in replay:
      out[kind], requested[kind] = records.replay_file(kind, replay[kind], validator, tally)
      continue
    for req in (r for r in reqs if r.kind == kind):
      requested[kind] += 1 if kind == "edkg" else cfg.scdg_per_relation
      msg = got["messages"].get(req.key)
      if msg is None:
        if req.key in got["failed"]:
          tally.reject(Rejection(kind, "request_errored", req.name, got["failed"][req.key], None))
          failed_requests.append({"item": req.name, "error": got["failed"][req.key]})
        else:
          not_generated[kind].append(req.name)
      elif kind == "edkg":
        out[kind] += records.edkg_records(req, msg, validator, tally)
      else:
        out[kind] += records.scdg_records(req, msg, cfg.scdg_per_relation, validator, tally)

  if budget.exhausted or got["not_sent"]:
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
                 "exhausted": bool(budget.exhausted or got["not_sent"]),
                 "reason": budget.reason},
      "rejections": dict(sorted(total.items())),
      "not_generated": not_generated["edkg"] + not_generated["scdg"],
      "failed_requests": failed_requests,
      "batch": got["batch"],
      "replay_files": {k: str(v) for k, v in replay.items()},
      "leakage": {"ngram": cfg.leakage_ngram, "eval_texts": leakage.size},
      "cache_dir": str(cache.root),
      "outputs": {},
  }
  for kind in KINDS:
    report[kind] = {
        "enabled": kind in kinds,
        "requested": requested[kind],
        "accepted": len(out[kind]),
        "rejected": sum(tally.by_kind[kind].values()),
        "rejections": dict(sorted(tally.by_kind[kind].items())),
        "not_generated": len(not_generated[kind]),
    }
  _write(workdir, kinds, out, tally, report)
  log.info("generate %s: EDKG %d accepted / %d rejected, SCDG %d accepted / %d rejected; "
           "%d request(s), %d input + %d output tokens, ~$%.4f, %d cache hit(s)", status,
           report["edkg"]["accepted"], report["edkg"]["rejected"], report["scdg"]["accepted"],
           report["scdg"]["rejected"], usage["requests"], usage["input_tokens"],
           usage["output_tokens"], usage["estimated_cost_usd"], usage["cache_hits"])
  return report


def _responses(messenger: Messenger, reqs: Sequence[records.Request],
               cfg: ml_collections.ConfigDict, workdir: pathlib.Path, mode: str,
               use_batch: bool, sleep: Callable[[float], None]) -> dict[str, Any]:
  """The responses to `reqs`: from the cache, then the API (live or batch).

  Returns:
    `{"messages": key -> message, "failed": key -> why (batch results), "not_sent": keys
    skipped for the budget, "batch": batch ids and polls, or None}`.

  Raises:
    ReplayMissError: replay mode and requests that are not cached.
  """
  unique: dict[str, records.Request] = {}
  for req in reqs:
    unique.setdefault(req.key, req)
  messages: dict[str, dict] = {}
  for key in unique:
    msg = messenger.cached(key)
    if msg is not None:
      messages[key] = msg
  missing = [r for k, r in unique.items() if k not in messages]
  log.info("generate: %d request(s) (%d unique), %d cached, %d to send (%s mode%s)",
           len(reqs), len(unique), len(messages), len(missing), mode,
           ", batch" if use_batch else "")
  out = {"messages": messages, "failed": {}, "not_sent": set(), "batch": None}
  if missing and mode == "replay":
    names = [r.name for r in missing]
    shown = "; ".join(names[:5]) + (f"; ... ({len(names) - 5} more)" if len(names) > 5 else "")
    raise ReplayMissError(
        f"replay mode: {len(names)} request(s) are neither in the cache {messenger.cache.root} "
        f"nor covered by replay_files: {shown}. Run in live mode first, or pass "
        f"replay_files={{'edkg': ..., 'scdg': ...}}.")
  if missing and use_batch:
    outcome = llm_batch_lib.run_batch(
        messenger, {r.key: r.params for r in missing}, {r.key: r.kind for r in missing},
        workdir / BATCH_STATE_FILE, poll_interval_s=cfg.poll_interval_s,
        max_wait_s=cfg.batch_max_wait_s, sleep=sleep)
    messages.update({k: v for k, v in outcome.messages.items() if k in unique})
    out["failed"] = {k: v for k, v in outcome.failed.items() if k in unique and k not in messages}
    out["not_sent"] = set(outcome.not_submitted)
    out["batch"] = {"batch_ids": outcome.batch_ids, "polls": outcome.polls,
                    "state_file": BATCH_STATE_FILE}
  elif missing:
    sent, skipped = messenger.create_many(missing, cfg.max_concurrency)
    messages.update(sent)
    out["not_sent"] = set(skipped)
  return out


def _write(workdir: pathlib.Path, kinds: Sequence[str], out: Mapping[str, list[dict]],
           tally: records.Tally, report: dict[str, Any]) -> None:
  """Writes the data files first, the report last (its presence marks a finished run)."""
  files = {"edkg": EDKG_FILE, "scdg": SCDG_FILE}
  order = {"edkg": EDKG_KEYS, "scdg": SCDG_KEYS}
  for kind in kinds:
    atomic_write_jsonl(workdir / files[kind], ({k: r[k] for k in order[kind]} for r in out[kind]))
    report["outputs"][kind] = files[kind]
  atomic_write_jsonl(workdir / REJECTED_FILE, (r.to_json() for r in tally.rejections))
  report["outputs"]["rejected"] = REJECTED_FILE
  report["outputs"]["report"] = REPORT_FILE
  atomic_write_json(workdir / REPORT_FILE, report)


# ------------------------------------------------------------------------------------------
# Argument checks


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
    if kind not in KINDS:
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
