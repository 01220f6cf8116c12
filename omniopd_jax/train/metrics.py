"""Metrics out: JSONL + TensorBoard in the workdir, text samples, and one progress line per interval.

Device metrics are fetched one step late (`MetricsWriter.push`), so `jax.device_get` never stalls
the dispatch of the next step. Only process 0 writes.

TensorBoard tags are the JSONL keys, character for character (`eval/pass@1`, not tensorboardX's
renamed `eval/pass_1`): the summaries are built here and written with tensorboardX's FileWriter.
Histograms are real TensorBoard histograms under their JSONL key, from either
  - an array-valued metric (`{"omniopd/pi_hat": values}`, any shape): its exact values, or
  - a binned family `<name>_hist/<lower edge>` of fractions (reward.posterior.reward_metrics):
    one histogram `<name>_hist` over [0, 1], counts = fraction x `<prefix>/num_audited` when
    present; JSONL then holds {"edges": [...], "counts": [...]} under the same key.
"""

import json
import math
import os
import re
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
HISTOGRAM_BINS = 20  # bins of a histogram made from raw values, over their [min, max]
_BINNED = re.compile(r"^(?P<name>.+_hist)/(?P<lo>-?\d+(?:\.\d+)?)$")  # omniopd/pi_hat_hist/0.30


def _scalar(x) -> float | None:
  try:
    value = float(np.asarray(x))
  except (TypeError, ValueError):
    return None
  return value


def _is_array(x) -> bool:
  return isinstance(x, (list, tuple, np.ndarray, jax.Array)) and np.ndim(x) >= 1


def _binned_histograms(values: dict[str, Any]) -> dict[str, dict]:
  """`<name>_hist/<lo>` fraction families -> {name_hist: {"edges", "counts"}} over [first lo, 1]."""
  families: dict[str, list[tuple[float, float]]] = {}
  for key, value in values.items():
    match = _BINNED.match(key)
    if match and not _is_array(value):
      families.setdefault(match["name"], []).append((float(match["lo"]), float(value)))
  out = {}
  for name, bins in families.items():
    bins.sort()
    total = values.get(f"{name.rsplit('/', 1)[0]}/num_audited")
    scale = float(total) if total is not None and _scalar(total) else 1.0
    out[name] = {
      "edges": [lo for lo, _ in bins] + [1.0],
      "counts": [fraction * scale for _, fraction in bins],
    }
  return out


def _histogram_proto(edges, counts, values=None):
  """A TensorBoard HistogramProto: exact statistics from `values` when given, else from bins."""
  from tensorboardX.proto.summary_pb2 import HistogramProto

  edges, counts = np.asarray(edges, np.float64), np.asarray(counts, np.float64)
  if values is not None:
    lo, hi, total = float(values.min()), float(values.max()), float(values.size)
    moments = float(values.sum()), float(np.square(values).sum())
  else:  # only bins are known: centres stand for their values
    centres = (edges[:-1] + edges[1:]) / 2
    filled = np.nonzero(counts)[0]
    lo = float(edges[filled[0]]) if filled.size else float(edges[0])
    hi = float(edges[filled[-1] + 1]) if filled.size else float(edges[-1])
    total = float(counts.sum())
    moments = float((centres * counts).sum()), float((centres**2 * counts).sum())
  return HistogramProto(
    min=lo, max=hi, num=total, sum=moments[0], sum_squares=moments[1],
    bucket_limit=edges[1:].tolist(), bucket=counts.tolist(),
  )  # fmt: skip


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  h, rem = divmod(int(seconds), 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Writes scalars and histograms to <workdir>/metrics.jsonl and TensorBoard (<workdir>/tb, the
  same keys as tags), texts to samples.jsonl."""

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
    # FileWriter, not SummaryWriter: SummaryWriter renames tags ('@' -> '_'); the tags must be
    # the JSONL keys.
    from tensorboardX import FileWriter

    self.tb = FileWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict[str, Any]):
    """Write host-side metrics now: scalars, arrays (histograms) and binned histogram families."""
    hists = _binned_histograms(scalars)
    arrays = {k: np.asarray(v, np.float64).reshape(-1) for k, v in scalars.items() if _is_array(v)}
    values = {
      k: v
      for k, v in ((k, _scalar(v)) for k, v in scalars.items() if k not in arrays)
      if v is not None and not (_BINNED.match(k) and _BINNED.match(k)["name"] in hists)
    }
    self.last.update(values)
    if not self.enabled:
      return
    record = {"step": step, **values}
    from tensorboardX.proto.summary_pb2 import Summary

    summary = [Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
    for key, hist in hists.items():
      record[key] = hist
      summary.append(Summary.Value(tag=key, histo=_histogram_proto(hist["edges"], hist["counts"])))
    for key, array in arrays.items():
      array = array[np.isfinite(array)]
      if not array.size:
        continue
      bins = 1 if array.min() == array.max() else HISTOGRAM_BINS
      counts, edges = np.histogram(array, bins=bins)
      record[key] = {"edges": edges.tolist(), "counts": counts.tolist()}
      summary.append(Summary.Value(tag=key, histo=_histogram_proto(edges, counts, array)))
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    self.tb.add_summary(Summary(value=summary), step)

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
    from tensorboardX import summary

    self.tb.add_summary(summary.text("samples", text), step)  # tag samples/text_summary

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
