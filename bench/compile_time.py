"""Benchmark (not a test): compile time of the update and the rollout programs, layers unrolled vs
scanned (config model.scan_layers).

  python bench/compile_time.py               # SmolLM2-135M shape (30 layers); last line
                                             # compile_speedup=<update unrolled / scanned>
  python bench/compile_time.py --layers 8 --programs update

For a SmolLM2-135M-shaped model (tools/plan_model.PRESETS["smollm2-135m"]: 30 Llama layers,
hidden 576, vocabulary 49,152, tied head) with abstract weights (nothing is allocated), times
`jax.jit(f).lower(...)` and `.compile()` on the local backend for:
  update    the real update step (train.step.make_update_fn via tools.plan.lower_update: student
            forward and backward, frozen-base forward, omniopd loss, AdamW), configs/math.py's
            defaults (bfloat16 compute, tiled head, remat "full") at batch --batch, prompt
            --prompt + response --response tokens
  generate  the static engine's one program (rollout.sampler.make_generate_fn: prefill + decode
            loop over a dense KV cache)
  decode    the continuous engine's decode program (rollout.continuous.Engine, paged KV cache)
each once with scan_layers=False and once with True, and prints a table. Compile times on a
shared machine are noisy: compare the two columns of one run.
"""

import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from omniopd_jax.configs import math as math_config  # noqa: E402
from omniopd_jax.models import hf, layer_scan, lm  # noqa: E402
from omniopd_jax.rollout import continuous, paged_cache, sampler  # noqa: E402
from omniopd_jax.tools import plan as planner  # noqa: E402

PROGRAMS = ("update", "generate", "decode")
MESH = {"data": 1, "fsdp": 1, "tensor": 1}


def timed(lower):
  """(lower seconds, compile seconds) of `lower()` -> jax.stages.Lowered."""
  start = time.perf_counter()
  lowered = lower()
  mid = time.perf_counter()
  lowered.compile()
  return mid - start, time.perf_counter() - mid


def update_program(cfg, args):
  config = math_config.get_config("default")
  config.batch_size, config.max_prompt_len = args.batch, args.prompt
  config.rollout.max_new_tokens = args.response
  config.omniopd.update(num_forks=2, chunk_len=min(50, args.response // 2))
  config.model.update(remat=args.remat, scan_layers=cfg.scan_layers)
  config.mesh = [(a, n) for a, n in MESH.items()]
  return lambda: planner.lower_update(config, cfg, MESH)


def _abstract_state(cfg):
  return nnx.split(lm.abstract_model(cfg, jnp.float32, jnp.float32))


def generate_program(cfg, args):
  graphdef, state = _abstract_state(cfg)
  options = sampler.SamplingOptions(max_new_tokens=args.response)
  fn = sampler.make_generate_fn(graphdef, options)
  s = jax.ShapeDtypeStruct
  b, p = args.batch, args.prompt
  inputs = (s((b, p), jnp.int32), s((b, p), jnp.bool_), s((), jnp.uint32), s((b,), jnp.int32))
  return lambda: fn.jitted.lower(state, *inputs)


def decode_program(cfg, args):
  graphdef, state = _abstract_state(cfg)
  options = sampler.SamplingOptions(max_new_tokens=args.response)
  eopts = continuous.EngineOptions(num_slots=args.batch)
  engine = continuous.Engine(
    graphdef, options, eopts, sampler._sample_fn(options), sampler._lm_head
  )
  max_pages = continuous._next_pow2(
    paged_cache.pages_for(args.prompt + args.response, eopts.page_size)
  )
  pages, slots, out = jax.eval_shape(
    lambda st: engine.init_buffers(st, args.batch, max_pages)[:3], state
  )
  s = jax.ShapeDtypeStruct
  table, capacity = s((args.batch, max_pages), jnp.int32), s((args.batch,), jnp.int32)
  scalar = s((), jnp.int32)
  return lambda: engine._decode.lower(state, pages, slots, out, table, capacity, scalar, scalar)


BUILDERS = {"update": update_program, "generate": generate_program, "decode": decode_program}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=30)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--response", type=int, default=192)
  parser.add_argument("--remat", default="full", choices=layer_scan.REMAT_POLICIES)
  parser.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated subset")
  args = parser.parse_args()
  programs = [p for p in args.programs.split(",") if p]
  if not programs or set(programs) - set(PROGRAMS) or "update" not in programs:
    parser.error(f"--programs: a subset of {PROGRAMS} including update")
  preset = dict(planner.PRESETS["smollm2-135m"], num_hidden_layers=args.layers)
  base = hf.config_from_hf(preset)
  print(
    f"SmolLM2-135M shape, {args.layers} layers; batch {args.batch}, prompt {args.prompt} + "
    f"response {args.response}; remat {args.remat}; {jax.devices()[0].platform} backend "
    f"(jax {jax.__version__})",
    flush=True,
  )
  jax.jit(lambda x: x + 1).lower(np.float32(0)).compile()  # backend start-up outside the timings
  rows = {}
  for program in programs:
    for scan in (False, True):
      cfg = dataclasses.replace(base, scan_layers=scan)
      rows[program, scan] = timed(BUILDERS[program](cfg, args))
      lower_s, compile_s = rows[program, scan]
      layout = "scanned" if scan else "unrolled"
      print(
        f"  {program:>8} {layout:>8}: lower {lower_s:6.1f} s, compile {compile_s:6.1f} s",
        flush=True,
      )
  print(f"\n{'program':>10} | {'unrolled s':>10} | {'scanned s':>10} | speedup (lower + compile)")
  for program in programs:
    unrolled, scanned = sum(rows[program, False]), sum(rows[program, True])
    print(f"{program:>10} | {unrolled:10.1f} | {scanned:10.1f} | {unrolled / scanned:6.1f}x")
  speedup = sum(rows["update", False]) / sum(rows["update", True])
  print(f"compile_speedup={speedup:.2f}")


if __name__ == "__main__":
  main()
