"""Overlap with the teacher: one OmniOPD collection step (rollout, forks, teacher, scoring) with
`rollout.overlap_teacher` on and off, against a slow teacher, measured interleaved in one process.

  python bench/rollout_overlap.py --quick     # 1-2 min on 2 CPU cores; last line overlap_speedup=<x>
  python bench/rollout_overlap.py --rows 64 --latency-s 0.5 --max-in-flight 8

The teacher is the seeded fake OpenAI-completions server of tests/fake_teacher_servers.py on
127.0.0.1 (a subprocess: its HTTP work does not share this process's interpreter lock), answering
each call after `--latency-s`; the client sends at most `--max-in-flight` calls at once, as a real
teacher's capacity or rate limit allows. With overlap, the continuous engine's finished rows
(`--slots` decode at once, so rows end in waves) send their fork requests while later rows decode; without, every request leaves after the decode.
When the teacher could answer everything at once, both wait one latency after the decode; the
gain is the teacher work done during the decode. Both modes must build identical batches
(checked). The last line is `overlap_speedup=<x>`: the median step time without overlap over the
median with.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from omniopd_jax import sharding  # noqa: E402
from omniopd_jax.configs import math as math_config  # noqa: E402
from omniopd_jax.experiments import demo_models  # noqa: E402
from omniopd_jax.methods import base, omniopd  # noqa: E402
from omniopd_jax.models import lm  # noqa: E402
from omniopd_jax.reward import similarity  # noqa: E402
from omniopd_jax.teacher import client as tc  # noqa: E402


def start_teacher(latency_s: float) -> tuple[subprocess.Popen, str]:
  """The seeded fake teacher in a subprocess; (process, base URL)."""
  server = os.path.join(ROOT, "tests", "fake_teacher_servers.py")
  cmd = [sys.executable, server, "--seeded", "--latency-s", str(latency_s)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
  line = proc.stdout.readline().strip()
  if not line.startswith("PORT="):
    proc.kill()
    raise RuntimeError(f"fake teacher server did not start: {line!r}")
  return proc, f"http://127.0.0.1:{line[5:]}/v1"


def make_config(args, overlap: bool):
  c = math_config.get_config("smoke")
  c.rollout.update(max_new_tokens=args.max_new_tokens, num_slots=args.slots, page_size=16,
                   steps_per_sync=16, overlap_teacher=overlap)  # fmt: skip
  c.omniopd.update(num_forks=args.forks, chunk_len=8, num_teacher_samples=2)
  c.scoring.phi = "edit"
  c.max_prompt_len = 64
  return c


def prompt_batch(tokenizer, rows: int, rng) -> dict:
  questions = [
    " + ".join(str(x) for x in rng.integers(1, 99, rng.integers(2, 5))) for _ in range(rows)
  ]
  return {"prompt_ids": [tokenizer.encode(f"Q: {q} =\nA: ") for q in questions],
          "examples": [{"question": q} for q in questions]}  # fmt: skip


def collect_step(config, tokenizer, model, url, batch, step, max_in_flight):
  """(seconds for collect + finish, the Collected)."""
  client = tc.TeacherClient.from_config(
    dict(backend="openai_completions", base_url=url, model="teacher", max_tokens=8,
         prompts_per_request=1, max_in_flight=max_in_flight)
  )  # fmt: skip
  ctx = base.Context(
    config=config, tokenizer=tokenizer, eos_ids=(tokenizer.eos_token_id,),
    rules=sharding.DEFAULT_RULES, rollout_mesh=None, process_index=0, teacher=client,
    scorer=similarity.make_scorer(config.scoring), backend="openai_completions",
  )  # fmt: skip
  try:
    t0 = time.perf_counter()
    got = omniopd.collect(ctx, model, batch, step)()
    return time.perf_counter() - t0, got
  finally:
    client.close()


def same(a, b) -> bool:
  leaves = zip(jax.tree.leaves(a.batch), jax.tree.leaves(b.batch))
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in leaves)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="32 rows x 64 tokens, 2 trials")
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--max-new-tokens", type=int, default=96)
  parser.add_argument("--slots", type=int, default=0, help="decode slots; 0: rows / 4")
  parser.add_argument("--forks", type=int, default=2, help="omniopd.num_forks")
  parser.add_argument("--latency-s", type=float, default=0.3, help="per teacher call")
  parser.add_argument("--max-in-flight", type=int, default=8, help="teacher calls at once")
  parser.add_argument("--trials", type=int, default=3, help="timed steps per mode, interleaved")
  args = parser.parse_args(argv)
  if args.quick:
    args.rows, args.max_new_tokens, args.trials = 32, 64, 2
  args.slots = args.slots or max(1, args.rows // 4)
  tokenizer = demo_models.make_tokenizer()
  cfg = demo_models.model_config(tokenizer, hidden_size=192, intermediate_size=512,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=48)  # fmt: skip
  model = lm.CausalLM(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  print(f"{args.rows} rows x {args.max_new_tokens} tokens, {args.slots} slots, {args.forks} forks/row;"
        f" teacher {args.latency_s} s per call, {args.max_in_flight} in flight", flush=True)  # fmt: skip
  times = {True: [], False: []}
  proc, url = start_teacher(args.latency_s)
  try:
    for trial in range(args.trials + 1):  # trial 0 compiles (not timed)
      batch = prompt_batch(tokenizer, args.rows, rng)
      got = {}
      for overlap in (True, False) if trial % 2 else (False, True):
        config = make_config(args, overlap)
        seconds, got[overlap] = collect_step(config, tokenizer, model, url, batch, trial,
                                             args.max_in_flight)  # fmt: skip
        if trial:
          times[overlap].append(seconds)
          timings = got[overlap].timings
          print(f"trial {trial} overlap={overlap}: step {seconds:.2f} s (rollout "
                f"{timings['rollout']:.2f} s, teacher wait {timings['teacher_wait']:.2f} s)",
                flush=True)  # fmt: skip
      if not same(got[True], got[False]):
        raise SystemExit("overlapped and plain collections built different batches")
  finally:
    proc.kill()
    proc.wait()
  on, off = statistics.median(times[True]), statistics.median(times[False])
  print(f"median step: overlapped {on:.2f} s, after the decode {off:.2f} s (identical batches)")
  print(f"overlap_speedup={off / on:.2f}")


if __name__ == "__main__":
  main()
