"""Benchmark (not a test): FLOPs of the update on packed sequences against padded rows.

  python bench/packing.py --quick    # analytic count only (seconds); last line packed_flops_ratio=<x>
  python bench/packing.py            # also XLA's cost analysis of the cut-down update (compiles)

The batch: 64 rows, prompt 256, responses spread uniformly from 10% to 100% of 8192 tokens
(`np.linspace`), the long-tailed shape of math reasoning. Padded, every row is 256 + 8192 tokens;
packed (`config.pack_sequences`, methods/packing.py), the rows' real tokens are laid end to end
first-fit-decreasing in 8448-token rows, their number bucketed for the batch axes (`--devices`) and
micro-batches (`--micro-batches`, each at most a padded micro-batch's rows) as the update does.

Analytic count (Qwen3-1.7B, 28 layers, vocabulary 151,936): the OmniOPD update is the student's
forward and backward (3 forwards) plus the frozen base's forward, so 4 x the forward's matmul
FLOPs: 2 x the layers' matmul parameters per input token, attention 4 x heads x head_dim per
(query, key) pair under the causal diagonal (blockwise / splash compute every pair there, across
segments too: "as computed"; only same-sequence pairs: "ideal"), and the LM head 2 x E x V per
position it runs on (padded: the L response positions; packed: every packed position).

XLA's count (`compiled.cost_analysis()["flops"]`) compiles, without running, the real loss and
gradients (train/step.make_loss_fn, method omniopd, frozen base) for the same shapes on a model cut
to `--layers` layers, on the CPU with the dense head and dense attention: XLA counts a loop's body
once, so the tiled head's and blockwise attention's loops would hide their FLOPs. Dense attention
computes every [T, T] pair (no causal skip), so XLA's attention share is ~2x the analytic one.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from omniopd_jax.configs import math as math_config  # noqa: E402
from omniopd_jax.methods import base, packing, registry  # noqa: E402
from omniopd_jax.models import hf, lm  # noqa: E402
from omniopd_jax.tools import plan as planner  # noqa: E402
from omniopd_jax.train import step as train_step  # noqa: E402


def spread_batch(rows: int, prompt: int, response: int, low: float) -> base.Sequences:
  """A padded batch (zero tokens) whose responses run from low x response to response."""
  lengths = np.round(np.linspace(low, 1.0, rows) * response).astype(int)  # [B]
  mask = np.ones((rows, prompt + response), bool)
  response_mask = np.arange(response)[None] < lengths[:, None]  # [B, L]
  mask[:, prompt:] = response_mask
  tokens = np.zeros((rows, prompt + response), np.int32)
  return base.Sequences(tokens, mask, tokens[:, prompt:], response_mask)


def update_flops(cfg: lm.ModelConfig, input_tokens, head_tokens, pairs) -> float:
  """4 x forward matmul FLOPs (student forward + backward, frozen base forward)."""
  e, d = cfg.hidden_size, cfg.dim_per_head
  h, kv, f = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
  per_token_layer = 2 * (e * d * (2 * h + 2 * kv) + 3 * e * f)  # q, k, v, o and the SwiGLU MLP
  attention = 4 * h * d * pairs  # QK^T and PV over the computed (query, key) pairs
  forward = cfg.num_hidden_layers * (per_token_layer * input_tokens + attention)
  return 4 * (forward + 2 * e * cfg.vocab_size * head_tokens)


def analytic(cfg, seq: base.Sequences, packed: packing.PackedBatch, lengths) -> dict:
  """Update FLOPs and tokens of the padded rows, the packed rows, and no padding at all."""
  rows, width = seq.tokens.shape
  response = seq.response_tokens.shape[1]
  r, s = packed.tokens.shape
  t = width - 1  # the padded update reads P + L - 1 tokens (the last one is only a target)
  causal = lambda n: n * (n + 1) // 2
  real = int(lengths.sum())
  return {
    "padded": dict(
      tokens=rows * width,
      flops=update_flops(cfg, rows * t, rows * response, rows * causal(t)),
    ),
    "packed": dict(tokens=r * s, flops=update_flops(cfg, r * s, r * s, r * causal(s))),
    "packed_ideal": dict(
      tokens=real,
      flops=update_flops(cfg, real, int(seq.response_mask.sum()), sum(map(causal, lengths))),
    ),
  }


def xla_flops(cfg, seq_shape, packed: packing.PackedBatch) -> dict:
  """XLA's cost analysis of the loss + gradients, padded vs packed (dense head and attention)."""
  config = math_config.get_config("default")
  config.model.update(head="dense", attention="dense", mlp_chunk=0, dtype="float32")
  method = registry.get("omniopd")
  rows, width, response = seq_shape
  graphdef, params = nnx.split(lm.abstract_model(cfg), nnx.Param)
  loss_fn = train_step.make_loss_fn(config, method, graphdef)

  def grads(params, base_params, batch):
    if isinstance(batch, packing.PackedBatch):
      batch = packing.with_totals(method.prepare_packed(config, batch))
    return jax.value_and_grad(loss_fn, has_aux=True)(params, base_params, None, batch)

  batches = {
    "padded": method.abstract_batch(config, rows, width - response, response),
    "packed": packing.abstract_packed(config, method, packed.tokens.shape[0], width, response),
  }
  out = {}
  for name, batch in batches.items():
    start = time.perf_counter()
    compiled = jax.jit(grads).lower(params, params, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[name] = dict(flops=float(cost["flops"]), compile_s=time.perf_counter() - start)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the analytic count only")
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--response", type=int, default=8192)
  parser.add_argument("--low", type=float, default=0.1, help="shortest response / longest")
  parser.add_argument("--devices", type=int, default=8, help="devices on the batch axes")
  parser.add_argument("--micro-batches", type=int, default=1, help="of the padded update")
  parser.add_argument("--layers", type=int, default=2, help="XLA's count: layers kept")
  args = parser.parse_args()

  seq = spread_batch(args.rows, args.prompt, args.response, args.low)
  lengths = seq.attention_mask.sum(1)  # [B] prompt + response tokens
  width = args.prompt + args.response
  cap = args.rows // args.micro_batches
  start = time.perf_counter()
  packed, where = packing.pack(seq, {}, unit=args.devices, cap=cap)
  pack_s = time.perf_counter() - start
  bins = int(where.packed_row.max()) + 1
  cfg = hf.config_from_hf(planner.PRESETS["qwen3-1.7b"])
  a = analytic(cfg, seq, packed, lengths)
  real = int(lengths.sum())
  padded_pad = a["padded"]["tokens"] - real
  packed_pad = a["packed"]["tokens"] - real
  print(
    f"batch: {args.rows} rows, prompt {args.prompt}, responses {int(seq.response_mask.sum(1).min())}"
    f"..{args.response} (uniform), {real:,} real tokens"
  )
  print(
    f"padded: {args.rows} rows x {width} = {a['padded']['tokens']:,} tokens "
    f"({padded_pad / a['padded']['tokens']:.1%} padding)"
  )
  print(
    f"packed: {bins} rows first-fit-decreasing -> {packed.tokens.shape[0]} rows "
    f"({packed.micro_batches} micro-batch(es) of {packed.tokens.shape[0] // packed.micro_batches}"
    f", {args.devices} devices) x {width} = {a['packed']['tokens']:,} tokens "
    f"({packed_pad / a['packed']['tokens']:.1%} padding); host packing {pack_s * 1e3:.0f} ms"
  )
  print(f"padding eliminated: {1 - packed_pad / padded_pad:.1%} of the padded update's padding")
  print("update FLOPs, Qwen3-1.7B (28 layers), analytic:")
  for name, row in a.items():
    ratio = a["padded"]["flops"] / row["flops"]
    print(f"  {name:13s} {row['flops'] / 1e15:8.1f} PFLOP   padded / this = {ratio:.3f}")
  if not args.quick:
    cut = hf.config_from_hf(dict(planner.PRESETS["qwen3-1.7b"], num_hidden_layers=args.layers))
    x = xla_flops(cut, (args.rows, width, args.response), packed)
    print(f"update FLOPs, XLA cost analysis ({args.layers} layers, dense head and attention):")
    for name, row in x.items():
      ratio = x["padded"]["flops"] / row["flops"]
      print(
        f"  {name:13s} {row['flops'] / 1e15:8.1f} PFLOP   padded / this = {ratio:.3f}"
        f"   (compile {row['compile_s']:.0f} s)"
      )
    print(f"xla_packed_flops_ratio={x['padded']['flops'] / x['packed']['flops']:.3f}")
  print(f"packed_flops_ratio={a['padded']['flops'] / a['packed']['flops']:.3f}")


if __name__ == "__main__":
  main()
