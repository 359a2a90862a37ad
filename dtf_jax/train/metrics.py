"""Training metrics: TensorBoard scalars, a JSON-lines log, and a console progress line.

Only process 0 writes. Files under the workdir: ``tensorboard/`` (tensorboardX event files) and
``metrics.jsonl`` (one ``{"step": s, "split": "train"|"eval_...", ...scalars}`` per line).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax


class MetricWriter:
  """Writes scalars to TensorBoard and ``metrics.jsonl`` (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict, *, split: str = "train") -> None:
    if not self._active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{split}/{k}", v, step)
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
    self._jsonl.flush()

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def read_metrics(workdir: str, split: str = "train") -> dict[int, dict]:
  """The records of ``split`` in ``workdir/metrics.jsonl`` by step (``MetricWriter``'s file).

  A resumed run re-logs the steps after its checkpoint; the last record of a step wins.
  """
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == split:
        out[record["step"]] = record
  return out


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Tracks throughput and ETA; formats the console line.

  Args:
    total_steps: steps of the run.
    clips_per_step: clips consumed by one optimizer step (``batch_size * iter_size``).
    first_step: the step the run (re)starts from.
  """

  def __init__(self, total_steps: int, clips_per_step: int, first_step: int = 0):
    self.total_steps = total_steps
    self.clips_per_step = clips_per_step
    self._mark_step = first_step
    self._mark_time = time.perf_counter()
    self._data_wait = 0.0
    self._start_time = self._mark_time
    self._start_step = first_step

  def add_data_wait(self, seconds: float) -> None:
    self._data_wait += seconds

  def measure(self, step: int) -> dict:
    """Rates since the previous call: clips/s, steps/s, fraction of time waiting for data."""
    now = time.perf_counter()
    dt = max(now - self._mark_time, 1e-9)
    steps = step - self._mark_step
    out = {
        "clips_per_second": steps * self.clips_per_step / dt,
        "steps_per_second": steps / dt,
        "data_wait_seconds": self._data_wait,
        "data_wait_fraction": self._data_wait / dt,
    }
    self._mark_step, self._mark_time, self._data_wait = step, now, 0.0
    return out

  def eta_seconds(self, step: int) -> float:
    done = step - self._start_step
    if done <= 0:
      return math.inf
    return (time.perf_counter() - self._start_time) / done * (self.total_steps - step)

  def line(self, step: int, epoch: float, scalars: dict, rates: dict) -> str:
    width = len(str(self.total_steps))
    parts = [f"step {step:>{width}}/{self.total_steps}", f"epoch {epoch:.2f}"]
    for key, fmt in (("loss", ".4f"), ("accuracy", ".3f"), ("learning_rate", ".3g"), ("grad_norm", ".3g")):
      if key in scalars:
        parts.append(f"{key.replace('learning_rate', 'lr')} {scalars[key]:{fmt}}")
    parts.append(f"{rates['clips_per_second']:.1f} clips/s")
    parts.append(f"data wait {100 * rates['data_wait_fraction']:.0f}%")
    parts.append(f"ETA {format_duration(self.eta_seconds(step))}")
    return " | ".join(parts)


def log_info(msg: str, *args) -> None:
  if jax.process_index() == 0:
    logging.info(msg, *args)


class _DropChattyLibraries(logging.Filter):
  """Drops INFO/DEBUG records of orbax and grain (checkpoint I/O chatter)."""

  _PARTS = ("/orbax/", "/grain/")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not any(part in record.pathname for part in self._PARTS)


def quiet_library_logs() -> None:
  """Keeps the console to our progress lines: orbax/grain INFO messages are dropped."""
  try:
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.get_absl_handler().addFilter(_DropChattyLibraries())
  except ImportError:
    pass
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropChattyLibraries())
