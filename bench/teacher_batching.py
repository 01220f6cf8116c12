"""Benchmark: the local teacher engine serving many small seeded requests (one fork each, as the
demo sends them) in shared sampler calls vs one call per request (what it did before), same jobs,
same weights. Also checks that every request gets identical samples both ways.

  python bench/teacher_batching.py --quick

Last line: `seeded_shared_vs_separate_ratio=<separate time / shared time>`.
"""

import argparse
import os
import statistics
import time

import numpy as np

from omniopd_jax.experiments import demo_models
from omniopd_jax.teacher import engine


def jobs(teacher, n_forks: int, n: int, chunk: int, seed: int) -> list[engine.Job]:
  """Demo-like forks: a chain-sum prompt and part of its worked solution, one seeded job each."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n_forks):
    a, b, c = (int(x) for x in rng.integers(1, 99, 3))
    text = f"Q: {a} + {b} - {c} =\nA: {a} + {b} = {a + b}\n{a + b} - {c} = {a + b - c}\n"
    cut = int(rng.integers(14, len(text)))
    params = engine.SamplingParams(max_tokens=chunk, n=n, seed=1000 + i)
    out.append(engine.Job(prompts=(teacher.tokenize(text[:cut]),), params=params))
  return out


def timed(fn, repeats: int) -> tuple[float, list]:
  times, result = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), result


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="fewer repeats")
  p.add_argument("--forks", type=int, default=96, help="requests (a demo step: 32 rows x 3 forks)")
  p.add_argument("--samples", type=int, default=4, help="n per request")
  p.add_argument("--chunk", type=int, default=9, help="max_tokens per request")
  p.add_argument("--max_batch", type=int, default=64, help="rows per sampler call (the server's)")
  p.add_argument("--teacher", default="", help="HF dir (default: the bundled demo teacher)")
  args = p.parse_args()
  path = args.teacher or os.path.join(demo_models.BUNDLED, "demo_teacher")
  teacher = engine.LocalTeacher.from_pretrained(path, max_batch=args.max_batch)
  js = jobs(teacher, args.forks, args.samples, args.chunk, seed=0)
  shared = lambda: teacher.run(js)
  separate = lambda: [r for j in js for r in teacher.run([j])]
  shared(), separate()  # compile every shape first
  repeats = 3 if args.quick else 7
  t_sep, r_sep = timed(separate, repeats)
  t_shared, r_shared = timed(shared, repeats)
  same = all([c.token_ids for c in a] == [c.token_ids for c in b] for a, b in zip(r_shared, r_sep))
  rows = args.forks * args.samples
  print(
    f"{args.forks} seeded requests x n={args.samples} x {args.chunk} tokens, max_batch {args.max_batch}"
  )
  print(f"one call per request: {t_sep:.3f} s ({rows / t_sep:.0f} continuations/s)")
  print(f"shared calls:         {t_shared:.3f} s ({rows / t_shared:.0f} continuations/s)")
  print(f"identical samples: {same}")
  if not same:
    raise SystemExit("shared calls changed some request's samples")
  print(f"seeded_shared_vs_separate_ratio={t_sep / t_shared:.2f}")


if __name__ == "__main__":
  main()
