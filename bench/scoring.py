"""Benchmark: texts/s of the Flax encoder (omniopd_jax.encoder) against sentence-transformers.

Both embed the same ~50-token math-like chunk texts at the same batch sizes, interleaved in one run
(the machine is shared and drifts, so only a ratio measured side by side means anything). Devices
are picked automatically: JAX's default backend, and CUDA for torch when it has it.

  python bench/scoring.py --quick     # well under a minute; last line is the ratio
  python bench/scoring.py             # 1024 texts, batch sizes 64 and 256, 5 rounds

The ratio is the median over rounds and batch sizes of (ours texts/s) / (theirs texts/s), each
pair timed back to back. Options: --precision default (faster on GPU/TPU, less exact).
"""

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import roofline  # noqa: E402  (bench/roofline.py, beside this script)
from sentence_transformers import SentenceTransformer  # noqa: E402

from omniopd_jax.reward import encoder  # noqa: E402


def math_chunk(rng: random.Random, tokenize, target: int = 50) -> str:
  """A chain of arithmetic steps, grown until it has about `target` wordpieces."""
  a = rng.randint(2, 99)
  parts = []
  while True:
    b = rng.randint(2, 99)
    step = rng.choice(
      [
        f"so {a} + {b} = {a + b}",
        f"then we subtract {b} from {a + b} to get {a}",
        f"half of {2 * a} is {a}",
        f"{a} times {b % 9 + 2} is {a * (b % 9 + 2)}",
        f"and {a} is {'even' if a % 2 == 0 else 'odd'} so we add 1 to get {a + 1}",
        f"which means x = {a}, and therefore the answer is {a + b}",
      ]
    )
    parts.append(step)
    text = ", ".join(parts) + "."
    if len(tokenize([text])[0]) >= target:
      return text
    a = (a + b) % 97 + 2


def timed(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process) of fn()."""
  t0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t0, time.process_time() - c0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="256 texts, 3 rounds")
  parser.add_argument("--texts", type=int, default=1024)
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 256])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--model", default=None, help="sentence-transformers dir (default MiniLM)")
  parser.add_argument("--precision", default="highest", help="matmul precision: highest | default")
  args = parser.parse_args()
  if args.quick:
    args.texts, args.rounds = 256, 3

  path = args.model or encoder.default_model_path()
  enc = encoder.load_encoder(path, precision=args.precision)
  st = SentenceTransformer(path)  # picks CUDA when torch has it
  rng = random.Random(0)
  texts = list(dict.fromkeys(math_chunk(rng, enc.tokenize) for _ in range(args.texts)))
  lengths = [len(t) for t in enc.tokenize(texts)]
  print(
    f"jax backend={jax.default_backend()} devices={len(jax.devices())} precision={args.precision}; "
    f"torch device={st.device}; "
    f"{len(texts)} distinct texts, {np.mean(lengths):.1f} tokens on average "
    f"({min(lengths)}-{max(lengths)}, with [CLS]/[SEP])"
  )

  def ours(bs):
    for i in range(0, len(texts), bs):
      enc.encode(texts[i : i + bs])

  def theirs(bs):
    st.encode(texts, batch_size=bs)

  # Warm up both (compiles every shape ours will see) and check they agree.
  for bs in args.batch_sizes:
    ours(bs)
  e_ours = enc.encode(texts)
  e_st = st.encode(texts, batch_size=args.batch_sizes[0], convert_to_numpy=True)
  cos = np.sum(e_ours * e_st, 1) / np.linalg.norm(e_ours, axis=1) / np.linalg.norm(e_st, axis=1)
  print(f"agreement: min cosine(ours, sentence-transformers) = {cos.min():.7f}")

  # Rounds alternate who goes first; each (round, batch size) pair is timed back to back, so the
  # paired ratio cancels most of the drift of a shared machine. CPU seconds are shown beside.
  wall = {(who, bs): [] for who in ("ours", "st") for bs in args.batch_sizes}
  cpu = {key: [] for key in wall}
  one_call = []
  for r in range(args.rounds):
    for bs in args.batch_sizes:
      order = (("st", theirs), ("ours", ours)) if r % 2 == 0 else (("ours", ours), ("st", theirs))
      for who, fn in order:
        w, c = timed(lambda fn=fn, bs=bs: fn(bs))
        wall[(who, bs)].append(w)
        cpu[(who, bs)].append(c)
    one_call.append(timed(lambda: enc.encode(texts))[0])

  n, med = len(texts), statistics.median
  paired = []
  for bs in args.batch_sizes:
    ratios = [s / o for o, s in zip(wall[("ours", bs)], wall[("st", bs)])]
    paired += ratios
    o, s = n / med(wall[("ours", bs)]), n / med(wall[("st", bs)])
    cpu_ratio = med(cpu[("st", bs)]) / med(cpu[("ours", bs)])
    print(
      f"batch {bs:4d}: ours {o:8.1f} texts/s   sentence-transformers {s:8.1f} texts/s   "
      f"x{med(ratios):.2f} (paired rounds {min(ratios):.2f}-{max(ratios):.2f}; "
      f"per CPU-second x{cpu_ratio:.2f})"
    )
  best_st = max(n / med(wall[("st", bs)]) for bs in args.batch_sizes)
  print(
    f"all {n} texts in one call (the scorer's path): ours {n / med(one_call):.1f} texts/s "
    f"= x{n / med(one_call) / best_st:.2f} sentence-transformers at its best batch size"
  )
  if jax.default_backend() == "cpu":
    rates = [roofline.gemm_gflops(4096, k, f) for k, f in ((384, 1536), (1536, 384))]
    print(
      "# ceiling (bench/roofline.py): the encoder's feed-forward matmuls run at "
      + ", ".join(f"{x:.0f} vs {r:.0f} GFLOP/s (x{x / r:.2f})" for x, r in rates)
      + " in XLA vs torch on this CPU"
    )
  print(f"encoder_vs_sentence_transformers_ratio={med(paired):.2f}")


if __name__ == "__main__":
  main()
