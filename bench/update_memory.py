"""Benchmark (not a test): XLA's temporary memory of the real update step at the paper's shape.

  python bench/update_memory.py --quick      # tiled update only (~1-2 min CPU); last line
                                             # update_temp_gib=<x>
  python bench/update_memory.py              # also the dense path (full logits, [T, T] scores)
  python bench/update_memory.py --layers 28 --response 16384

Compiles, without running, `train.step.make_update_fn` (the real jitted update: model forward,
the method's loss, gradients, AdamW) for a Qwen3-1.7B-shaped model cut to `--layers` layers
(hidden 2048, vocabulary 151,936, tied head), prompt 256 + response 8192, one row per device on an
8-device fsdp mesh of fake CPU devices, and prints XLA's per-device memory analysis
(`jax.jit(f).lower(...).compile().memory_analysis()`) for:
  tiled  model.head=tiled (ops/vocab_tiling) + model.attention=blockwise (ops/attention)
  dense  model.head=dense + model.attention=dense: [B, L, V] logits and [B, H, T, T] scores
Both in the paper-scale precision (bfloat16 compute and frozen base, float32 master weights and
AdamW), the config's scanned layers and remat policy (model.scan_layers, model.remat=full) and
model.layer_chunk (each layer after its keys and values - q-projection, attention over all keys,
o-projection, norm, MLP - over rematerialised query chunks of 256 tokens; --layer-chunk 0 turns it
off, and model.mlp_chunk then chunks the MLPs alone). Nothing is allocated, so it runs on a laptop; compile time is printed too. XLA's CPU
backend computes bfloat16 elementwise ops and dots in float32, so CPU temporaries overstate a
GPU/TPU's for the bfloat16 activations and the bfloat16 frozen base.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEVICES = 8
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from omniopd_jax.configs import math as math_config  # noqa: E402
from omniopd_jax.models import hf  # noqa: E402
from omniopd_jax.tools import plan as planner  # noqa: E402

GIB = 1024**3
PATHS = {
  "tiled": dict(head="tiled", attention="blockwise"),
  "dense": dict(head="dense", attention="dense"),
}


def update_config(path: str, args):
  """configs/math.py (paper-scale defaults) with the benchmark's shape and the path's fields."""
  config = math_config.get_config("default")
  config.method = args.method
  config.batch_size = DEVICES  # one row per device
  config.max_prompt_len = args.prompt
  config.rollout.max_new_tokens = args.response
  config.mesh = [("data", 1), ("fsdp", DEVICES), ("tensor", 1)]
  config.model.update(**PATHS[path])
  if args.remat is not None:
    config.model.remat = args.remat
  if args.mlp_chunk is not None:
    config.model.mlp_chunk = args.mlp_chunk
  if args.layer_chunk is not None:
    config.model.layer_chunk = args.layer_chunk
  return config


def measure(path: str, args) -> dict:
  config = update_config(path, args)
  cfg = hf.config_from_hf(dict(planner.PRESETS["qwen3-1.7b"], num_hidden_layers=args.layers))
  mesh = {"data": 1, "fsdp": DEVICES, "tensor": 1}
  start = time.perf_counter()
  out = planner.compiled_update_memory(config, cfg, mesh)
  out["compile_s"] = time.perf_counter() - start
  est = planner.plan(config, cfg, mesh)
  out["planner_update"] = est.phase("update")
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the tiled update only")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--response", type=int, default=8192)
  parser.add_argument("--method", default="omniopd", choices=("omniopd", "grpo", "sft", "opd"))
  parser.add_argument(
    "--remat", default=None, choices=("none", "full", "dots", "dots_except_mlp"),
    help="model.remat policy (default: the config's, full at paper scale)",
  )  # fmt: skip
  parser.add_argument(
    "--mlp-chunk", type=int, default=None, help="model.mlp_chunk (default: the config's)"
  )
  parser.add_argument(
    "--layer-chunk", type=int, default=None, help="model.layer_chunk (default: the config's)"
  )
  args = parser.parse_args()
  print(
    f"Qwen3-1.7B shape, {args.layers} layers, prompt {args.prompt} + response {args.response}, "
    f"{args.method}, {DEVICES} devices (fsdp), one row each; {jax.devices()[0].platform} compile",
    flush=True,
  )
  paths = ["tiled"] if args.quick else ["tiled", "dense"]
  results = {}
  for path in paths:
    r = results[path] = measure(path, args)
    print(
      f"{path:>6}: temp {r['temp'] / GIB:8.3f} GiB  arguments {r['argument'] / GIB:6.3f}  "
      f"outputs {r['output'] / GIB:6.3f}  peak {r['peak'] / GIB:8.3f} GiB per device  "
      f"(planner's update phase {r['planner_update'] / GIB:.3f}; compiled in {r['compile_s']:.0f} s)",
      flush=True,
    )
  if "dense" in results:
    ratio = results["dense"]["temp"] / max(results["tiled"]["temp"], 1)
    print(f"dense / tiled temporaries: {ratio:.1f}x")
  print(f"update_temp_gib={results['tiled']['temp'] / GIB:.3f}")


if __name__ == "__main__":
  main()
