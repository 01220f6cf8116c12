"""Benchmark of the training loop's step: its wall time split and its overlap efficiency on :smoke
models behind a slow teacher, on-policy and with `one_step_off`.

  python bench/step_overlap.py --quick                     # ~1-2 min CPU; last line overlap_efficiency=<x>
  python bench/step_overlap.py --latency-ms 200 --steps 8  # 8 timed steps per mode

Our `serve` runs the :smoke teacher, behind a proxy (a subprocess of this script) that sleeps
`--latency-ms` before forwarding each POST; teacher and trainer get disjoint CPU halves (as if the
teacher were another machine; `--no-pin` shares them). `train.run` trains :smoke against the proxy,
on-policy and with `one_step_off`. Per mode it prints the medians of rollout / teacher span /
teacher wait / scoring / update, the mean step period, the overlap efficiency
max(device, teacher span) / step (device = rollout + update; teacher span = submission to last
result, the OmniOPD collection's `teacher_span`), which exceeds 1 when consecutive steps' teacher
spans overlap, and the step period against the loop's dependency bound (see `summarize`).
The update-step MFU and decode throughput are another benchmark: bench/step_mfu.py.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def mean_period(rows) -> float:
  """Seconds per step over the timed steps (a mean: in one_step_off consecutive periods alternate
  long and short, and their median is not the throughput)."""
  periods = [r["period_s"] for r in rows if "period_s" in r]
  if os.environ.get("BENCH_STEP_DEBUG"):
    print("periods (ms):", [round(x * 1e3) for x in periods], flush=True)
  return sum(periods) / len(periods) if periods else float("nan")


def median(rows, key: str) -> float:
  values = [r[key] for r in rows if key in r]
  return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------
# Latency proxy (runs as `python bench/step_overlap.py --proxy --upstream URL`)


def run_proxy(upstream: str, latency_s: float):
  """Forward every request to `upstream`, sleeping `latency_s` first on POSTs; prints PORT=."""
  import asyncio

  import aiohttp
  from aiohttp import web

  async def main():
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def forward(request: web.Request) -> web.Response:
      body = await request.read()
      if request.method == "POST":
        await asyncio.sleep(latency_s)  # the remote teacher's network and queueing delay
      headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type",)}
      async with session.request(
        request.method, upstream + request.path_qs, data=body, headers=headers
      ) as resp:
        payload = await resp.read()
        return web.Response(
          body=payload, status=resp.status, content_type=resp.content_type or "application/json"
        )

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"PORT={port}", flush=True)
    # Exit with the parent: stdin closes when the benchmark process goes away.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await session.close()
    await runner.cleanup()

  asyncio.run(main())


def start_proxy(upstream_root: str, latency_ms: float):
  import subprocess

  proc = subprocess.Popen(
    [sys.executable, os.path.abspath(__file__), "--proxy", "--upstream", upstream_root,
     "--latency-ms", str(latency_ms)],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
  )  # fmt: skip
  line = proc.stdout.readline().strip()
  if not line.startswith("PORT="):
    proc.kill()
    raise RuntimeError(f"latency proxy did not start (said {line!r})")
  return proc, f"http://127.0.0.1:{line[5:]}/v1"


# ------------------------------------------------------------------------------------------------
# Default mode: the training loop on :smoke models behind a slow teacher


def run_mode(args, root: str, teacher_url: str, one_step_off: bool) -> list[dict]:
  """train.run on :smoke for warmup + steps + 1 steps; the rows of the `steps` timed ones (not the
  warm-up, not the last), each with its step period added."""
  import json

  from omniopd_jax.configs import math as math_config
  from omniopd_jax.train import loop as train
  from omniopd_jax.train import metrics

  config = math_config.get_config("smoke")
  config.num_steps = args.warmup + args.steps + 1  # the last step has no next one to overlap
  config.one_step_off = one_step_off
  config.teacher.base_url = teacher_url
  config.checkpoint_every = 10**6  # only the final save, after the timed steps
  config.log_every = 10**6  # one progress line at the end
  config.eval.num_examples = 0  # no evaluation before/after
  config.batch_size = args.batch_size
  if args.max_new_tokens:
    config.rollout.max_new_tokens = args.max_new_tokens
  workdir = tempfile.mkdtemp(prefix="on_policy_" if not one_step_off else "one_step_off_", dir=root)
  os.symlink(os.path.join(root, "models"), os.path.join(workdir, "models"))

  # The step period is the time between consecutive steps reaching their metrics (finish_step);
  # the loop's own time/step_s spans more than one period in one_step_off mode.
  pushed: dict[int, float] = {}
  original = metrics.MetricsWriter.push

  def push(self, step, device_metrics, host_metrics):
    pushed[step] = time.perf_counter()
    return original(self, step, device_metrics, host_metrics)

  metrics.MetricsWriter.push = push
  try:
    train.run(config, workdir)
  finally:
    metrics.MetricsWriter.push = original
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "time/rollout_s" in r]
  for r in rows:
    if r["step"] - 1 in pushed:
      r["period_s"] = pushed[r["step"]] - pushed[r["step"] - 1]
  return [r for r in rows if args.warmup < r["step"] < config.num_steps]


def summarize(name: str, rows: list[dict], device_s: float, stale: int) -> float:
  """Prints the medians of one mode; returns its overlap efficiency.

  overlap efficiency = max(device, teacher span) / step period, device = rollout + update.
  It exceeds 1 when the teacher spans of consecutive steps overlap (one_step_off keeps two steps
  of requests in flight). The loop's dependencies give a tighter bound: with samples `stale`
  updates old, rollout -> teacher -> scoring -> update of one step spans stale + 1 periods, so
  period >= max(device, (device + span + scoring) / (stale + 1)); `of the bound` compares to it.
  """
  rollout, span = median(rows, "time/rollout_s"), median(rows, "time/teacher_span_s")
  wait, scoring = median(rows, "time/teacher_wait_s"), median(rows, "time/scoring_s")
  update, period = median(rows, "time/update_s"), mean_period(rows)
  efficiency = max(device_s, span) / period
  bound = max(device_s, (device_s + span + scoring) / (stale + 1))
  print(
    f"{name:>13}: step {period * 1e3:6.1f} ms | rollout {rollout * 1e3:5.1f} | update "
    f"{update * 1e3:5.1f} | teacher span {span * 1e3:5.1f} (wait {wait * 1e3:5.1f}) | scoring "
    f"{scoring * 1e3:4.1f} || device {device_s * 1e3:5.1f} | overlap efficiency "
    f"{efficiency:.3f} | bound {bound * 1e3:5.1f} ms: {bound / period:.0%} of the bound",
    flush=True,
  )
  return efficiency


@contextlib.contextmanager
def cpus(which: set[int] | None):
  """Run the body (e.g. a subprocess start: the child inherits it) on `which` CPUs, then return."""
  if not which:
    yield
    return
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, which)
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)


def overlap_bench(args):
  # Teacher (server and proxy) and trainer on disjoint CPU halves, as if the teacher were another
  # machine: on a few shared cores its generation would otherwise slow the update it overlaps.
  # Set before JAX starts, so that every thread the trainer creates inherits its half.
  available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  teacher_cpus = None
  if args.pin and len(available) >= 2:
    half = len(available) // 2
    teacher_cpus = set(available[half:])
    os.sched_setaffinity(0, set(available[:half]))

  import io

  import jax

  from omniopd_jax.configs import math as math_config
  from omniopd_jax.experiments import demo_models
  from omniopd_jax.teacher import server as serve
  from omniopd_jax.train import loop as train

  train.setup_logging()
  root = args.workdir or tempfile.mkdtemp(prefix="omniopd_bench_step_")
  os.makedirs(root, exist_ok=True)
  # The second mode (and a rerun in the same --workdir) reuses the first one's compiled programs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  _, teacher_dir = demo_models.build(root, math_config.get_config("smoke"), log=lambda m: None)
  with cpus(teacher_cpus):
    log_path = os.path.join(root, "teacher_server.log")
    server = serve.start_subprocess(teacher_dir, log_path=log_path)
    proxy, url = start_proxy(server.root, args.latency_ms)
  where = f"CPUs {sorted(teacher_cpus)} (trainer: the others)" if teacher_cpus else "shared CPUs"
  print(
    f"teacher: serve on the :smoke teacher behind +{args.latency_ms:g} ms per request, on {where}; "
    f"{args.warmup} warm-up + {args.steps} timed steps per mode, batch {args.batch_size}; "
    f"workdir {root}",
    flush=True,
  )
  results = {}
  try:
    for name, off in (("on_policy", False), ("one_step_off", True)):
      log = io.StringIO()
      with contextlib.redirect_stdout(log):  # the loop's own progress lines
        results[name] = run_mode(args, root, url, off)
  finally:
    proxy.stdin.close()
    proxy.wait(timeout=10)
    server.stop()
  # Device time from the on-policy run for both modes (same programs, same shapes): in
  # one_step_off the update is asynchronous (its time/update_s spans the host work it overlaps)
  # and the rollout first waits for the previous update.
  on = results["on_policy"]
  device_s = median(on, "time/rollout_s") + median(on, "time/update_s")
  summarize("on_policy", on, device_s, stale=0)
  efficiency = summarize("one_step_off", results["one_step_off"], device_s, stale=1)
  speedup = mean_period(on) / mean_period(results["one_step_off"])
  print(
    f"one_step_off steps {speedup:.2f}x faster. On-policy cannot overlap: rollout -> teacher -> "
    "scoring -> update are serial within a step and the next rollout needs this update. "
    "one_step_off samples step t+1 and submits its teacher requests before waiting for step t's, "
    "so two steps of teacher requests are in flight and update t runs under them.",
    flush=True,
  )
  print(f"overlap_efficiency={efficiency:.3f}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps (~1-2 min on CPU)")
  parser.add_argument("--latency-ms", type=float, default=200.0, help="added per teacher request")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per mode")
  parser.add_argument("--warmup", type=int, default=2, help="discarded (compile) steps per mode")
  parser.add_argument("--batch-size", type=int, default=8, help="prompts per step (:smoke: 8)")
  parser.add_argument("--max-new-tokens", type=int, default=0, help="0: :smoke's 32")
  parser.add_argument(
    "--no-pin", dest="pin", action="store_false", help="teacher and trainer share all CPUs"
  )
  parser.add_argument("--workdir", default="", help="default: a fresh temporary directory")
  parser.add_argument("--proxy", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.proxy:
    return run_proxy(args.upstream, args.latency_ms / 1e3)
  args.steps = args.steps or (8 if args.quick else 16)
  return overlap_bench(args)


if __name__ == "__main__":
  main()
