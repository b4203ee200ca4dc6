"""Anthropic client side of the generate stage: request cache, retries, budget, usage, batches.

* `RequestCache`: one JSON file per request under `<cache_dir>/<key[:2]>/<key>.json`, where the
  key is the sha256 of the canonical JSON of the full request body (model, system, messages,
  tools, tool_choice, output_config, max_tokens, temperature). Written atomically (temporary
  file, then `os.replace`), so an interrupted run leaves complete entries only and a rerun
  never pays for a request twice.
* `call_with_retries`: our own retry loop (the SDK client is used with `max_retries=0` so the
  number of attempts is exactly ours): exponential backoff with jitter, honouring
  `retry-after`, on 408, 409, 429, 5xx (incl. 529 overloaded), timeouts and connection
  errors; not on 4xx client errors or spend-limit 429s. The sleep function is injectable.
* `Budget`: caps on paid requests and on tokens; `UsageStats`: requests, attempts, tokens and
  the estimated cost in USD (batch requests at the batch discount).
* `Messenger`: cache -> budget -> API for one request (`messages.create`), and
  `run_batch` for the Message Batches API, with `batch_state.json` so that a rerun resumes
  the batch it already submitted.

The API key is read by the SDK from `ANTHROPIC_API_KEY` (see `make_client`); nothing here logs
it or writes it anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429})
# 429s that waiting does not fix.
NON_RETRYABLE_ERROR_CODES = frozenset({
    "contract_spend_limit_reached", "enforced_spend_limit_reached",
    "linked_organization_spend_limit_reached", "linked_organization_billing_unavailable",
})
# Parameters of the request body that `messages.create` in this SDK has no argument for; they
# are sent through `extra_body` (they are part of the cache key like everything else).
_EXTRA_BODY_KEYS = ("temperature", "top_p", "top_k")


# ------------------------------------------------------------------------------------------
# Errors


class GenerateError(RuntimeError):
  """Base class of the generate stage's errors."""


class MissingApiKeyError(GenerateError):
  """Live mode without `ANTHROPIC_API_KEY`."""


class ReplayMissError(GenerateError):
  """Replay mode and a request that is neither cached nor in the replay files."""


class RequestFailedError(GenerateError):
  """An API request failed for good (non-retryable error, or retries exhausted)."""


class BatchError(GenerateError):
  """A Message Batch could not be submitted, polled or read."""


class BudgetExhausted(Exception):
  """Raised (internally) when a paid request would exceed `max_requests`/`max_total_tokens`."""


# ------------------------------------------------------------------------------------------
# Files


def atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same folder and `os.replace`, so
  readers see either the old file or the complete new one.

  Raises:
    OSError: the folder is not writable.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def atomic_write_json(path: pathlib.Path, obj: Any) -> None:
  """`atomic_write_text` of `obj` as indented JSON."""
  atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_write_jsonl(path: pathlib.Path, records: Iterable[Any]) -> None:
  """`atomic_write_text` of one JSON object per line (UTF-8, no ASCII escaping)."""
  atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ------------------------------------------------------------------------------------------
# Cache


def request_key(params: Mapping[str, Any]) -> str:
  """sha256 (hex) of the canonical JSON (sorted keys, compact) of a request body."""
  blob = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RequestCache:
  """On-disk cache of API responses keyed by `request_key`.

  Each entry is `{"key", "params", "message", "source", "batch_id"}` where `message` is the
  Messages API response as JSON. Unreadable entries count as misses (with a warning).

  Args:
    root: the cache folder (created on first write).
  """

  def __init__(self, root: pathlib.Path):
    self.root = pathlib.Path(root)

  def path(self, key: str) -> pathlib.Path:
    return self.root / key[:2] / f"{key}.json"

  def get(self, key: str) -> Optional[dict[str, Any]]:
    """The cached response message for `key`, or None."""
    p = self.path(key)
    if not p.is_file():
      return None
    try:
      entry = json.loads(p.read_text(encoding="utf-8"))
      message = entry["message"]
      if entry.get("key") != key or not isinstance(message, dict):
        raise ValueError("key mismatch or message not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
      log.warning("ignoring unreadable cache entry %s: %s", p, e)
      return None
    return message

  def put(self, key: str, params: Optional[Mapping[str, Any]], message: Mapping[str, Any], *,
          source: str, batch_id: Optional[str] = None) -> None:
    """Stores a response atomically."""
    atomic_write_json(self.path(key), {"key": key, "params": params, "message": message,
                                       "source": source, "batch_id": batch_id})


# ------------------------------------------------------------------------------------------
# Usage, cost and budget


@dataclasses.dataclass(frozen=True)
class Price:
  """USD per million tokens; `batch_discount` is the fraction paid for batch requests (0.5)."""

  input_per_mtok: float
  output_per_mtok: float
  batch_discount: float = 0.5
  cache_write_multiplier: float = 1.25
  cache_read_multiplier: float = 0.1

  def cost(self, usage: Mapping[str, Any], *, batch: bool = False) -> float:
    """Estimated cost in USD of one response's `usage` (input, cache write/read, output)."""
    inp = _int(usage, "input_tokens")
    out = _int(usage, "output_tokens")
    cw = _int(usage, "cache_creation_input_tokens")
    cr = _int(usage, "cache_read_input_tokens")
    usd = (inp * self.input_per_mtok + cw * self.input_per_mtok * self.cache_write_multiplier
           + cr * self.input_per_mtok * self.cache_read_multiplier
           + out * self.output_per_mtok) / 1e6
    return usd * (self.batch_discount if batch else 1.0)


def _int(usage: Mapping[str, Any], key: str) -> int:
  v = usage.get(key) if isinstance(usage, Mapping) else None
  return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


class UsageStats:
  """Thread-safe counters of this run's API use."""

  def __init__(self, price: Optional[Price]):
    self.price = price
    self._lock = threading.Lock()
    self.requests = 0  # paid responses received (messages or batch results)
    self.batch_requests = 0
    self.attempts = 0  # HTTP attempts of messages.create, incl. retries
    self.retries = 0
    self.cache_hits = 0
    self.input_tokens = 0
    self.output_tokens = 0
    self.cache_creation_input_tokens = 0
    self.cache_read_input_tokens = 0
    self.cost_usd = 0.0

  def add_response(self, usage: Mapping[str, Any], *, batch: bool = False) -> None:
    with self._lock:
      self.requests += 1
      self.batch_requests += int(batch)
      self.input_tokens += _int(usage, "input_tokens")
      self.output_tokens += _int(usage, "output_tokens")
      self.cache_creation_input_tokens += _int(usage, "cache_creation_input_tokens")
      self.cache_read_input_tokens += _int(usage, "cache_read_input_tokens")
      if self.price is not None:
        self.cost_usd += self.price.cost(usage, batch=batch)

  def add(self, **counts: int) -> None:
    with self._lock:
      for k, v in counts.items():
        setattr(self, k, getattr(self, k) + v)

  @property
  def total_tokens(self) -> int:
    return (self.input_tokens + self.output_tokens + self.cache_creation_input_tokens
            + self.cache_read_input_tokens)

  def to_json(self) -> dict[str, Any]:
    with self._lock:
      return {
          "requests": self.requests, "batch_requests": self.batch_requests,
          "attempts": self.attempts, "retries": self.retries, "cache_hits": self.cache_hits,
          "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
          "cache_creation_input_tokens": self.cache_creation_input_tokens,
          "cache_read_input_tokens": self.cache_read_input_tokens,
          "estimated_cost_usd": round(self.cost_usd, 6),
      }


class Budget:
  """Caps on this run's paid requests and tokens; 0 means no cap.

  `acquire()` is called before each new paid request: it raises `BudgetExhausted` once
  `max_requests` requests were started, or once the tokens already used (input + output, cache
  tokens included) reach `max_total_tokens`. With concurrent requests the token cap can be
  overshot by the requests in flight.
  """

  def __init__(self, stats: UsageStats, max_requests: int = 0, max_total_tokens: int = 0):
    self.stats = stats
    self.max_requests = int(max_requests or 0)
    self.max_total_tokens = int(max_total_tokens or 0)
    self.started = 0
    self.exhausted = False
    self.reason: Optional[str] = None
    self._lock = threading.Lock()

  def acquire(self) -> None:
    """Reserves one request.

    Raises:
      BudgetExhausted: no request is left under either cap.
    """
    if self.take(1) < 1:
      raise BudgetExhausted(self.reason or "budget exhausted")

  def take(self, n: int) -> int:
    """Reserves up to `n` requests and returns how many were granted (fewer when a cap is
    reached, which marks the budget exhausted)."""
    with self._lock:
      granted = n
      if self.max_total_tokens > 0 and self.stats.total_tokens >= self.max_total_tokens:
        granted = 0
        self.reason = (f"max_total_tokens={self.max_total_tokens} reached "
                       f"({self.stats.total_tokens} used)")
      if self.max_requests > 0 and self.started + granted > self.max_requests:
        granted = max(0, self.max_requests - self.started)
        self.reason = f"max_requests={self.max_requests} reached"
      if granted < n:
        self.exhausted = True
      self.started += granted
      return granted


# ------------------------------------------------------------------------------------------
# Retries


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """Exponential backoff with jitter.

  The delay before retry `i` (0-based) is `min(max_delay_s, base_delay_s * 2**i)` scaled by a
  random factor in [0.5, 1] (seconds); a `retry-after` / `retry-after-ms` response header, when
  present, is used instead (capped at `max_delay_s`).
  """

  max_retries: int = 5
  base_delay_s: float = 1.0
  max_delay_s: float = 60.0

  def delay(self, attempt: int, rng: random.Random, retry_after: Optional[float] = None) -> float:
    if retry_after is not None:
      return max(0.0, min(self.max_delay_s, retry_after))
    d = min(self.max_delay_s, self.base_delay_s * (2 ** attempt))
    return d * (0.5 + 0.5 * rng.random())


def is_retryable(err: BaseException) -> bool:
  """Whether an SDK error is worth retrying: 408, 409, 429 (not spend limits), 5xx, 529,
  timeouts and connection errors; an `x-should-retry` response header overrides."""
  import anthropic  # local: keeps `import tkre_jax.llm.client` cheap
  if isinstance(err, anthropic.APIStatusError):
    hint = err.response.headers.get("x-should-retry")
    if hint in ("true", "false"):
      return hint == "true"
    if getattr(err, "error_code", None) in NON_RETRYABLE_ERROR_CODES:
      return False
    return err.status_code in RETRYABLE_STATUS or err.status_code >= 500
  return isinstance(err, anthropic.APIConnectionError)  # includes APITimeoutError


def _retry_after(err: BaseException) -> Optional[float]:
  response = getattr(err, "response", None)
  if response is None:
    return None
  headers = response.headers
  for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
    v = headers.get(name)
    if v is not None:
      try:
        return float(v) * scale
      except ValueError:
        return None
  return None


def describe_error(err: BaseException) -> str:
  """A one-line description of an SDK error (status, type, message); never includes headers."""
  status = getattr(err, "status_code", None)
  kind = type(err).__name__
  msg = getattr(err, "api_message", None) or getattr(err, "message", None) or str(err)
  return f"{kind}" + (f" (HTTP {status})" if status is not None else "") + f": {msg}"


def call_with_retries(fn: Callable[[], Any], *, what: str, policy: RetryPolicy,
                      sleep: Callable[[float], None], rng: random.Random,
                      stats: Optional[UsageStats] = None,
                      retryable: Callable[[BaseException], bool] = is_retryable) -> Any:
  """Calls `fn()` until it succeeds, retrying retryable SDK errors per `policy`.

  Args:
    fn: the call.
    what: names the request in log lines and errors.
    policy: attempts and delays.
    sleep: called with each delay in seconds (`time.sleep`; a stub in tests).
    rng: jitter source.
    stats: when given, `attempts` and `retries` are counted.
    retryable: which exceptions are retried.

  Returns:
    `fn()`'s result.

  Raises:
    RequestFailedError: a non-retryable SDK error, or retries exhausted (chained to the last
      error).
  """
  import anthropic
  attempt = 0
  while True:
    if stats is not None:
      stats.add(attempts=1)
    try:
      return fn()
    except anthropic.AnthropicError as e:
      if not retryable(e):
        raise RequestFailedError(f"{what}: {describe_error(e)} (not retryable)") from e
      if attempt >= policy.max_retries:
        raise RequestFailedError(f"{what}: {describe_error(e)}; gave up after {attempt + 1} "
                                 f"attempt(s)") from e
      delay = policy.delay(attempt, rng, _retry_after(e))
      log.warning("%s: %s; retry %d/%d in %.2f s", what, describe_error(e), attempt + 1,
                  policy.max_retries, delay)
      if stats is not None:
        stats.add(retries=1)
      sleep(delay)
      attempt += 1


# ------------------------------------------------------------------------------------------
# The client


def make_client(timeout_s: float) -> Any:
  """An `anthropic.Anthropic` client whose key comes from `ANTHROPIC_API_KEY` only.

  Raises:
    MissingApiKeyError: the variable is unset or empty.
  """
  import anthropic
  key = os.environ.get("ANTHROPIC_API_KEY", "")
  if not key.strip():
    raise MissingApiKeyError(
        "live generation needs an Anthropic API key in the ANTHROPIC_API_KEY environment "
        "variable (it is not read from any other place); set it, or use mode='replay'")
  return anthropic.Anthropic(api_key=key, max_retries=0, timeout=timeout_s)


def _to_json(obj: Any) -> dict[str, Any]:
  if isinstance(obj, Mapping):
    return dict(obj)
  return obj.model_dump(mode="json")


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits a request body into `messages.create` keyword arguments and `extra_body`."""
  kwargs = {k: v for k, v in params.items() if k not in _EXTRA_BODY_KEYS}
  extra = {k: params[k] for k in _EXTRA_BODY_KEYS if k in params}
  return kwargs, extra


@dataclasses.dataclass
class BatchOutcome:
  """What a batch run produced.

  Attributes:
    messages: cache key -> response message (succeeded results).
    failed: cache key -> why it failed (errored / canceled / expired results).
    not_submitted: keys left out for the budget.
    batch_ids: the batches polled in this run.
    polls: number of `retrieve` polls.
  """

  messages: dict[str, dict] = dataclasses.field(default_factory=dict)
  failed: dict[str, str] = dataclasses.field(default_factory=dict)
  not_submitted: list[str] = dataclasses.field(default_factory=list)
  batch_ids: list[str] = dataclasses.field(default_factory=list)
  polls: int = 0


class Messenger:
  """Sends requests through the cache, the budget and the retry loop.

  Args:
    client: an `anthropic.Anthropic`; a copy with `max_retries=0` (and `timeout_s`) is used so
      that `policy` alone decides the retries. None in replay mode.
    cache: the response cache.
    stats: usage counters.
    budget: request/token caps.
    policy: retry policy.
    sleep: sleep function (seconds).
    rng: jitter source.
    timeout_s: per-request timeout in seconds.
  """

  def __init__(self, client: Any, cache: RequestCache, stats: UsageStats, budget: Budget,
               policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep,
               rng: Optional[random.Random] = None, timeout_s: Optional[float] = None):
    if client is not None:
      opts: dict[str, Any] = {"max_retries": 0}
      if timeout_s:
        opts["timeout"] = float(timeout_s)
      client = client.with_options(**opts)
    self.client = client
    self.cache = cache
    self.stats = stats
    self.budget = budget
    self.policy = policy
    self.sleep = sleep
    self.rng = rng or random.Random()

  def cached(self, key: str) -> Optional[dict[str, Any]]:
    """A cache lookup that counts hits."""
    msg = self.cache.get(key)
    if msg is not None:
      self.stats.add(cache_hits=1)
    return msg

  def create(self, key: str, params: Mapping[str, Any], what: str) -> dict[str, Any]:
    """One `messages.create` (cache miss assumed): budget, retries, usage, cache write.

    Raises:
      BudgetExhausted: the budget allows no further request.
      RequestFailedError: the request failed for good.
    """
    if self.client is None:
      raise GenerateError(f"{what}: no API client (replay mode)")
    self.budget.acquire()
    kwargs, extra = split_params(params)
    if extra:
      kwargs["extra_body"] = extra
    message = call_with_retries(lambda: self.client.messages.create(**kwargs), what=what,
                                policy=self.policy, sleep=self.sleep, rng=self.rng,
                                stats=self.stats)
    msg = _to_json(message)
    self.stats.add_response(msg.get("usage") or {})
    self.cache.put(key, params, msg, source="messages")
    return msg

  # -- Message Batches ----------------------------------------------------------------------

  def _retry(self, fn: Callable[[], Any], what: str, retryable=is_retryable) -> Any:
    return call_with_retries(fn, what=what, policy=self.policy, sleep=self.sleep, rng=self.rng,
                             retryable=retryable)

  def run_batch(self, requests: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str],
                state_path: pathlib.Path, *, poll_interval_s: float, max_wait_s: float,
                clock: Callable[[], float] = time.monotonic) -> BatchOutcome:
    """Gets responses for `requests` (cache key -> body) through the Message Batches API.

    First resumes the batch recorded in `state_path` if it was not collected yet (no new
    submission for what it holds); then submits one batch for the keys still missing (at
    most the budget's remaining requests), records its id in `state_path` before polling,
    polls every `poll_interval_s` seconds (one log line per poll with the request counts) and
    reads the results. Succeeded results are cached and counted at the batch price; errored,
    canceled and expired ones are returned in `failed` (a later run resubmits them).

    Args:
      requests: cache key -> request body, all of them cache misses.
      kinds: cache key -> short label (`edkg`/`scdg`) used in the custom ids.
      state_path: `batch_state.json`.
      poll_interval_s: seconds between polls.
      max_wait_s: give up polling after this many seconds (the batch keeps running; a rerun
        resumes it).
      clock: monotonic clock (seconds).

    Raises:
      BatchError: a batch could not be submitted or read, or polling timed out.
      RequestFailedError: an API call failed for good.
    """
    if self.client is None:
      raise GenerateError("batch mode needs an API client")
    out = BatchOutcome()
    state = _read_state(state_path)
    if state is not None and state.get("status") != "collected":
      log.info("resuming Message Batch %s from %s (%d requests)", state["batch_id"], state_path,
               len(state["requests"]))
      self._collect(state, state_path, requests, out, poll_interval_s, max_wait_s, clock)
    todo = [k for k in requests if k not in out.messages and k not in out.failed
            and self.cache.get(k) is None]
    if not todo:
      return out
    allowed = self.budget.take(len(todo))
    out.not_submitted = todo[allowed:]
    todo = todo[:allowed]
    if not todo:
      return out
    custom = {f"{kinds.get(k, 'req')}_{k[:48]}": k for k in todo}
    body = [{"custom_id": cid, "params": dict(requests[k])} for cid, k in custom.items()]
    import anthropic

    def create_retryable(e: BaseException) -> bool:
      # Only errors that mean "not accepted": a timed-out create may have created the batch.
      return isinstance(e, (anthropic.RateLimitError, anthropic.OverloadedError)) and \
          is_retryable(e)

    batch = self._retry(lambda: self.client.messages.batches.create(requests=body),
                        f"submitting a Message Batch of {len(body)} requests", create_retryable)
    state = {"batch_id": batch.id, "status": "submitted", "requests": custom,
             "created_at": str(getattr(batch, "created_at", "")), "model": _models(requests)}
    atomic_write_json(state_path, state)
    log.info("submitted Message Batch %s with %d requests (state in %s)", batch.id, len(body),
             state_path)
    self._collect(state, state_path, requests, out, poll_interval_s, max_wait_s, clock)
    return out

  def _collect(self, state: dict, state_path: pathlib.Path,
               requests: Mapping[str, Mapping[str, Any]], out: BatchOutcome,
               poll_interval_s: float, max_wait_s: float, clock: Callable[[], float]) -> None:
    batch_id = state["batch_id"]
    out.batch_ids.append(batch_id)
    start = clock()
    while True:
      batch = self._retry(lambda: self.client.messages.batches.retrieve(batch_id),
                          f"polling Message Batch {batch_id}")
      out.polls += 1
      c = batch.request_counts
      log.info("Message Batch %s: %s, processing=%d succeeded=%d errored=%d canceled=%d "
               "expired=%d", batch_id, batch.processing_status, c.processing, c.succeeded,
               c.errored, c.canceled, c.expired)
      if batch.processing_status == "ended":
        break
      if clock() - start > max_wait_s:
        raise BatchError(f"Message Batch {batch_id} has not ended after {max_wait_s:.0f} s "
                         f"({c.processing} still processing); it keeps running: rerun to "
                         f"resume it (state in {state_path})")
      self.sleep(poll_interval_s)
    results = self._retry(lambda: list(self.client.messages.batches.results(batch_id)),
                          f"reading the results of Message Batch {batch_id}")
    mapping: dict[str, str] = state["requests"]
    seen = set()
    for r in results:
      key = mapping.get(r.custom_id)
      if key is None:
        log.warning("Message Batch %s: result for unknown custom_id %r ignored", batch_id,
                    r.custom_id)
        continue
      seen.add(key)
      result = r.result
      if result.type == "succeeded":
        msg = _to_json(result.message)
        self.stats.add_response(msg.get("usage") or {}, batch=True)
        self.cache.put(key, requests.get(key), msg, source="batch", batch_id=batch_id)
        out.messages[key] = msg
      elif result.type == "errored":
        err = getattr(result, "error", None)
        inner = getattr(err, "error", None)
        detail = getattr(inner, "message", None) or str(err)
        out.failed[key] = f"errored ({getattr(inner, 'type', 'error')}): {detail}"
      else:
        out.failed[key] = result.type
    for cid, key in mapping.items():
      if key not in seen:
        out.failed[key] = "no result in the batch output"
    state = dict(state, status="collected")
    atomic_write_json(state_path, state)


def _models(requests: Mapping[str, Mapping[str, Any]]) -> list[str]:
  return sorted({str(p.get("model")) for p in requests.values()})


def _read_state(path: pathlib.Path) -> Optional[dict[str, Any]]:
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  try:
    state = json.loads(path.read_text(encoding="utf-8"))
    if not (isinstance(state, dict) and isinstance(state.get("batch_id"), str)
            and isinstance(state.get("requests"), dict)):
      raise ValueError("expected an object with 'batch_id' and 'requests'")
  except (OSError, ValueError) as e:
    raise BatchError(f"{path}: unreadable batch state ({e}); delete it only if you are sure "
                     f"its batch need not be collected") from None
  return state


def prices_from_config(prices: Mapping[str, Any], model: str,
                       batch_discount: float) -> Price:
  """The `Price` of `model` from the config's price table.

  Raises:
    ValueError: the model has no price entry.
  """
  entry = prices.get(model) if prices is not None else None
  if entry is None:
    raise ValueError(f"no price for model {model!r} in cfg.prices (known: "
                     f"{sorted(prices or {})}); add input_per_mtok / output_per_mtok in USD")
  return Price(float(entry["input_per_mtok"]), float(entry["output_per_mtok"]),
               float(batch_discount))
