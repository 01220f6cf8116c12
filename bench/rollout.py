"""Rollout throughput: continuous batching over a paged KV cache against today's static batch, on
the same weights, prompts, seed and per-row length caps (so the same generated tokens), measured
interleaved in one process.

  python bench/rollout.py --quick      # < 1 min on 2 CPU cores; last line is the ratio
  python bench/rollout.py --rows 128 --max-new-tokens 512 --slots 32

Response lengths are long-tailed, as reasoning rollouts are: per-row caps with a mean near 30% of
the maximum and a few rows at the maximum; no EOS, so every row runs exactly to its cap and both
engines generate the same tokens (checked). The static engine decodes all rows in one batch until
the longest ends; the continuous engine decodes `--slots` rows at a time and refills a slot as
soon as its row ends. The last line is `rollout_vs_static_ratio=<x>` (tokens/s over tokens/s).
"""

import argparse
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from omniopd_jax.models import lm
from omniopd_jax.rollout import continuous, sampler

# A small Llama-shaped student (about 4M parameters, so the 2-core CPU runs --quick in under a
# minute); a decode step's cost still grows with the rows it carries, as on an accelerator.
CONFIG = lm.ModelConfig(
  vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True,
)  # fmt: skip


def long_tailed_caps(n: int, max_len: int, rng, mean_fraction=0.3, at_max=2) -> np.ndarray:
  """n caps in [1, max_len]: geometric-like (mean near mean_fraction of max), `at_max` at max."""
  caps = rng.exponential(mean_fraction * max_len * 0.85, n)
  caps = np.clip(np.round(caps), 1, max_len).astype(np.int32)
  caps[rng.choice(n, at_max, replace=False)] = max_len
  return caps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="96 rows x 128 tokens, < 1 min")
  parser.add_argument("--rows", type=int, default=192)
  parser.add_argument("--max-new-tokens", type=int, default=384)
  parser.add_argument("--slots", type=int, default=0, help="decode slots; 0: rows / 4")
  parser.add_argument("--page-size", type=int, default=16)
  parser.add_argument("--steps-per-sync", type=int, default=32)
  parser.add_argument("--trials", type=int, default=3, help="timed runs per engine, interleaved")
  args = parser.parse_args(argv)
  if args.quick:
    args.rows, args.max_new_tokens, args.trials = 96, 128, 2
  rng = np.random.default_rng(0)
  model = lm.CausalLM(CONFIG, rngs=nnx.Rngs(0))
  prompts = [
    rng.integers(3, CONFIG.vocab_size, int(n)).tolist() for n in rng.integers(8, 40, args.rows)
  ]
  caps = long_tailed_caps(args.rows, args.max_new_tokens, rng)
  slots = args.slots or max(1, args.rows // 4)
  options = continuous.EngineOptions(
    num_slots=slots, page_size=args.page_size, steps_per_sync=args.steps_per_sync
  )
  kw = dict(
    max_new_tokens=args.max_new_tokens, max_new_tokens_per_row=caps, temperature=1.0, seed=7
  )
  engines = {
    "static": lambda: sampler.generate(model, prompts, engine="static", **kw),
    "continuous": lambda: sampler.generate(model, prompts, engine_options=options, **kw),
  }
  print(
    f"# jax {jax.__version__} on {jax.devices()[0].device_kind}; {CONFIG.num_params() / 1e6:.1f}M "
    f"params; {args.rows} rows, caps mean {caps.mean():.0f} (max {args.max_new_tokens}, "
    f"{(caps == args.max_new_tokens).sum()} at max); {slots} slots, pages of {args.page_size}"
  )
  outputs, compile_s = {}, {}
  stats = {}
  for name, run in engines.items():  # first call compiles (each engine's programs, all buckets)
    t = time.perf_counter()
    outputs[name] = run()
    compile_s[name] = time.perf_counter() - t
    stats[name] = sampler.last_stats()
  same = all(np.array_equal(outputs["static"][i], outputs["continuous"][i]) for i in (0, 1))
  tokens = int(outputs["continuous"].mask.sum())
  assert tokens == caps.sum(), (tokens, caps.sum())
  times = {name: [] for name in engines}
  for trial in range(args.trials):  # interleaved, alternating order: the machine is shared
    for name in engines if trial % 2 == 0 else reversed(engines):
      t = time.perf_counter()
      engines[name]()
      times[name].append(time.perf_counter() - t)
  rate = {name: tokens / statistics.median(ts) for name, ts in times.items()}
  for name in engines:
    print(
      f"{name:10s} {rate[name]:8.1f} tok/s  (runs {min(times[name]):.2f}-{max(times[name]):.2f}s, "
      f"first call incl. compile {compile_s[name]:.1f}s)  {stats[name]}"
    )
  print(f"# {tokens} generated tokens each; same tokens and masks from both engines: {same}")
  print(f"rollout_vs_static_ratio={rate['continuous'] / rate['static']:.2f}")


if __name__ == "__main__":
  sys.exit(main())
