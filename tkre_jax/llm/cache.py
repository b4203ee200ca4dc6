"""Atomic file writes and the on-disk cache of API responses.

`RequestCache` keeps one JSON file per request under `<cache_dir>/<key[:2]>/<key>.json`, where the
key is the sha256 of the canonical JSON of the full request body (model, system, messages, tools,
tool_choice, output_config, max_tokens, temperature). Entries are written atomically (temporary
file, then `os.replace`), so an interrupted run leaves complete entries only and a rerun never pays
for a request twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Iterable, Mapping, Optional

log = logging.getLogger(__name__)


def default_mode(directory: bool = False) -> int:
  """The permission bits `open()` / `mkdir()` would give a new file / folder under the process's
  umask (0o644 / 0o755 under the usual 022): what temporary files (created 0o600 / 0o700) get
  before they are renamed into place, so published outputs are readable like any other file."""
  umask = os.umask(0)
  os.umask(umask)
  return (0o777 if directory else 0o666) & ~umask


def publish_modes(folder: pathlib.Path) -> None:
  """Gives `folder` and everything under it `default_mode` (a folder built in `mkdtemp` before it
  is renamed into place)."""
  folder = pathlib.Path(folder)
  os.chmod(folder, default_mode(directory=True))
  for p in folder.rglob("*"):
    if not p.is_symlink():
      os.chmod(p, default_mode(directory=p.is_dir()))


def atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same folder and `os.replace`, so
  readers see either the old file or the complete new one; the file gets `default_mode()`.

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
    os.chmod(tmp, default_mode())
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
