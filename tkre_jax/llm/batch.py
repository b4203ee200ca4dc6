"""The Message Batches API path of the generate stage: submit, poll, collect, resume.

`run_batch` sends the uncached requests as one Message Batch (half price), records its id in
`batch_state.json` before polling, and on a rerun resumes the batch recorded there instead of
submitting a new one. Each API call goes through `Messenger.call`, so it has the SDK's retries,
with one restriction: submitting a batch is retried only after a 429 or 529 (see
`refused_or_final`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Callable, Mapping, Optional

from tkre_jax.llm.cache import atomic_write_json
from tkre_jax.llm.client import (BatchError, GenerateError, Messenger, RequestFailedError,
                                 message_json)

log = logging.getLogger(__name__)

# Statuses that say the batch was refused, not created: the only ones a submission is retried on.
_REFUSED_STATUS = frozenset({429, 529})


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


def refused_or_final(request: Any, call_next: Any) -> Any:
  """SDK middleware for `batches.create`: no retry unless the API refused the batch.

  The SDK retries a POST after a timeout, a connection error or a 5xx, and sends this API no
  idempotency key, so a retried submission can create (and bill) a second batch when the first
  one was created. Only 429 and 529 answers, which mean nothing was created, keep the SDK's
  retries; any other failure is final (`RequestFailedError`), and the message says to check for
  a batch before rerunning.
  """
  try:
    response = call_next(request)
  except Exception as e:
    raise _MaybeCreated(f"{type(e).__name__}: {e}") from None
  if not response.http_response.is_success and response.status_code not in _REFUSED_STATUS:
    response.http_response.headers["x-should-retry"] = "false"
  return response


class _MaybeCreated(Exception):
  """A batch submission whose outcome is unknown (not an SDK error: the SDK does not retry it)."""


def run_batch(messenger: Messenger, requests: Mapping[str, Mapping[str, Any]],
              kinds: Mapping[str, str], state_path: pathlib.Path, *, poll_interval_s: float,
              max_wait_s: float, sleep: Callable[[float], None] = time.sleep,
              clock: Callable[[], float] = time.monotonic) -> BatchOutcome:
  """Gets responses for `requests` (cache key -> body) through the Message Batches API.

  First resumes the batch recorded in `state_path` if it was not collected yet (no new
  submission for what it holds); then submits one batch for the keys still missing (at most the
  budget's remaining requests), records its id in `state_path` before polling, polls every
  `poll_interval_s` seconds (one log line per poll with the request counts) and reads the
  results. Succeeded results are cached and counted at the batch price; errored, canceled and
  expired ones are returned in `failed` (a later run resubmits them).

  Args:
    messenger: client, cache, usage and budget.
    requests: cache key -> request body, all of them cache misses.
    kinds: cache key -> short label (`edkg`/`scdg`) used in the custom ids.
    state_path: `batch_state.json`.
    poll_interval_s: seconds between polls.
    max_wait_s: give up polling after this many seconds (the batch keeps running; a rerun
      resumes it).
    sleep: called with `poll_interval_s` between polls.
    clock: monotonic clock (seconds).

  Raises:
    BatchError: the batch state file is unreadable, or polling timed out.
    RequestFailedError: an API call failed for good, or a submission's outcome is unknown.
  """
  if messenger.client is None:
    raise GenerateError("batch mode needs an API client")
  out = BatchOutcome()
  state = _read_state(state_path)
  if state is not None and state.get("status") != "collected":
    log.info("resuming Message Batch %s from %s (%d requests)", state["batch_id"], state_path,
             len(state["requests"]))
    _collect(messenger, state, state_path, requests, out, poll_interval_s, max_wait_s, sleep,
             clock)
  todo = [k for k in requests if k not in out.messages and k not in out.failed
          and messenger.cache.get(k) is None]
  if not todo:
    return out
  allowed = messenger.budget.take(len(todo))
  out.not_submitted = todo[allowed:]
  todo = todo[:allowed]
  if not todo:
    return out
  custom = {f"{kinds.get(k, 'req')}_{k[:48]}": k for k in todo}
  body = [{"custom_id": cid, "params": dict(requests[k])} for cid, k in custom.items()]
  what = f"submitting a Message Batch of {len(body)} requests"
  try:
    batch = messenger.call(lambda c: c.messages.batches.create(requests=body), what,
                           middleware=refused_or_final)
  except _MaybeCreated as e:
    raise RequestFailedError(f"{what}: {e}; not retried, since the batch may have been created: "
                             f"check the Message Batches in the Claude Console before rerunning "
                             f"(a rerun submits a new batch)") from None
  state = {"batch_id": batch.id, "status": "submitted", "requests": custom,
           "created_at": str(getattr(batch, "created_at", "")), "model": _models(requests)}
  atomic_write_json(state_path, state)
  log.info("submitted Message Batch %s with %d requests (state in %s)", batch.id, len(body),
           state_path)
  _collect(messenger, state, state_path, requests, out, poll_interval_s, max_wait_s, sleep, clock)
  return out


def _collect(messenger: Messenger, state: dict, state_path: pathlib.Path,
             requests: Mapping[str, Mapping[str, Any]], out: BatchOutcome,
             poll_interval_s: float, max_wait_s: float, sleep: Callable[[float], None],
             clock: Callable[[], float]) -> None:
  batch_id = state["batch_id"]
  out.batch_ids.append(batch_id)
  start = clock()
  # Our own loop: the SDK has no call that waits for a batch to end, and a batch takes up to
  # 24 h; each `retrieve` has the SDK's retries.
  while True:
    batch = messenger.call(lambda c: c.messages.batches.retrieve(batch_id),
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
    sleep(poll_interval_s)
  results = messenger.call(lambda c: list(c.messages.batches.results(batch_id)),
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
      msg = message_json(result.message)
      messenger.stats.add_response(msg.get("usage") or {}, batch=True)
      messenger.cache.put(key, requests.get(key), msg, source="batch", batch_id=batch_id)
      out.messages[key] = msg
    elif result.type == "errored":
      err = getattr(result, "error", None)
      inner = getattr(err, "error", None)
      detail = getattr(inner, "message", None) or str(err)
      out.failed[key] = f"errored ({getattr(inner, 'type', 'error')}): {detail}"
    else:
      out.failed[key] = result.type
  for key in mapping.values():
    if key not in seen:
      out.failed[key] = "no result in the batch output"
  atomic_write_json(state_path, dict(state, status="collected"))


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
