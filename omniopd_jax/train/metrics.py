"""Metrics out: JSONL + TensorBoard in the workdir, text samples, and one progress line per interval.

Device metrics are fetched one step late (`MetricsWriter.push`), so `jax.device_get` never stalls
the dispatch of the next step. Only process 0 writes.
"""

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

PROGRESS_KEYS = (
  ("train/loss", "loss", "{:.4f}"),
  ("train/kl", "kl", "{:.4f}"),
  ("omniopd/pi_hat_mean", "pi_hat", "{:.3f}"),
  ("eval/pass@1", "pass@1", "{:.3f}"),
  ("time/teacher_wait_s", "teacher", "{:.2f}s"),
  ("time/step_s", "step", "{:.2f}s"),
  ("teacher/cost_usd", "$", "{:.4f}"),
)


def _scalar(x) -> float | None:
  try:
    value = float(np.asarray(x))
  except (TypeError, ValueError):
    return None
  return value


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  h, rem = divmod(int(seconds), 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Writes scalars to <workdir>/metrics.jsonl and TensorBoard, texts to samples.jsonl."""

  def __init__(
    self, workdir: str, *, num_steps: int, start_step: int = 0, enabled: bool = True, stream=None
  ):
    self.enabled = enabled
    self.num_steps = num_steps
    self.stream = stream or sys.stdout
    self.pending: tuple[int, dict, dict] | None = None
    self.start_time = time.time()
    self.start_step = start_step
    self.last: dict[str, float] = {}
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self.samples = open(os.path.join(workdir, "samples.jsonl"), "a")
    from tensorboardX import SummaryWriter

    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict[str, Any]):
    """Write host-side scalars now."""
    values = {k: v for k, v in ((k, _scalar(v)) for k, v in scalars.items()) if v is not None}
    self.last.update(values)
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()
    for key, value in values.items():
      self.tb.add_scalar(key, value, step)

  def push(self, step: int, device_metrics: dict, host_metrics: dict):
    """Queue this step's device metrics; write the previous step's (now surely computed)."""
    self.flush()
    self.pending = (step, device_metrics, host_metrics)

  def flush(self):
    if self.pending is None:
      return
    step, device_metrics, host_metrics = self.pending
    self.pending = None
    self.write(step, {**jax.device_get(device_metrics), **host_metrics})

  def write_texts(self, step: int, samples: list[dict]):
    if not self.enabled or not samples:
      return
    for sample in samples:
      self.samples.write(json.dumps({"step": step, **sample}) + "\n")
    self.samples.flush()
    text = "\n\n".join(json.dumps(s, indent=1)[:2000] for s in samples)
    self.tb.add_text("samples", text, step)

  def progress(self, step: int, extra: str = ""):
    """One line: step, main metrics, ETA."""
    done = step - self.start_step
    rate = (time.time() - self.start_time) / max(done, 1)
    parts = [f"step {step}/{self.num_steps}"]
    for key, label, fmt in PROGRESS_KEYS:
      if key in self.last:
        parts.append(f"{label} {fmt.format(self.last[key])}")
    parts.append(f"eta {format_eta(rate * (self.num_steps - step))}")
    if extra:
      parts.append(extra)
    if self.enabled:
      print(" | ".join(parts), file=self.stream, flush=True)

  def close(self):
    self.flush()
    if self.enabled:
      self.jsonl.close()
      self.samples.close()
      self.tb.close()
