"""Tests for train/metrics.py: TensorBoard tags equal the JSONL keys (`eval/pass@1` stays as it is),
histograms are real TensorBoard histograms, device metrics are written one step late."""

import glob
import io
import json
import os
import struct

import numpy as np
import pytest

from omniopd_jax.train import metrics


def read_events(logdir: str) -> list:
  """Every Event in the TFRecord event files of `logdir` (tensorboardX's own protobufs)."""
  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12 : offset + 12 + length])  # after length + its CRC
      events.append(event)
      offset += 12 + length + 4  # + the data's CRC
  return events


def tb_values(logdir: str) -> dict[str, list]:
  """tag -> [(step, Summary.Value)] in write order."""
  out: dict[str, list] = {}
  for event in read_events(logdir):
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value))
  return out


def jsonl_rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


PI_HAT = np.array([0.05, 0.12, 0.18, 0.5, 0.51, 0.93, 0.95, 0.97], np.float32)


def _reward_metrics():
  """What reward.posterior.reward_metrics reports: a binned family of fractions."""
  counts, edges = np.histogram(PI_HAT, bins=10, range=(0.0, 1.0))
  out = {f"omniopd/pi_hat_hist/{lo:.2f}": c / PI_HAT.size for lo, c in zip(edges[:-1], counts)}
  return {**out, "omniopd/num_audited": float(PI_HAT.size), "omniopd/pi_hat_mean": 0.5}


@pytest.fixture
def written(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), num_steps=10, stream=io.StringIO())
  writer.write(1, {"train/loss": np.float32(1.5), "data/truncated_prompts": 2, **_reward_metrics()})
  writer.write(2, {"eval/pass@1": 0.25, "eval/maj@4": 0.5, "omniopd/pi_hat": PI_HAT})
  writer.write_texts(2, [{"prompt": "2 + 2 =", "pi_hat": 0.7}])
  writer.close()
  return tmp_path


def test_tensorboard_tags_are_the_jsonl_keys(written):
  rows = jsonl_rows(written)
  keys = {k for row in rows for k in row if k != "step"}
  tags = set(tb_values(str(written / "tb"))) - {"samples/text_summary"}
  assert tags == keys
  assert {"eval/pass@1", "eval/maj@4", "omniopd/pi_hat_hist", "omniopd/pi_hat"} <= tags
  assert not any("pass_1" in tag for tag in tags)
  scalars = tb_values(str(written / "tb"))
  assert scalars["eval/pass@1"][0][0] == 2 and scalars["eval/pass@1"][0][1].simple_value == 0.25
  assert rows[1]["eval/pass@1"] == 0.25 and rows[0]["data/truncated_prompts"] == 2


def test_histograms_are_real(written):
  values = tb_values(str(written / "tb"))
  ((step, raw),) = values["omniopd/pi_hat"]
  histo = raw.histo
  assert step == 2 and raw.WhichOneof("value") == "histo"
  counts, edges = np.histogram(PI_HAT.astype(np.float64), bins=metrics.HISTOGRAM_BINS)
  assert list(histo.bucket) == counts.tolist()
  np.testing.assert_allclose(histo.bucket_limit, edges[1:])
  assert histo.num == PI_HAT.size and histo.min == pytest.approx(PI_HAT.min())
  assert histo.max == pytest.approx(PI_HAT.max())
  assert histo.sum == pytest.approx(PI_HAT.astype(np.float64).sum())
  # The binned family becomes one histogram of counts over [0, 1], not ten scalar series.
  ((step, binned),) = values["omniopd/pi_hat_hist"]
  counts10, edges10 = np.histogram(PI_HAT, bins=10, range=(0.0, 1.0))
  assert step == 1 and list(binned.histo.bucket) == pytest.approx(counts10.tolist())
  np.testing.assert_allclose(binned.histo.bucket_limit, edges10[1:])
  assert not [tag for tag in values if tag.startswith("omniopd/pi_hat_hist/")]
  row = jsonl_rows(written)[0]
  assert row["omniopd/pi_hat_hist"]["counts"] == pytest.approx(counts10.tolist())
  assert row["omniopd/pi_hat_hist"]["edges"] == pytest.approx(edges10.tolist())


def test_tensorboard_reads_the_tags_back(written):
  """TensorBoard's own event reader (when installed) sees the same tags and kinds."""
  accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  acc = accumulator.EventAccumulator(str(written / "tb"), size_guidance={"histograms": 0})
  acc.Reload()
  tags = acc.Tags()
  assert {"eval/pass@1", "eval/maj@4", "train/loss", "data/truncated_prompts"} <= set(
    tags["scalars"]
  )
  assert set(tags["histograms"]) == {"omniopd/pi_hat", "omniopd/pi_hat_hist"}
  assert acc.Scalars("eval/pass@1")[0].value == 0.25


def test_device_metrics_written_one_step_late_and_progress(tmp_path):
  stream = io.StringIO()
  writer = metrics.MetricsWriter(str(tmp_path), num_steps=4, stream=stream)
  writer.push(1, {"train/loss": np.float32(2.0)}, {"time/step_s": 0.5})
  assert not os.path.getsize(tmp_path / "metrics.jsonl")  # held until the next push
  writer.push(2, {"train/loss": np.float32(1.0)}, {"eval/pass@1": 0.5})
  assert [row["step"] for row in jsonl_rows(tmp_path)] == [1]
  writer.progress(2)
  assert "step 2/4 | loss 2.0000" in stream.getvalue()
  writer.close()
  assert [row["step"] for row in jsonl_rows(tmp_path)] == [1, 2]
  assert writer.last["eval/pass@1"] == 0.5
  silent = metrics.MetricsWriter(str(tmp_path / "other"), num_steps=1, enabled=False)
  silent.write(1, {"omniopd/pi_hat": PI_HAT, "x": 1.0})
  silent.close()
  assert silent.last == {"x": 1.0} and not os.path.exists(tmp_path / "other")
