"""Benchmark: TeacherClient against plain aiohttp on a local fake teacher that answers instantly.

Reports continuations/s at concurrency 64 and 256, with 0% and 10% faults, disk cache off/on, and
the latency one request adds (concurrency 1). The servers run in separate processes; measurements
of both sides are interleaved (the CPUs are shared). Last line of --quick:
`client_overhead_ratio=<ours / plain aiohttp time, cache off, concurrency 64>`.

  python bench/teacher_client.py --quick
"""

import argparse
import asyncio
import concurrent.futures
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

from omniopd_jax.teacher import client as tc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 0.5  # the fault server hangs 0.3 s on "timeout" faults... then answers 504


def start_server(fault_rate: float) -> tuple[subprocess.Popen, str]:
  proc = subprocess.Popen(
    [
      sys.executable,
      os.path.join(ROOT, "tests", "fake_teacher_servers.py"),
      "--fault-rate",
      str(fault_rate),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  line = proc.stdout.readline().strip()
  if not line.startswith("PORT="):
    proc.kill()
    raise RuntimeError(f"fake teacher server did not start: {line!r}")
  return proc, f"http://127.0.0.1:{line[5:]}/v1"


def prompts(n: int, tag: str) -> list[str]:
  return [f"Question {tag}-{i}: what is {i} + {i}?\nAnswer: {i} + {i} =" for i in range(n)]


class Plain:
  """Plain aiohttp, used the way a careful user would: one long-lived session and event loop
  (in this thread), a semaphore, one POST per continuation, a naive retry of failures."""

  def __init__(self, url: str, conc: int):
    self.url, self.conc = url + "/completions", conc
    self.loop = asyncio.new_event_loop()
    self.session = self.loop.run_until_complete(self._session())

  async def _session(self) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.conc), timeout=timeout)

  async def _run(self, texts: list[str]) -> tuple[float, int]:
    sem = asyncio.Semaphore(self.conc)

    async def one(text: str) -> bool:
      payload = {"model": "m", "prompt": text, "n": 1, "max_tokens": 16, "temperature": 1.0}
      async with sem:
        for _ in range(10):
          try:
            async with self.session.post(self.url, json=payload) as resp:
              if resp.status == 200:
                body = await resp.json()
                if isinstance(body.get("choices"), list) and body["choices"][0]["text"]:
                  return True
          except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            pass
        return False

    t0 = time.perf_counter()
    ok = await asyncio.gather(*(one(t) for t in texts))
    return time.perf_counter() - t0, sum(ok)

  def run(self, texts: list[str]) -> tuple[float, int]:
    return self.loop.run_until_complete(self._run(texts))

  def close(self) -> None:
    self.loop.run_until_complete(self.session.close())
    self.loop.close()


def make_client(url: str, conc: int, cache_dir: str | None = None) -> tc.TeacherClient:
  return tc.TeacherClient.from_config(
    dict(backend="openai_completions", base_url=url, model="m", max_in_flight=conc, max_retries=9,
         timeout_s=TIMEOUT_S, cache_dir=cache_dir, prompts_per_request=1, max_tokens=16,
         backoff_base_s=0.001, backoff_cap_s=0.01, storm_pause_s=0.01, max_retry_wait_s=0.01)
  )  # fmt: skip


def ours(client: tc.TeacherClient, texts: list[str]) -> tuple[float, int]:
  reqs = [tc.TeacherRequest(key=str(i), prefix_text=t, num_samples=1) for i, t in enumerate(texts)]
  t0 = time.perf_counter()
  futures = client.submit(reqs)
  concurrent.futures.wait(futures)
  dt = time.perf_counter() - t0
  return dt, sum(s.ok for f in futures for s in f.result())


def latency(url: str, texts: list[str]) -> tuple[float, float]:
  """p50 seconds of one request at concurrency 1: (plain, ours)."""

  async def seq():
    async with aiohttp.ClientSession() as session:
      out = []
      for t in texts:
        t0 = time.perf_counter()
        async with session.post(
          url + "/completions", json={"model": "m", "prompt": t, "max_tokens": 16}
        ) as r:
          await r.json()
        out.append(time.perf_counter() - t0)
      return out

  p = asyncio.run(seq())
  with make_client(url, 1) as client:
    o = []
    for i, t in enumerate(texts):
      t0 = time.perf_counter()
      client.submit([tc.TeacherRequest(key=str(i), prefix_text=t)])[0].result()
      o.append(time.perf_counter() - t0)
  return statistics.median(p), statistics.median(o)


def compare(url: str, n: int, conc: int, rounds: int, tag: str) -> dict[str, float]:
  """Interleaved rounds of plain / ours (cache off): median of the per-round paired ratios."""
  tp, to, cp, co = [], [], [], []
  ok_p = ok_o = 0
  plain = Plain(url, conc)
  with make_client(url, conc) as client:
    ours(client, prompts(min(n, 300), f"warm{tag}"))  # connections and code paths warm
    plain.run(prompts(min(n, 300), f"warmp{tag}"))
    for r in range(rounds):
      texts = prompts(n, f"{tag}{r}")
      for side in ("p", "o") if r % 2 == 0 else ("o", "p"):
        c0 = time.process_time()  # CPU of this process, all threads
        if side == "p":
          dt, ok = plain.run(texts)
          tp.append(dt)
          cp.append(time.process_time() - c0)
          ok_p += ok
        else:
          dt, ok = ours(client, texts)
          to.append(dt)
          co.append(time.process_time() - c0)
          ok_o += ok
  plain.close()
  # Each pair runs back to back, so slow drifts in the machine's load cancel in its ratio.
  return {"plain_cps": n / statistics.median(tp), "ours_cps": n / statistics.median(to),
          "ratio": statistics.median(o / p for o, p in zip(to, tp)), "best_ratio": min(to) / min(tp),
          "cpu_ratio": statistics.median(o / p for o, p in zip(co, cp)), "ok_plain": ok_p / (n * rounds), "ok_ours": ok_o / (n * rounds)}  # fmt: skip


def cache_runs(url: str, n: int, conc: int) -> tuple[float, float]:
  """Continuations/s with the disk cache on: cold (misses, writes) and warm (all hits)."""
  with tempfile.TemporaryDirectory() as d, make_client(url, conc, cache_dir=d) as client:
    texts = prompts(n, "cache")
    cold, _ = ours(client, texts)
    client.flush()
    warm, ok = ours(client, texts)
    assert client.metrics()["teacher/cache_hits"] == n == ok
  return n / cold, n / warm


def row(name: str, plain_cps, ours_cps, ratio=None, note="") -> None:
  cells = [f"{name:36s}", f"{plain_cps:12.0f}" if plain_cps else " " * 12, f"{ours_cps:12.0f}"]
  cells.append(f"{ratio:10.3f}" if ratio else " " * 10)
  print(" ".join(cells) + (f"   {note}" if note else ""))


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--quick", action="store_true", help="concurrency 64 only, under a minute")
  parser.add_argument("--n", type=int, default=None, help="continuations per round")
  parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per side")
  args = parser.parse_args()
  logging.getLogger("omniopd_jax.teacher.client").setLevel(
    logging.ERROR
  )  # storm notices: noise here
  n = args.n or (500 if args.quick else 2000)
  rounds = args.rounds or (21 if args.quick else 15)
  concs = (64,) if args.quick else (64, 256)
  clean, clean_url = start_server(0.0)
  faulty, faulty_url = start_server(0.1)
  try:
    print(
      f"fake teacher (own process): openai_completions, 1 continuation per request, {n} per round,"
    )
    print(f"{rounds} interleaved rounds per side; ratio = median of per-round paired time ratios")
    print(f"{'setting':36s} {'plain cont/s':>12s} {'ours cont/s':>12s} {'ours/plain':>10s}")
    headline = None
    for conc in concs:
      r = compare(clean_url, n, conc, rounds, f"c{conc}")
      headline = headline or r["ratio"]
      note = f"best rounds {r['best_ratio']:.3f}, cpu {r['cpu_ratio']:.3f}"
      row(f"concurrency {conc}, no faults", r["plain_cps"], r["ours_cps"], r["ratio"], note)
      f = compare(faulty_url, n, conc, max(5, rounds // 4), f"f{conc}")
      note = f"ok fraction: plain {f['ok_plain']:.3f} (naive retry), ours {f['ok_ours']:.3f}"
      row(f"concurrency {conc}, 10% faults", f["plain_cps"], f["ours_cps"], f["ratio"], note)
      cold, warm = cache_runs(clean_url, n * 2, conc)
      row(f"concurrency {conc}, cache on: cold", None, cold, note="misses, entries written")
      row(f"concurrency {conc}, cache on: warm", None, warm, note="all hits, no HTTP")
    p50_plain, p50_ours = latency(clean_url, prompts(200 if args.quick else 500, "lat"))
    print(
      f"latency at concurrency 1 (p50): plain {p50_plain * 1e6:.0f} us, ours {p50_ours * 1e6:.0f} us, "
      f"added {(p50_ours - p50_plain) * 1e6:.0f} us (thread hand-offs)"
    )
    print(f"client_overhead_ratio={headline:.3f}")
  finally:
    clean.kill()
    faulty.kill()


if __name__ == "__main__":
  main()
