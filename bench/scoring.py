"""Benchmark: texts/s of the Flax encoder (omniopd_jax.encoder) against sentence-transformers.

Both embed the same ~50-token math-like chunk texts at the same batch sizes, interleaved in one run
(the machine is shared and drifts, so only a ratio measured side by side means anything). Devices
are picked automatically: JAX's default backend, and CUDA for torch when it has it.

  python bench/scoring.py --quick     # well under a minute; last line is the ratio
  python bench/scoring.py             # 1024 texts, batch sizes 64 and 256, 5 rounds
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
from sentence_transformers import SentenceTransformer  # noqa: E402

from omniopd_jax import encoder  # noqa: E402


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


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="256 texts, 2 rounds")
  parser.add_argument("--texts", type=int, default=1024)
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 256])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--model", default=None, help="sentence-transformers dir (default MiniLM)")
  parser.add_argument("--precision", default="highest", help="matmul precision: highest | default")
  args = parser.parse_args()
  if args.quick:
    args.texts, args.rounds = 256, 2

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

  rates = {(who, bs): [] for who in ("ours", "st") for bs in args.batch_sizes}
  rates.update({("ours", "all"): []})
  for r in range(args.rounds):
    for bs in args.batch_sizes:
      order = (("st", theirs), ("ours", ours)) if r % 2 == 0 else (("ours", ours), ("st", theirs))
      for who, fn in order:
        rates[(who, bs)].append(len(texts) / timed(lambda fn=fn, bs=bs: fn(bs)))
    rates[("ours", "all")].append(len(texts) / timed(lambda: enc.encode(texts)))

  ratios = []
  for bs in args.batch_sizes:
    o, s = statistics.median(rates[("ours", bs)]), statistics.median(rates[("st", bs)])
    ratios.append(o / s)
    print(
      f"batch {bs:4d}: ours {o:8.1f} texts/s   sentence-transformers {s:8.1f} texts/s   x{o / s:.2f}"
    )
  best_st = max(statistics.median(rates[("st", bs)]) for bs in args.batch_sizes)
  one_call = statistics.median(rates[("ours", "all")])
  print(
    f"all {len(texts)} texts in one call (the scorer's path): ours {one_call:.1f} texts/s "
    f"= x{one_call / best_st:.2f} sentence-transformers' best batch size"
  )
  ratio = min(ratios)
  print(f"encoder_vs_sentence_transformers_ratio={ratio:.2f}")


if __name__ == "__main__":
  main()
