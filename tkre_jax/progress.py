"""Progress of long loops with an ETA: a tqdm bar on a terminal, log lines otherwise.

    with Progress(total=len(records), desc="predict", unit="record") as bar:
      for batch in batches:
        ...
        bar.update(len(batch))

On a TTY (stderr is a terminal) the bar is tqdm's. Anywhere else (a log file, a CI job, a TPU VM
over ssh without a terminal) a line `predict: 1,024/9,600 records (10.7%), 85.3 records/s, ETA
0:01:40` goes to the `logging` logger at most every `log_every_seconds` (default 30 s), and one at
the end when at least one line was written before; short loops stay silent. `format_eta` is shared
with the trainer's step log lines.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 30.0


def format_eta(seconds: Optional[float]) -> str:
  """`h:mm:ss` of a duration in seconds ('?' when unknown or not finite)."""
  if seconds is None or not seconds == seconds or seconds == float("inf"):
    return "?"
  s = int(round(max(seconds, 0.0)))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def is_tty() -> bool:
  """Whether stderr is a terminal (where tqdm draws its bar)."""
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):
    return False


class Progress:
  """Counts work done out of `total` and shows it with a rate and an ETA.

  Args:
    total: units of work of the whole loop (records, batches, requests).
    desc: what the loop is (the start of every line).
    unit: the unit's name, singular (`record`).
    log_every_seconds: the cadence of log lines when not on a TTY.
    enabled: False shows nothing (e.g. on the non-primary hosts).
    tty: force the bar (True) or the log lines (False); default: `is_tty()`.
  """

  def __init__(self, total: int, desc: str, unit: str = "it", *,
               log_every_seconds: float = LOG_EVERY_SECONDS, enabled: bool = True,
               tty: Optional[bool] = None):
    self.total, self.desc, self.unit = int(total), desc, unit
    self.n = 0
    self.log_every_seconds = log_every_seconds
    self.enabled = enabled
    self.t0 = self._last_log = time.monotonic()
    self.lines = 0
    self._bar = None
    if enabled and (is_tty() if tty is None else tty):
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

  def rate(self) -> Optional[float]:
    """Units per second since the start (None before any unit is done)."""
    dt = time.monotonic() - self.t0
    return self.n / dt if self.n and dt > 0 else None

  def eta_seconds(self) -> Optional[float]:
    """Seconds left at the mean rate so far (None before any unit is done)."""
    r = self.rate()
    return (self.total - self.n) / r if r else None

  def line(self) -> str:
    """`desc: n/total units (pct%), rate units/s, ETA h:mm:ss`."""
    pct = f" ({100.0 * self.n / self.total:.1f}%)" if self.total else ""
    r = self.rate()
    rate = f", {r:,.1f} {self.unit}s/s" if r else ""
    return (f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}s{pct}{rate}, "
            f"ETA {format_eta(self.eta_seconds())}")

  def update(self, n: int = 1) -> None:
    """Adds `n` units done; draws the bar or, when due, logs a line."""
    self.n += int(n)
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(int(n))
      return
    now = time.monotonic()
    if now - self._last_log >= self.log_every_seconds and self.n < self.total:
      self._last_log = now
      self.lines += 1
      log.info("%s", self.line())

  def close(self) -> None:
    """Closes the bar, or logs the final line when the loop logged before."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self.enabled and self.lines:
      log.info("%s: done, %s in %s", self.desc, f"{self.n:,} {self.unit}s",
               format_eta(time.monotonic() - self.t0))

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
