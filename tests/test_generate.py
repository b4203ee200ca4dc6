"""Tests of the generate stage (tkre_jax/stages/generate.py, tkre_jax/llm) against the real
`anthropic` SDK.

The SDK talks to a mock HTTP transport (`httpx2.MockTransport`) that implements the Messages
API (`POST /v1/messages`) and the Message Batches API (`POST /v1/messages/batches`,
`GET /v1/messages/batches/{id}`, `GET /v1/messages/batches/{id}/results`). No network, no real
sleeps: the stage's batch-polling `sleep` and the SDK's retry sleep are recorders.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import pathlib
import re
import threading

import anthropic
import httpx2
import pytest

from tests.conftest import require
from tkre_jax import config as config_lib
from tkre_jax.data.schema import from_char_offsets
from tkre_jax.llm import cache as llm_cache
from tkre_jax.llm import client as llm_client
from tkre_jax.llm import prompts, validate
from tkre_jax.stages.generate import run_generate

SECRET = "sk-ant-test-SECRET123"

SCHEMA = {
    "P17": ("country", "sovereign state that this item is in"),
    "P131": ("located in the administrative territorial entity",
             "the item is located on the territory of the following administrative entity"),
    "P999": ("unused", "a relation with no training instance"),
}


def inst(text, subj, obj, rel, source, subj_type=None, obj_type=None):
  s, o = text.index(subj), text.index(obj)
  return from_char_offsets(text, s, s + len(subj), o, o + len(obj), rel, subj_type=subj_type,
                           obj_type=obj_type, source=source)


TRAIN = [
    inst("The Eiffel Tower stands in Paris , France .", "Eiffel Tower", "France", "P17",
         "train:0", "LOCATION", "LOCATION"),
    inst("Mount Fuji is the highest mountain in Japan .", "Mount Fuji", "Japan", "P17",
         "train:1", "LOCATION", "LOCATION"),
    inst("Soho is a district in the City of Westminster .", "Soho", "City of Westminster",
         "P131", "train:2", "LOCATION", "LOCATION"),
    inst("Brooklyn is one of the five boroughs of New York City .", "Brooklyn", "New York City",
         "P131", "train:3", "LOCATION", "LOCATION"),
]

EVAL = [
    inst("The Louvre Museum is in Paris , France .", "Louvre Museum", "France", "P17", "dev:0"),
    inst("The Danube flows through ten countries before reaching the Black Sea .", "Danube",
         "Black Sea", "P17", "test:0"),
    inst("The old stone bridge crosses the river near the town of Hexham .", "Hexham", "river",
         "P131", "test:1"),
]

GOOD_SCDG = {
    "P17": [
        {"text": "The Colosseum is an ancient amphitheatre in Italy.", "subject": "Colosseum",
         "object": "Italy", "subject_type": "LOCATION", "object_type": "LOCATION"},
        {"text": "Angkor Wat, the largest religious monument, lies in Cambodia.",
         "subject": "Angkor Wat", "object": "Cambodia", "subject_type": "LOCATION",
         "object_type": "LOCATION"},
        {"text": "Machu Picchu is a citadel high in the Andes of Peru.",
         "subject": "Machu Picchu", "object": "Peru", "subject_type": "LOCATION",
         "object_type": "LOCATION"},
    ],
    "P131": [
        {"text": "Montmartre is a hill in the 18th arrondissement of Paris.",
         "subject": "Montmartre", "object": "18th arrondissement of Paris",
         "subject_type": "LOCATION", "object_type": "LOCATION"},
        {"text": "Harlem is a neighborhood in the borough of Manhattan.", "subject": "Harlem",
         "object": "Manhattan", "subject_type": "LOCATION", "object_type": "LOCATION"},
        {"text": "Kreuzberg belongs to the district of Friedrichshain-Kreuzberg in Berlin.",
         "subject": "Kreuzberg", "object": "Berlin", "subject_type": "LOCATION",
         "object_type": "LOCATION"},
    ],
}

EDKG_USAGE = {"input_tokens": 300, "output_tokens": 120}
SCDG_USAGE = {"input_tokens": 900, "output_tokens": 700}
N_EDKG, N_SCDG = 4, 2  # requests for TRAIN
N_REQUESTS = N_EDKG + N_SCDG


def small_cfg(**overrides):
  cfg = config_lib.base_config().generate
  cfg.scdg_per_relation = 3
  cfg.k_demos = 2
  cfg.max_concurrency = 1
  cfg.max_retries = 3
  cfg.poll_interval_s = 5.0
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


# ------------------------------------------------------------------------------------------
# The mock API


def request_info(body: dict) -> dict:
  """What the fake model needs from a Messages request body."""
  prompt = body["messages"][0]["content"]
  if body.get("tools"):
    tool = body["tools"][0]["name"]
    kind = "scdg" if tool == prompts.SCDG_TOOL_NAME else "edkg"
    mode = "tool"
  else:
    props = body["output_config"]["format"]["schema"]["properties"]
    kind = "scdg" if "instances" in props else "edkg"
    mode = "json_schema"
  info = {"kind": kind, "mode": mode, "prompt": prompt}
  if kind == "edkg":
    info["subject"] = re.search(r"^Subject: (.*)$", prompt, re.M).group(1)
    info["object"] = re.search(r"^Object: (.*)$", prompt, re.M).group(1)
  info["relation"] = re.search(r"\(id (\S+)\)", prompt).group(1)
  return info


def default_answer(info: dict) -> dict:
  if info["kind"] == "edkg":
    return {"explanation": f"The context says that {info['subject']} is found in "
                           f"{info['object']}, which is what the relation describes."}
  return {"instances": GOOD_SCDG[info["relation"]]}


def message_json(info: dict, answer, *, stop_reason=None, usage=None, raw_text=None) -> dict:
  tool = prompts.EDKG_TOOL_NAME if info["kind"] == "edkg" else prompts.SCDG_TOOL_NAME
  if raw_text is not None:
    content = [{"type": "text", "text": raw_text}]
    stop = "end_turn"
  elif info["mode"] == "tool":
    content = [{"type": "tool_use", "id": "toolu_01", "name": tool, "input": answer}]
    stop = "tool_use"
  else:
    content = [{"type": "text", "text": json.dumps(answer)}]
    stop = "end_turn"
  return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-test",
          "content": content, "stop_reason": stop_reason or stop, "stop_sequence": None,
          "usage": usage or (EDKG_USAGE if info["kind"] == "edkg" else SCDG_USAGE)}


def error_response(status: int, etype: str, headers=None, error_code=None) -> httpx2.Response:
  error = {"type": etype, "message": f"{etype}!"}
  if error_code:
    error["details"] = {"error_code": error_code}
  return httpx2.Response(status, headers=headers or {}, json={"type": "error", "error": error})


class FakeAPI:
  """A thread-safe mock of the Messages and Message Batches APIs.

  Attributes:
    responder: `(info, n) -> httpx2.Response | dict | None` for the n-th Messages POST
      (0-based); a dict is a full message JSON, None means the default answer.
    polls_until_end: a batch reports `in_progress` for this many GETs, then `ended`.
    errored_custom_ids: prefixes of custom ids whose batch result is `errored`.
    batch_create_failures: answers (responses, or exceptions to raise) to the next batch
      submissions, before they succeed.
  """

  def __init__(self, responder=None, polls_until_end=2):
    self.lock = threading.Lock()
    self.responder = responder
    self.calls = collections.Counter()
    self.message_bodies: list[dict] = []
    self.auth_headers: set[str] = set()
    self.batches: dict[str, dict] = {}
    self.polls_until_end = polls_until_end
    self.errored_custom_ids: set[str] = set()
    self.batch_create_failures: list = []

  def client(self) -> anthropic.Anthropic:
    # The key comes from ANTHROPIC_API_KEY (the tests set it).
    return anthropic.Anthropic(http_client=httpx2.Client(transport=httpx2.MockTransport(
        self.handler)))

  def _answer(self, body: dict, n: int):
    info = request_info(body)
    r = self.responder(info, n) if self.responder else None
    if isinstance(r, httpx2.Response):
      return r
    if r is None:
      r = message_json(info, default_answer(info))
    return r

  def handler(self, request: httpx2.Request) -> httpx2.Response:
    path, method = request.url.path, request.method
    with self.lock:
      self.calls[(method, path)] += 1
      if request.headers.get("authorization"):
        self.auth_headers.add(request.headers["authorization"])
      if method == "POST" and path == "/v1/messages":
        body = json.loads(request.content)
        n = len(self.message_bodies)
        self.message_bodies.append(body)
      elif method == "POST" and path == "/v1/messages/batches":
        if self.batch_create_failures:
          failure = self.batch_create_failures.pop(0)
          if isinstance(failure, Exception):
            raise failure
          return failure
        return self._create_batch(json.loads(request.content))
      elif method == "GET" and path.endswith("/results"):
        return self._results(path.split("/")[-2])
      elif method == "GET" and path.startswith("/v1/messages/batches/"):
        return self._retrieve(path.split("/")[-1])
      else:
        return error_response(404, "not_found_error")
    r = self._answer(body, n)  # outside the lock: concurrent requests run concurrently
    return r if isinstance(r, httpx2.Response) else httpx2.Response(200, json=r)

  def _batch_json(self, b: dict) -> dict:
    n = len(b["requests"])
    ended = b["gets"] > self.polls_until_end
    errored = sum(any(r["custom_id"].startswith(p) for p in self.errored_custom_ids)
                  for r in b["requests"])
    out = {"id": b["id"], "type": "message_batch",
           "processing_status": "ended" if ended else "in_progress",
           "request_counts": {"processing": 0 if ended else n,
                              "succeeded": n - errored if ended else 0,
                              "errored": errored if ended else 0, "canceled": 0, "expired": 0},
           "created_at": "2026-11-01T00:00:00Z", "expires_at": "2026-11-02T00:00:00Z"}
    if ended:
      out["ended_at"] = "2026-11-01T01:00:00Z"
      out["results_url"] = f"https://api.anthropic.com/v1/messages/batches/{b['id']}/results"
    return out

  def _create_batch(self, body: dict) -> httpx2.Response:
    bid = f"msgbatch_{len(self.batches) + 1:04d}"
    self.batches[bid] = {"id": bid, "requests": body["requests"], "gets": 0}
    return httpx2.Response(200, json=self._batch_json(self.batches[bid]))

  def _retrieve(self, bid: str) -> httpx2.Response:
    if bid not in self.batches:
      return error_response(404, "not_found_error")
    b = self.batches[bid]
    b["gets"] += 1
    return httpx2.Response(200, json=self._batch_json(b))

  def _results(self, bid: str) -> httpx2.Response:
    lines = []
    for r in self.batches[bid]["requests"]:
      if any(r["custom_id"].startswith(p) for p in self.errored_custom_ids):
        result = {"type": "errored", "error": {"type": "error", "error": {
            "type": "invalid_request_error", "message": "bad request in batch"}}}
      else:
        info = request_info(r["params"])
        result = {"type": "succeeded", "message": message_json(info, default_answer(info))}
      lines.append(json.dumps({"custom_id": r["custom_id"], "result": result}))
    return httpx2.Response(200, content=("\n".join(lines) + "\n").encode(),
                           headers={"content-type": "application/binary"})

  @property
  def message_posts(self) -> int:
    return self.calls[("POST", "/v1/messages")]


class Sleeps:
  """Records the delays instead of sleeping."""

  def __init__(self):
    self.delays: list[float] = []

  def __call__(self, s: float) -> None:
    self.delays.append(s)


@pytest.fixture(autouse=True)
def sdk_sleeps(monkeypatch):
  """The delays (seconds) the anthropic SDK waits before its retries, recorded, not slept."""
  sleeps = Sleeps()
  monkeypatch.setattr(anthropic._base_client.time, "sleep", sleeps)
  return sleeps


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
  for var in ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "ANTHROPIC_PROFILE",
              "ANTHROPIC_CUSTOM_HEADERS", "ANTHROPIC_LOG"):
    monkeypatch.delenv(var, raising=False)


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_cost(price_in, price_out, n_edkg, n_scdg, factor=1.0):
  tin = n_edkg * EDKG_USAGE["input_tokens"] + n_scdg * SCDG_USAGE["input_tokens"]
  tout = n_edkg * EDKG_USAGE["output_tokens"] + n_scdg * SCDG_USAGE["output_tokens"]
  return (tin * price_in + tout * price_out) / 1e6 * factor


def run(api, workdir, cfg=None, **kw):
  kw.setdefault("sleep", Sleeps())
  return run_generate(TRAIN, SCHEMA, EVAL, cfg or small_cfg(), workdir,
                      client=api.client() if api else None, **kw)


def output_files(workdir: pathlib.Path) -> set[str]:
  return {p.name for p in workdir.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_tool_use(tmp_path):
  api = FakeAPI()
  cfg = small_cfg(model="claude-haiku-4-5", structured_output="tool", effort=None)
  report = run(api, tmp_path, cfg)

  assert api.message_posts == N_REQUESTS
  assert api.auth_headers == {f"Bearer {SECRET}"}
  body = next(b for b in api.message_bodies if b["tools"][0]["name"] == prompts.SCDG_TOOL_NAME)
  assert body["tool_choice"] == {"type": "tool", "name": prompts.SCDG_TOOL_NAME}
  assert body["tools"][0]["input_schema"]["required"] == ["instances"]
  assert body["model"] == "claude-haiku-4-5" and "output_config" not in body
  assert "temperature" not in body
  # SCDG prompt: K=2 demonstrations of the relation, its description, N=3.
  assert body["messages"][0]["content"].count("\n1. {") == 1
  assert "\n2. {" in body["messages"][0]["content"]
  assert "Write 3 new instances" in body["messages"][0]["content"]

  edkg = read_jsonl(tmp_path / "edkg.jsonl")
  scdg = read_jsonl(tmp_path / "scdg.jsonl")
  assert len(edkg) == 4 and len(scdg) == 6
  assert list(edkg[0]) == ["relation", "subject", "object", "context", "generated_text"]
  assert edkg[0]["context"] == TRAIN[0].text and edkg[0]["subject"] == "Eiffel Tower"
  assert list(scdg[0]) == ["text", "subj", "subj_start", "subj_end", "obj", "obj_start",
                           "obj_end", "subj_type", "obj_type", "relation"]
  for r in scdg:
    assert r["text"][r["subj_start"]:r["subj_end"]] == r["subj"]
    assert r["text"][r["obj_start"]:r["obj_end"]] == r["obj"]
  assert scdg[0] == {"text": "The Colosseum is an ancient amphitheatre in Italy.",
                     "subj": "Colosseum", "subj_start": 4, "subj_end": 13, "obj": "Italy",
                     "obj_start": 44, "obj_end": 49, "subj_type": "LOCATION",
                     "obj_type": "LOCATION", "relation": "P17"}

  assert report["status"] == "complete"
  assert report["requests"] == N_REQUESTS and report["attempts"] == N_REQUESTS
  assert report["retries"] == 0 and report["cache_hits"] == 0
  assert report["input_tokens"] == 4 * 300 + 2 * 900
  assert report["output_tokens"] == 4 * 120 + 2 * 700
  assert math.isclose(report["estimated_cost_usd"], expected_cost(1.0, 5.0, 4, 2), rel_tol=1e-9)
  assert report["edkg"] == {"enabled": True, "requested": 4, "accepted": 4, "rejected": 0,
                            "rejections": {}, "not_generated": 0}
  assert report["scdg"]["requested"] == 6 and report["scdg"]["accepted"] == 6
  assert report["rejections"] == {}
  assert json.loads((tmp_path / "generate_report.json").read_text()) == report
  assert (tmp_path / "rejected.jsonl").read_text() == ""
  assert len(list((tmp_path / "cache").rglob("*.json"))) == N_REQUESTS

  # The project's readers accept what was written.
  readers = pytest.importorskip("tkre_jax.data.readers")
  assert len(readers.read_scdg(tmp_path / "scdg.jsonl")) == 6
  assert len(readers.read_edkg(tmp_path / "edkg.jsonl")) == 4


def test_round_trip_json_schema_default_model_concurrent(tmp_path):
  api = FakeAPI()
  cfg = small_cfg(max_concurrency=3)
  assert cfg.model == "claude-sonnet-5-5"
  report = run(api, tmp_path, cfg)
  assert api.message_posts == N_REQUESTS
  for body in api.message_bodies:
    assert "tools" not in body and "tool_choice" not in body
    assert body["output_config"]["format"]["type"] == "json_schema"
    assert body["output_config"]["effort"] == "low"
  assert report["status"] == "complete"
  assert report["edkg"]["accepted"] == 4 and report["scdg"]["accepted"] == 6
  assert math.isclose(report["estimated_cost_usd"], expected_cost(2.0, 10.0, 4, 2),
                      rel_tol=1e-9)
  assert report["price_usd_per_mtok"] == {"input": 2.0, "output": 10.0, "batch_discount": 0.5}


def test_temperature_is_sent_when_set(tmp_path):
  api = FakeAPI()
  run(api, tmp_path, small_cfg(temperature=0.7, scdg=False))
  assert api.message_posts == N_EDKG
  assert all(b["temperature"] == 0.7 for b in api.message_bodies)


# ------------------------------------------------------------------------------------------
# Retries


def test_429_with_retry_after_0_then_success(tmp_path, sdk_sleeps):
  def responder(info, n):
    return error_response(429, "rate_limit_error", {"retry-after": "0"}) if n == 0 else None

  api = FakeAPI(responder)
  report = run_generate(TRAIN[:1], SCHEMA, EVAL, small_cfg(scdg=False), tmp_path,
                        client=api.client(), sleep=Sleeps())
  assert api.message_posts == 2
  assert report["status"] == "complete"
  assert report["requests"] == 1 and report["attempts"] == 2 and report["retries"] == 1
  assert len(sdk_sleeps.delays) == 1
  assert len(read_jsonl(tmp_path / "edkg.jsonl")) == 1


def test_retry_after_headers_are_honoured_529_and_503(tmp_path, sdk_sleeps):
  def responder(info, n):
    if n == 0:
      return error_response(529, "overloaded_error", {"retry-after": "3"})
    if n == 1:
      return error_response(503, "api_error", {"retry-after-ms": "1500"})
    return None

  api = FakeAPI(responder)
  report = run(api, tmp_path, small_cfg(scdg=False))
  assert report["status"] == "complete" and report["retries"] == 2
  assert api.message_posts == N_EDKG + 2
  assert sdk_sleeps.delays == [3.0, 1.5]


def test_500_three_times_then_clean_failure(tmp_path, sdk_sleeps):
  # A complete earlier run in the same folder stays as it was.
  good = FakeAPI()
  run(good, tmp_path, small_cfg(scdg=False))
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  assert set(before) == {"edkg.jsonl", "rejected.jsonl", "generate_report.json"}

  api = FakeAPI(lambda info, n: error_response(500, "api_error"))
  with pytest.raises(llm_client.RequestFailedError, match=r"HTTP 500.*after 3 attempt"):
    run(api, tmp_path, small_cfg(edkg=False, max_retries=2))
  assert api.message_posts == 3
  assert len(sdk_sleeps.delays) == 2
  after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  assert after == before  # no scdg.jsonl, nothing changed, no temporary files left


def test_500_in_empty_folder_writes_nothing(tmp_path):
  api = FakeAPI(lambda info, n: error_response(500, "api_error"))
  with pytest.raises(llm_client.RequestFailedError):
    run(api, tmp_path, small_cfg(max_retries=2))
  assert output_files(tmp_path) == set()
  assert not list(tmp_path.rglob("*.json*"))


def test_400_is_not_retried(tmp_path, sdk_sleeps):
  api = FakeAPI(lambda info, n: error_response(400, "invalid_request_error"))
  with pytest.raises(llm_client.RequestFailedError, match="not retryable"):
    run(api, tmp_path, small_cfg())
  assert api.message_posts == 1 and sdk_sleeps.delays == []


def test_spend_limit_429_is_not_retried(tmp_path, sdk_sleeps):
  # The SDK alone retries every 429; `stop_on_spend_limit` makes this one final.
  api = FakeAPI(lambda info, n: error_response(429, "rate_limit_error",
                                               error_code="enforced_spend_limit_reached"))
  with pytest.raises(llm_client.RequestFailedError, match=r"HTTP 429.*not retryable"):
    run(api, tmp_path, small_cfg())
  assert api.message_posts == 1 and sdk_sleeps.delays == []
  assert output_files(tmp_path) == set()


def test_timeouts_are_retried(tmp_path, sdk_sleeps):
  def responder(info, n):
    if n < 2:
      raise httpx2.ReadTimeout("timed out")
    return None

  api = FakeAPI(responder)
  report = run(api, tmp_path, small_cfg(scdg=False))
  assert report["retries"] == 2 and report["requests"] == N_EDKG
  assert api.message_posts == N_EDKG + 2 and len(sdk_sleeps.delays) == 2


# ------------------------------------------------------------------------------------------
# Validation


def test_malformed_and_schema_violating_generations_are_counted(tmp_path):
  bad_scdg = {
      "P17": [
          GOOD_SCDG["P17"][0],
          {"text": "Lake Bled lies in Slovenia.", "subject": "Lake Tahoe", "object": "Slovenia",
           "subject_type": "LOCATION", "object_type": "LOCATION"},  # subject_not_in_text
          {"text": "Lake Bled lies in Slovenia.", "subject": "Lake Bled", "object": "slovenia",
           "subject_type": "LOCATION", "object_type": "LOCATION"},  # object_not_in_text (case)
          {"text": "Lake Bled lies in Slovenia.", "subject": "Lake Bled", "object": "Bled",
           "subject_type": "LOCATION", "object_type": "LOCATION"},  # entity_overlap
          {"text": "Peru is Peru.", "subject": "Peru", "object": "Peru",
           "subject_type": "LOCATION", "object_type": "LOCATION"},  # same_entity
          {"text": "Lake Bled lies in Slovenia.", "subject": "Lake Bled", "object": "Slovenia",
           "subject_type": "LAKE", "object_type": "LOCATION"},  # type_not_allowed
          {"text": "Lake Bled lies in Slovenia."},  # malformed_instance
          dict(GOOD_SCDG["P17"][0]),  # duplicate
          {"text": "Mount Fuji is the highest mountain in Japan .", "subject": "Mount Fuji",
           "object": "Japan", "subject_type": "LOCATION", "object_type": "LOCATION"},  # copies
          {"text": "Slovenians love Lake Bled.", "subject": "Lake Bled", "object": "Slovenia",
           "subject_type": "LOCATION", "object_type": "LOCATION"},  # entity_not_whole_word
          GOOD_SCDG["P17"][1],  # accepted
          GOOD_SCDG["P17"][2],  # excess_instance (N = 11)
      ],
  }

  def responder(info, n):
    if info["kind"] == "scdg":
      if info["relation"] == "P17":
        return message_json(info, {"instances": bad_scdg["P17"]})
      return message_json(info, {"items": []})  # P131: malformed_output (no instances list)
    subj = info["subject"]
    if subj == "Eiffel Tower":
      return message_json(info, {"explanation": "It is in France, obviously."})  # no subject
    if subj == "Mount Fuji":
      return message_json(info, None, raw_text="Sure! Mount Fuji is in Japan.")  # not JSON
    if subj == "Soho":
      return message_json(info, {"explanation": "..."}, stop_reason="max_tokens")
    return message_json(info, {"explanation": "Brooklyn is a borough of New York City."})

  api = FakeAPI(responder)
  cfg = small_cfg(scdg_per_relation=11, entity_types=["PERSON", "LOCATION", "ORGANIZATION"])
  report = run(api, tmp_path, cfg)
  assert report["edkg"]["rejections"] == {"explanation_missing_subject": 1,
                                          "malformed_output": 1, "truncated_output": 1}
  assert report["edkg"]["accepted"] == 1
  assert report["scdg"]["rejections"] == {
      "copies_train": 1, "duplicate": 1, "entity_not_whole_word": 1, "entity_overlap": 1,
      "excess_instance": 1, "malformed_instance": 1, "malformed_output": 1,
      "object_not_in_text": 1, "same_entity": 1, "subject_not_in_text": 1,
      "type_not_allowed": 1}
  assert report["scdg"]["accepted"] == 2 and report["scdg"]["requested"] == 22
  assert report["rejections"]["malformed_output"] == 2
  rejected = read_jsonl(tmp_path / "rejected.jsonl")
  assert len(rejected) == 3 + 11
  assert collections.Counter(r["reason"] for r in rejected) == collections.Counter(
      {**report["rejections"]})
  assert all(r["where"] and r["detail"] for r in rejected)
  scdg = read_jsonl(tmp_path / "scdg.jsonl")
  assert [r["subj"] for r in scdg] == ["Colosseum", "Angkor Wat"]
  # The JSON schema given to the model restricts types to the allowed list.
  body = next(b for b in api.message_bodies if request_info(b)["kind"] == "scdg")
  item = body["output_config"]["format"]["schema"]["properties"]["instances"]["items"]
  assert item["properties"]["subject_type"]["enum"] == ["PERSON", "LOCATION", "ORGANIZATION"]


def test_refusal_and_missing_tool_use(tmp_path):
  def responder(info, n):
    if info["kind"] == "edkg" and info["subject"] == "Eiffel Tower":
      return message_json(info, {"explanation": "x"}, stop_reason="refusal")
    if info["kind"] == "edkg" and info["subject"] == "Soho":
      return message_json(info, None, raw_text="")  # neither tool_use nor text
    return None

  api = FakeAPI(responder)
  report = run(api, tmp_path, small_cfg(structured_output="tool", model="claude-haiku-4-5",
                                        effort=None, scdg=False))
  assert report["edkg"]["rejections"] == {"refusal": 1, "no_structured_output": 1}
  assert report["edkg"]["accepted"] == 2


def test_leakage_equal_text_and_shared_ngram(tmp_path):
  leaky = {
      "P17": [
          # equal to dev:0 after normalising case and whitespace / punctuation spacing
          {"text": "the louvre museum is in  Paris, France.", "subject": "louvre museum",
           "object": "France", "subject_type": "LOCATION", "object_type": "LOCATION"},
          # shares the 8-gram "danube flows through ten countries before reaching the"
          {"text": "Historically the Danube flows through ten countries before reaching the "
                   "sea in Romania.", "subject": "Danube", "object": "Romania",
           "subject_type": "LOCATION", "object_type": "LOCATION"},
          # shares only 7 words in a row with test:1: accepted
          {"text": "An ancient stone bridge crosses the river near the village of Corbridge in "
                   "England.", "subject": "Corbridge", "object": "England",
           "subject_type": "LOCATION", "object_type": "LOCATION"},
      ],
  }

  def responder(info, n):
    if info["kind"] == "scdg" and info["relation"] == "P17":
      return message_json(info, {"instances": leaky["P17"]})
    if info["kind"] == "edkg" and info["subject"] == "Mount Fuji":
      return message_json(info, {"explanation": "Mount Fuji and Japan: the Danube flows "
                                                "through ten countries before reaching the "
                                                "Black Sea."})
    return None

  api = FakeAPI(responder)
  report = run(api, tmp_path, small_cfg())
  assert report["scdg"]["rejections"] == {"leak_equal": 1, "leak_ngram": 1}
  assert report["edkg"]["rejections"] == {"leak_ngram": 1}
  assert report["scdg"]["accepted"] == 1 + 3  # the 7-gram one and P131's three
  assert report["leakage"] == {"ngram": 8, "eval_texts": 3}
  texts = [r["text"] for r in read_jsonl(tmp_path / "scdg.jsonl")]
  assert any("Corbridge" in t for t in texts)

  # A shorter n makes the 7-gram sentence leak too (it is a cache hit: no new request).
  report2 = run(api, tmp_path / "n7", small_cfg(leakage_ngram=7,
                                               cache_dir=str(tmp_path / "cache")))
  assert report2["scdg"]["rejections"] == {"leak_equal": 1, "leak_ngram": 2}
  assert report2["requests"] == 0 and report2["cache_hits"] == N_REQUESTS


def test_edkg_seed_context_ngrams_are_not_leakage():
  idx = validate.LeakageIndex(["a b c d e f g h i j"], 4)
  assert idx.check("x a b c d y", ignore="a b c d") is None
  assert idx.check("x a b c d y")[0] == "leak_ngram"
  assert idx.check("A  B c d e f g h i J")[0] == "leak_equal"
  assert idx.check("a b c x d e f") is None


# ------------------------------------------------------------------------------------------
# Cache, budget and resume


def test_budget_stops_cleanly_then_resume_without_repeats(tmp_path):
  api = FakeAPI()
  report = run(api, tmp_path, small_cfg(max_requests=3))
  assert api.message_posts == 3
  assert report["status"] == "budget_exhausted"
  assert report["budget"]["exhausted"] and "max_requests=3" in report["budget"]["reason"]
  assert report["requests"] == 3
  assert report["edkg"]["accepted"] == 3 and report["edkg"]["not_generated"] == 1
  assert report["scdg"]["not_generated"] == 2 and report["scdg"]["accepted"] == 0
  assert len(report["not_generated"]) == 3
  assert len(read_jsonl(tmp_path / "edkg.jsonl")) == 3
  assert read_jsonl(tmp_path / "scdg.jsonl") == []

  report2 = run(api, tmp_path, small_cfg())
  assert api.message_posts == N_REQUESTS  # 3 new ones, none repeated
  assert report2["status"] == "complete"
  assert report2["requests"] == 3 and report2["cache_hits"] == 3
  assert len(read_jsonl(tmp_path / "edkg.jsonl")) == 4
  assert len(read_jsonl(tmp_path / "scdg.jsonl")) == 6
  bodies = [json.dumps(b, sort_keys=True) for b in api.message_bodies]
  assert len(set(bodies)) == len(bodies) == N_REQUESTS

  report3 = run(api, tmp_path, small_cfg())
  assert api.message_posts == N_REQUESTS and report3["cache_hits"] == N_REQUESTS
  assert report3["estimated_cost_usd"] == 0


def test_token_budget(tmp_path):
  api = FakeAPI()
  # EDKG requests use 420 tokens each: after two (840 >= 800) the third is refused.
  report = run(api, tmp_path, small_cfg(scdg=False, max_total_tokens=800))
  assert api.message_posts == 2 and report["status"] == "budget_exhausted"
  assert "max_total_tokens=800" in report["budget"]["reason"]


def test_crash_mid_run_then_resume_without_repeats(tmp_path):
  def failing_after_two(info, n):
    return error_response(503, "api_error") if n >= 2 else None

  api = FakeAPI(failing_after_two)
  with pytest.raises(llm_client.RequestFailedError):
    run(api, tmp_path, small_cfg(max_retries=0))
  assert api.message_posts == 3 and output_files(tmp_path) == set()
  first_two = [json.dumps(b, sort_keys=True) for b in api.message_bodies[:2]]

  api2 = FakeAPI()
  report = run(api2, tmp_path, small_cfg())
  assert api2.message_posts == N_REQUESTS - 2
  assert not set(first_two) & {json.dumps(b, sort_keys=True) for b in api2.message_bodies}
  assert report["cache_hits"] == 2 and report["status"] == "complete"


def test_cache_key_covers_model_and_parameters():
  p = prompts.edkg_request(TRAIN[0], "country", "d", model="m1", max_tokens=10)
  keys = {llm_cache.request_key(p),
          llm_cache.request_key(prompts.edkg_request(TRAIN[0], "country", "d", model="m2",
                                                      max_tokens=10)),
          llm_cache.request_key(prompts.edkg_request(TRAIN[0], "country", "d", model="m1",
                                                      max_tokens=11)),
          llm_cache.request_key(prompts.edkg_request(TRAIN[0], "country", "d", model="m1",
                                                      max_tokens=10, temperature=0.5)),
          llm_cache.request_key(prompts.edkg_request(TRAIN[0], "country", "d", model="m1",
                                                      max_tokens=10, structured_output="tool")),
          llm_cache.request_key(prompts.edkg_request(TRAIN[1], "country", "d", model="m1",
                                                      max_tokens=10))}
  assert len(keys) == 6
  assert llm_cache.request_key(p) == llm_cache.request_key(json.loads(json.dumps(p)))


# ------------------------------------------------------------------------------------------
# Replay


def test_replay_hit_and_miss(tmp_path, monkeypatch):
  api = FakeAPI()
  live = run(api, tmp_path / "live", small_cfg())
  monkeypatch.delenv("ANTHROPIC_API_KEY")

  report = run_generate(TRAIN, SCHEMA, EVAL, small_cfg(), tmp_path / "live", mode="replay")
  assert api.message_posts == N_REQUESTS
  assert report["requests"] == 0 and report["cache_hits"] == N_REQUESTS
  assert report["edkg"]["accepted"] == live["edkg"]["accepted"] == 4
  assert report["scdg"]["accepted"] == 6

  # A different N is a different request: a miss, named.
  with pytest.raises(llm_client.ReplayMissError,
                     match=r"2 request\(s\).*SCDG relation P17 \('country'\)"):
    run_generate(TRAIN, SCHEMA, EVAL, small_cfg(scdg_per_relation=4), tmp_path / "live",
                 mode="replay")
  # An empty folder: every EDKG seed instance is named.
  empty = tmp_path / "empty"
  with pytest.raises(llm_client.ReplayMissError) as e:
    run_generate(TRAIN, SCHEMA, EVAL, small_cfg(), empty, mode="replay")
  assert "EDKG seed instance train:0 (relation P17, subject 'Eiffel Tower'" in str(e.value)
  assert "6 request(s)" in str(e.value)
  assert output_files(empty) == set()


def test_replay_pregenerated_files_validates_and_writes(tmp_path, monkeypatch):
  monkeypatch.delenv("ANTHROPIC_API_KEY")
  edkg = tmp_path / "in_edkg.jsonl"
  scdg = tmp_path / "in_scdg.jsonl"
  good_scdg = {"text": "Harlem is in Manhattan.", "subj": "Harlem", "subj_start": 0,
               "subj_end": 6, "obj": "Manhattan", "obj_start": 13, "obj_end": 22,
               "subj_type": "LOCATION", "obj_type": "LOCATION", "relation": "P131"}
  scdg.write_text("\n".join([
      json.dumps(good_scdg),
      json.dumps(dict(good_scdg, subj_start=1)),  # offset_mismatch
      json.dumps(dict(good_scdg, relation="P000")),  # unknown_relation
      "{not json",  # malformed_record
      json.dumps(dict(good_scdg, text="The louvre museum is in Paris, France.", subj="Paris",
                      subj_start=24, subj_end=29, obj="France", obj_start=31, obj_end=37)),
      json.dumps(good_scdg),  # duplicate
  ]) + "\n")
  edkg.write_text("\n".join([
      json.dumps({"relation": "P17", "subject": "Eiffel Tower", "object": "France",
                  "context": "c", "generated_text": "The eiffel  tower is in France."}),
      json.dumps({"relation": "P17", "subject": "Eiffel Tower", "object": "France",
                  "context": "c", "generated_text": "It is in France."}),
      json.dumps({"relation": "P17", "subject": "X"}),
  ]) + "\n")
  report = run_generate(TRAIN, SCHEMA, EVAL, small_cfg(), tmp_path / "out", mode="replay",
                        replay_files={"edkg": edkg, "scdg": str(scdg)})
  assert report["scdg"]["requested"] == 6 and report["scdg"]["accepted"] == 1
  assert report["scdg"]["rejections"] == {"duplicate": 1, "leak_equal": 1,
                                          "malformed_record": 1, "offset_mismatch": 1,
                                          "unknown_relation": 1}
  assert report["edkg"]["requested"] == 3 and report["edkg"]["accepted"] == 1
  assert report["edkg"]["rejections"] == {"explanation_missing_subject": 1,
                                          "malformed_record": 1}
  assert read_jsonl(tmp_path / "out" / "scdg.jsonl") == [good_scdg]
  assert report["requests"] == 0


def test_replay_shared_fewrel_llm_files(tmp_path, shared_data, monkeypatch):
  monkeypatch.delenv("ANTHROPIC_API_KEY")
  readers = pytest.importorskip("tkre_jax.data.readers")
  splits = pytest.importorskip("tkre_jax.data.splits")
  fewrel = require(shared_data / "fewrel" / "val_wiki.json")
  split_file = require(shared_data / "fewrel" / "val_wiki_split.json")
  edkg_file = require(shared_data / "fewrel_llm" / "edkg_val_wiki_16x8.jsonl")
  scdg_file = require(shared_data / "fewrel_llm" / "scdg_val_wiki_16x16.jsonl")
  schema = readers.read_pid2name(require(shared_data / "fewrel" / "pid2name.json"))
  split = splits.fewrel_canonical_split(readers.read_fewrel(fewrel), split_file, 8)
  assert len(split["train"]) == 128

  cfg = config_lib.base_config().generate
  report = run_generate(split["train"], schema, split["dev"] + split["test"], cfg, tmp_path,
                        mode="replay", replay_files={"edkg": edkg_file, "scdg": scdg_file})
  assert report["edkg"]["requested"] == 128 and report["scdg"]["requested"] == 256
  for kind in ("edkg", "scdg"):
    r = report[kind]
    assert r["accepted"] + r["rejected"] == r["requested"]
    assert r["rejected"] == sum(r["rejections"].values())
  assert report["leakage"]["eval_texts"] == 1088 + 9600
  edkg = read_jsonl(tmp_path / "edkg.jsonl")
  scdg = read_jsonl(tmp_path / "scdg.jsonl")
  assert len(edkg) == 128 - report["edkg"]["rejected"]
  assert len(scdg) == 256 - report["scdg"]["rejected"]
  assert len(read_jsonl(tmp_path / "rejected.jsonl")) == (report["edkg"]["rejected"]
                                                         + report["scdg"]["rejected"])
  # No text equals a dev/test sentence, but 7 synthetic sentences share a formulaic 8-word run
  # with one (e.g. "a Dutch professional footballer who plays as a"): counted, not written.
  assert report["edkg"]["rejections"] == {}
  assert report["scdg"]["rejections"] == {"leak_ngram": 7}
  assert len(scdg) == 249 and len(edkg) == 128
  assert len(readers.read_scdg(tmp_path / "scdg.jsonl")) == len(scdg)
  assert report["requests"] == 0 and report["estimated_cost_usd"] == 0


# ------------------------------------------------------------------------------------------
# Batches


class Interrupted(Exception):
  pass


def test_batch_submitted_polled_and_resumed(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="tkre_jax")
  api = FakeAPI(polls_until_end=2)
  polls = []

  def interrupting_sleep(s):
    polls.append(s)
    raise Interrupted  # e.g. Ctrl-C while waiting

  with pytest.raises(Interrupted):
    run(api, tmp_path, small_cfg(), use_batch=True, sleep=interrupting_sleep)
  assert polls == [5.0]
  assert api.calls[("POST", "/v1/messages/batches")] == 1
  assert api.message_posts == 0
  state = json.loads((tmp_path / "batch_state.json").read_text())
  assert state["batch_id"] == "msgbatch_0001" and state["status"] == "submitted"
  assert len(state["requests"]) == N_REQUESTS
  assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cid) for cid in state["requests"])
  assert output_files(tmp_path) == {"batch_state.json"}
  assert "processing=6 succeeded=0 errored=0" in caplog.text

  sleeps = Sleeps()
  report = run(api, tmp_path, small_cfg(), use_batch=True, sleep=sleeps)
  assert api.calls[("POST", "/v1/messages/batches")] == 1  # resumed, not resubmitted
  assert api.message_posts == 0
  assert sleeps.delays == [5.0]  # one more in_progress poll, then ended
  assert report["status"] == "complete"
  assert report["batch"]["batch_ids"] == ["msgbatch_0001"]
  assert report["requests"] == report["batch_requests"] == N_REQUESTS
  assert math.isclose(report["estimated_cost_usd"], expected_cost(2.0, 10.0, 4, 2, 0.5),
                      rel_tol=1e-9)
  assert len(read_jsonl(tmp_path / "edkg.jsonl")) == 4
  assert len(read_jsonl(tmp_path / "scdg.jsonl")) == 6
  assert json.loads((tmp_path / "batch_state.json").read_text())["status"] == "collected"
  assert "Message Batch msgbatch_0001: ended, processing=0 succeeded=6 errored=0" in caplog.text
  # The submitted params are exactly the Messages requests (same cache keys).
  b = api.batches["msgbatch_0001"]
  assert {llm_cache.request_key(r["params"]) for r in b["requests"]} == set(
      state["requests"].values())

  # Everything is cached now: no HTTP request at all.
  before = sum(api.calls.values())
  report3 = run(api, tmp_path, small_cfg(), use_batch=True)
  assert sum(api.calls.values()) == before and report3["cache_hits"] == N_REQUESTS


def test_batch_errored_results_are_reported_and_resubmitted(tmp_path):
  api = FakeAPI(polls_until_end=0)
  api.errored_custom_ids = {"scdg_"}
  report = run(api, tmp_path, small_cfg(), use_batch=True)
  assert report["status"] == "incomplete"
  assert report["scdg"]["rejections"] == {"request_errored": 2}
  assert len(report["failed_requests"]) == 2
  assert "bad request in batch" in report["failed_requests"][0]["error"]
  assert report["edkg"]["accepted"] == 4 and report["batch_requests"] == 4

  api.errored_custom_ids = set()
  report2 = run(api, tmp_path, small_cfg(), use_batch=True)
  assert api.calls[("POST", "/v1/messages/batches")] == 2
  assert len(api.batches["msgbatch_0002"]["requests"]) == 2
  assert report2["status"] == "complete" and report2["scdg"]["accepted"] == 6
  assert report2["cache_hits"] == 4


def test_batch_respects_request_budget(tmp_path):
  api = FakeAPI(polls_until_end=0)
  report = run(api, tmp_path, small_cfg(max_requests=4), use_batch=True)
  assert len(api.batches["msgbatch_0001"]["requests"]) == 4
  assert report["status"] == "budget_exhausted" and len(report["not_generated"]) == 2


def test_batch_submission_is_retried_only_when_refused(tmp_path, sdk_sleeps):
  # A 429 or 529 means no batch was created: the SDK's retries apply.
  api = FakeAPI(polls_until_end=0)
  api.batch_create_failures = [error_response(429, "rate_limit_error", {"retry-after": "2"}),
                               error_response(529, "overloaded_error")]
  report = run(api, tmp_path, small_cfg(), use_batch=True)
  assert api.calls[("POST", "/v1/messages/batches")] == 3 and len(api.batches) == 1
  assert report["status"] == "complete" and len(sdk_sleeps.delays) == 2
  assert sdk_sleeps.delays[0] == 2.0


@pytest.mark.parametrize("failure", [httpx2.ReadTimeout("timed out"),
                                     error_response(500, "api_error")])
def test_batch_submission_that_may_have_created_a_batch_is_not_retried(tmp_path, sdk_sleeps,
                                                                       failure):
  # The SDK alone would resend the POST (it sends this API no idempotency key) and could
  # create a second, billed batch.
  api = FakeAPI(polls_until_end=0)
  api.batch_create_failures = [failure]
  with pytest.raises(llm_client.RequestFailedError, match="may have been created"
                     if isinstance(failure, Exception) else r"HTTP 500.*not retryable"):
    run(api, tmp_path, small_cfg(), use_batch=True)
  assert api.calls[("POST", "/v1/messages/batches")] == 1 and sdk_sleeps.delays == []
  assert output_files(tmp_path) == set()


# ------------------------------------------------------------------------------------------
# The API key


def test_api_key_never_logged_or_written(tmp_path, caplog, capfd):
  caplog.set_level(logging.DEBUG)  # everything, the SDK's and httpx2's debug logs included
  for name in ("anthropic", "httpx2", "httpcore2"):
    logging.getLogger(name).setLevel(logging.DEBUG)

  def responder(info, n):
    if n == 0:
      return error_response(429, "rate_limit_error")
    if info["kind"] == "edkg" and info["subject"] == "Soho":
      return message_json(info, {"explanation": "no entities here"})
    return None

  api = FakeAPI(responder)
  run(api, tmp_path / "a", small_cfg())
  run(api, tmp_path / "b", small_cfg(), use_batch=True)
  with pytest.raises(llm_client.RequestFailedError):
    run(FakeAPI(lambda i, n: error_response(401, "authentication_error")), tmp_path / "c",
        small_cfg())
  assert api.auth_headers == {f"Bearer {SECRET}"}  # the key was really in use

  assert "Sending HTTP Request: POST https://api.anthropic.com/v1/messages" in caplog.text
  assert "Retrying" in caplog.text or "retry 1/" in caplog.text
  out, err = capfd.readouterr()
  assert SECRET not in caplog.text and SECRET not in out + err
  assert "sk-ant" not in caplog.text
  for rec in caplog.records:
    assert SECRET not in rec.getMessage()
  files = [p for p in tmp_path.rglob("*") if p.is_file()]
  assert len(files) > 10
  for p in files:
    assert SECRET.encode() not in p.read_bytes(), p


def test_missing_key_in_live_mode_fails_before_any_work(tmp_path, monkeypatch):
  monkeypatch.delenv("ANTHROPIC_API_KEY")
  workdir = tmp_path / "w"
  with pytest.raises(llm_client.MissingApiKeyError, match="ANTHROPIC_API_KEY"):
    run_generate(TRAIN, SCHEMA, EVAL, small_cfg(), workdir)
  assert not workdir.exists()


def test_client_is_built_from_the_environment_key(monkeypatch):
  c = llm_client.make_client(12.0, max_retries=4)
  assert c.api_key == SECRET and c.max_retries == 4 and c.timeout == 12.0
  monkeypatch.setenv("ANTHROPIC_API_KEY", "  ")
  with pytest.raises(llm_client.MissingApiKeyError):
    llm_client.make_client(12.0)


# ------------------------------------------------------------------------------------------
# Argument checks


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="mode"):
    run_generate(TRAIN, SCHEMA, EVAL, small_cfg(), tmp_path, mode="dry")
  with pytest.raises(ValueError, match="structured_output"):
    run_generate(TRAIN, SCHEMA, EVAL, small_cfg(structured_output="xml"), tmp_path)
  with pytest.raises(ValueError, match="no price for model 'claude-x'"):
    run_generate(TRAIN, SCHEMA, EVAL, small_cfg(model="claude-x"), tmp_path)
  with pytest.raises(Exception, match=r"train:2: relation 'P131' is not in the relation schema"):
    run_generate(TRAIN, {"P17": SCHEMA["P17"]}, EVAL, small_cfg(), tmp_path)
  with pytest.raises(ValueError, match="only used with mode='replay'"):
    run_generate(TRAIN, SCHEMA, EVAL, small_cfg(), tmp_path, replay_files={"edkg": "x"})
  with pytest.raises(FileNotFoundError):
    run_generate(TRAIN, SCHEMA, EVAL, small_cfg(), tmp_path, mode="replay",
                 replay_files={"scdg": tmp_path / "missing.jsonl"})
  assert output_files(tmp_path) == set()


def test_parse_structured_output_variants():
  ok = {"stop_reason": "end_turn", "content": [{"type": "thinking", "thinking": "hm"},
                                               {"type": "text", "text": '{"a": 1}'}]}
  assert validate.parse_structured_output(ok, "t") == {"a": 1}
  tool = {"stop_reason": "tool_use", "content": [{"type": "tool_use", "name": "t",
                                                  "input": {"b": 2}, "id": "x"}]}
  assert validate.parse_structured_output(tool, "t") == {"b": 2}
  with pytest.raises(validate.OutputError) as e:
    validate.parse_structured_output({"stop_reason": "end_turn",
                                      "content": [{"type": "text", "text": "[1]"}]}, "t")
  assert e.value.reason == "malformed_output"
