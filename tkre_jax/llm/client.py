"""Anthropic client side of the generate stage: errors, usage and cost, budget, requests.

* `make_client`: an `anthropic.Anthropic` whose key comes from `ANTHROPIC_API_KEY` only.
* `Budget`: caps on paid requests and on tokens; `UsageStats`: requests, attempts, tokens and
  the estimated cost in USD (batch requests at the batch discount).
* `Messenger`: cache -> budget -> API for one request (`messages.create`), and `create_many`
  for a thread pool of them. Retries are the anthropic SDK's own (`max_retries`: 408, 409, 429,
  5xx incl. 529 overloaded, timeouts and connection errors; exponential backoff with jitter, or
  the server's `retry-after` / `retry-after-ms`). SDK middleware, which runs once per HTTP
  attempt inside the SDK's retry loop, counts the attempts and stops retries of the 429s that
  waiting does not fix (spend limits).

The Message Batches API is in `batch`, the response cache in `cache`. Nothing here logs the API
key or writes it anywhere.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
from typing import Any, Mapping, Optional, Sequence

from tkre_jax.llm.cache import RequestCache
from tkre_jax.progress import Progress

log = logging.getLogger(__name__)

# 429s that waiting does not fix (`error.details.error_code` of the response body).
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


def describe_error(err: BaseException) -> str:
  """A one-line description of an SDK error (status, type, message); never includes headers."""
  status = getattr(err, "status_code", None)
  kind = type(err).__name__
  msg = getattr(err, "api_message", None) or getattr(err, "message", None) or str(err)
  return f"{kind}" + (f" (HTTP {status})" if status is not None else "") + f": {msg}"


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


def prices_from_config(prices: Mapping[str, Any], model: str, batch_discount: float) -> Price:
  """The `Price` of `model` from the config's price table (`config.generate.prices`).

  Raises:
    ValueError: the model has no price entry.
  """
  entry = prices.get(model) if prices is not None else None
  if entry is None:
    raise ValueError(f"no price for model {model!r} in cfg.prices (known: "
                     f"{sorted(prices or {})}); add input_per_mtok / output_per_mtok in USD")
  return Price(float(entry["input_per_mtok"]), float(entry["output_per_mtok"]),
               float(batch_discount))


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
# The client and its middleware


def make_client(timeout_s: float, max_retries: int = 5) -> Any:
  """An `anthropic.Anthropic` client whose key comes from `ANTHROPIC_API_KEY` only.

  Args:
    timeout_s: per-request timeout in seconds.
    max_retries: the SDK's retries per request.

  Raises:
    MissingApiKeyError: the variable is unset or empty.
  """
  import anthropic  # local: keeps `import tkre_jax.llm.client` cheap
  key = os.environ.get("ANTHROPIC_API_KEY", "")
  if not key.strip():
    raise MissingApiKeyError(
        "live generation needs an Anthropic API key in the ANTHROPIC_API_KEY environment "
        "variable (it is not read from any other place); set it, or use mode='replay'")
  return anthropic.Anthropic(api_key=key, max_retries=max_retries, timeout=timeout_s)


def _error_code(http_response: Any) -> Optional[str]:
  """`error.details.error_code` of an error response's JSON body, or None."""
  try:
    http_response.read()
    code = http_response.json()["error"]["details"]["error_code"]
  except (ValueError, KeyError, TypeError):
    return None
  return code if isinstance(code, str) else None


def stop_on_spend_limit(request: Any, call_next: Any) -> Any:
  """SDK middleware: a 429 for a spend limit is not retried (the SDK retries every 429 unless
  the server sends `x-should-retry: false`); the SDK then raises it at once."""
  response = call_next(request)
  if response.status_code == 429 and (_error_code(response.http_response)
                                      in NON_RETRYABLE_ERROR_CODES):
    response.http_response.headers["x-should-retry"] = "false"
  return response


class _Attempts:
  """SDK middleware of one call: counts its HTTP attempts (into `stats`: attempts, retries) and
  logs the failed ones."""

  def __init__(self, what: str, stats: Optional[UsageStats]):
    self.what = what
    self.stats = stats
    self.n = 0

  def __call__(self, request: Any, call_next: Any) -> Any:
    self.n += 1
    if self.stats is not None:
      self.stats.add(attempts=1, retries=int(request.retries_taken > 0))
    try:
      response = call_next(request)
    except Exception as e:
      log.warning("%s: attempt %d: %s", self.what, self.n, describe_error(e))
      raise
    if not response.http_response.is_success:
      log.warning("%s: attempt %d: HTTP %d", self.what, self.n, response.status_code)
    return response


def message_json(obj: Any) -> dict[str, Any]:
  """An SDK response model (or a mapping) as a JSON-ready dict."""
  if isinstance(obj, Mapping):
    return dict(obj)
  return obj.model_dump(mode="json")


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits a request body into `messages.create` keyword arguments and `extra_body`."""
  kwargs = {k: v for k, v in params.items() if k not in _EXTRA_BODY_KEYS}
  extra = {k: params[k] for k in _EXTRA_BODY_KEYS if k in params}
  return kwargs, extra


class Messenger:
  """Sends requests through the cache, the budget and the SDK's retries.

  Args:
    client: an `anthropic.Anthropic`; a copy with `max_retries`, `timeout_s` and
      `stop_on_spend_limit` is used. None in replay mode.
    cache: the response cache.
    stats: usage counters.
    budget: request/token caps.
    max_retries: the SDK's retries per request.
    timeout_s: per-request timeout in seconds (None: the client's).
  """

  def __init__(self, client: Any, cache: RequestCache, stats: UsageStats, budget: Budget, *,
               max_retries: int, timeout_s: Optional[float] = None):
    if client is not None:
      opts: dict[str, Any] = {"max_retries": int(max_retries)}
      if timeout_s:
        opts["timeout"] = float(timeout_s)
      client = client.with_options(**opts).with_middleware(stop_on_spend_limit)
    self.client = client
    self.cache = cache
    self.stats = stats
    self.budget = budget
    self.max_retries = int(max_retries)

  def cached(self, key: str) -> Optional[dict[str, Any]]:
    """A cache lookup that counts hits."""
    msg = self.cache.get(key)
    if msg is not None:
      self.stats.add(cache_hits=1)
    return msg

  def call(self, fn: Any, what: str, *, count: bool = False, middleware: Any = None) -> Any:
    """`fn(client)` with this messenger's client, SDK errors turned into `RequestFailedError`.

    Args:
      fn: the API call, given the client.
      what: names the request in log lines and errors.
      count: count the HTTP attempts in `stats`.
      middleware: extra SDK middleware for this call.

    Raises:
      RequestFailedError: the SDK gave up (non-retryable error, or `max_retries` exhausted),
        chained to its error.
    """
    import anthropic
    if self.client is None:
      raise GenerateError(f"{what}: no API client (replay mode)")
    attempts = _Attempts(what, self.stats if count else None)
    client = self.client.with_middleware(*([middleware] if middleware else []), attempts)
    try:
      return fn(client)
    except anthropic.AnthropicError as e:
      why = ("not retryable" if attempts.n <= self.max_retries
             else f"gave up after {attempts.n} attempt(s)")
      raise RequestFailedError(f"{what}: {describe_error(e)} ({why})") from e

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
    message = self.call(lambda c: c.messages.create(**kwargs), what, count=True)
    msg = message_json(message)
    self.stats.add_response(msg.get("usage") or {})
    self.cache.put(key, params, msg, source="messages")
    return msg

  def create_many(self, todo: Sequence[Any], max_concurrency: int
                  ) -> tuple[dict[str, dict], list[str]]:
    """`create` for each of `todo` (objects with `key`, `params` and `name`; unique keys) on a
    thread pool of `max_concurrency`.

    Returns:
      (key -> message, keys skipped for the budget).

    Raises:
      RequestFailedError: on a fatal error, the requests in flight finish (they are cached), no
        new one starts, and the first fatal error in `todo` order is raised.
    """
    messages: dict[str, dict] = {}
    skipped: list[str] = []
    errors: dict[str, BaseException] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def work(item: Any) -> None:
      if stop.is_set():
        with lock:
          skipped.append(item.key)
        return
      try:
        msg = self.create(item.key, item.params, item.name)
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
      with Progress(len(futures), "generate", "request") as bar:
        for f in concurrent.futures.as_completed(futures):
          f.result()
          bar.update()
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
