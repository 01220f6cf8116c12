"""Benchmark of the jitted OmniOPD update (MFU) and the sampler's decode tokens/s on a randomly
initialised model of a given shape.

  python bench/step_mfu.py --model-size tiny    # CPU check of the MFU path (under a minute)
  python bench/step_mfu.py --model-size 0.5b    # GPU: random Qwen3-0.6B-shaped model, bf16

It imports only the model, train step, methods and sampler (and their jax/flax/optax
dependencies), so it runs where ml_collections, grain or tensorboardX are not installed.
The training loop's overlap of teacher and device is another benchmark: bench/step_overlap.py.
"""

import argparse
import os
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Dense bf16 peak TFLOP/s by device kind substring (first match wins; case-insensitive).
PEAK_TFLOPS = (
  ("h200", 989.0),
  ("h100", 989.0),
  ("a100", 312.0),
  ("l40s", 362.0),
  ("v6", 918.0),
  ("v5p", 459.0),
  ("v5 lite", 197.0),
  ("v5e", 197.0),
  ("v4", 275.0),
)

# Random-weight architectures (ModelConfig fields).
MODEL_SIZES = {
  "tiny": dict(
    vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
  ),
  "0.5b": dict(  # Qwen3-0.6B's shape
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128,
  ),
  "1.7b": dict(  # Qwen3-1.7B's shape
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128,
  ),
}  # fmt: skip
# (prompt_len, response_len) of the update step when not given on the command line; the batch is
# the largest that `update_bytes` says fits the device (4 on CPU).
UPDATE_SHAPES = {"tiny": (32, 64), "0.5b": (256, 1024), "1.7b": (256, 1024)}


# ------------------------------------------------------------------------------------------------
# The jitted OmniOPD update and the sampler on a randomly initialised model


def mfu_config(chunk_len: int, num_forks: int, steps: int, remat: bool = False):
  """configs/math.py's defaults for the sections train_step reads, as a nested namespace (no
  ml_collections needed)."""
  ns = types.SimpleNamespace
  return ns(
    method="omniopd",
    model=ns(remat=remat),
    num_steps=steps,
    micro_batches=1,
    omniopd=ns(
      num_forks=num_forks, chunk_len=chunk_len, num_teacher_samples=10, alpha=1.0, beta=0.1,
      weight_form="pi_hat", num_drafts=4, use_prior=True, kl_anchor=True, fork_method="peak",
      reduction="sequence_sum", norm_constant=0.0,
    ),
    optimizer=ns(
      learning_rate=1e-6, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.95,
      grad_clip=1.0,
    ),
    grpo=ns(group_size=8, clip_eps=0.2, beta=0.0),
    opd=ns(estimator="sampled", teacher_path=""),
  )  # fmt: skip


def forward_flops(cfg, batch: int, prompt_len: int, response_len: int) -> float:
  """Matmul FLOPs of one forward as train_step runs it: the trunk over the P + L - 1 input tokens,
  attention over full [T, T] scores (as computed; PaLM's convention) and the LM head on L."""
  e, d = cfg.hidden_size, cfg.dim_per_head
  h, kv, f = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
  t = prompt_len + response_len - 1
  per_token_layer = 2 * (e * d * (2 * h + 2 * kv) + 3 * e * f)  # q, k, v, o and the SwiGLU MLP
  attention = 2 * 2 * t * t * h * d  # QK^T and PV per layer and row
  layers = cfg.num_hidden_layers * batch * (per_token_layer * t + attention)
  return layers + 2 * e * cfg.vocab_size * batch * response_len


def peak_tflops(args, device) -> float | None:
  if args.peak_tflops:
    return args.peak_tflops
  kind = device.device_kind.lower()
  return next((p for name, p in PEAK_TFLOPS if name in kind), None)


def update_bytes(cfg, batch: int, prompt_len: int, response_len: int) -> float:
  """Rough device bytes of the update: float32 parameters, gradients and Adam moments plus the
  bf16 base copy, and per row what the backward pass keeps: [H, T, T] float32 attention scores
  (masked, softmaxed) and the activations of every layer, and ~10 [L, V] float32 logit-sized
  arrays (student and base logits, log-softmaxes, probabilities, gradient). Calibrated on XLA's
  memory analysis (CPU), which shows the same total with config.model.remat."""
  t = prompt_len + response_len - 1
  attention = 3 * cfg.num_attention_heads * t * t * 4
  layers = cfg.num_hidden_layers * (
    attention + t * (8 * cfg.hidden_size + 3 * cfg.intermediate_size) * 2
  )
  logits = 10 * response_len * cfg.vocab_size * 4
  return 18 * cfg.num_params() + batch * (layers + logits)


def fitting_batch(cfg, prompt_len: int, response_len: int, device) -> int:
  """The largest batch in 16, 8, .., 1 whose `update_bytes` is within 85% of the device's memory
  (4 when the device does not say how much it has)."""
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if not limit:
    return 4
  for b in (16, 8, 4, 2, 1):
    if update_bytes(cfg, b, prompt_len, response_len) <= 0.85 * limit:
      return b
  return 1


def timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def time_update(cfg, dtype, mesh, b: int, p: int, length: int, args):
  """Median seconds of the jitted OmniOPD update on B x (P + L) tokens of a fresh random model.

  Returns (median step seconds, first-call seconds, graphdef, the parameters after the steps).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from omniopd_jax import sharding
  from omniopd_jax.methods import base as methods_base
  from omniopd_jax.methods import omniopd
  from omniopd_jax.models import lm as model_lib
  from omniopd_jax.train import step as train_step

  with jax.set_mesh(mesh):
    model = sharding.create_sharded(
      lambda: model_lib.CausalLM(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), mesh
    )
  graphdef, params = nnx.split(model)
  del model
  chunk, forks = args.chunk_len, args.num_forks
  config = mfu_config(chunk, forks, args.steps + 1, args.remat)
  base_params = jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), params)
  tx = train_step.make_optimizer(config.optimizer, config.num_steps)
  state = train_step.init_state(params, tx, 0)
  del params  # donated with the state
  update = train_step.make_update_fn(config, mesh, graphdef, jax.eval_shape(lambda s: s, state))
  state = jax.device_put(state, update.shardings)
  # M forks of C tokens per row, spread over the response, with synthetic weights.
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, cfg.vocab_size, (b, p + length)).astype(np.int32)  # [B, P + L]
  starts = np.minimum(np.arange(forks) * max(length // forks, chunk), length - chunk)  # [M]
  seq = methods_base.Sequences(
    tokens=tokens,
    attention_mask=np.ones((b, p + length), bool),
    response_tokens=tokens[:, p:],
    response_mask=np.ones((b, length), bool),
  )
  batch = omniopd.OmniOPDBatch(
    seq=seq,
    fork_starts=np.broadcast_to(starts, (b, forks)).astype(np.int32),  # [B, M]
    fork_mask=np.ones((b, forks), bool),  # [B, M]
    fork_weight=rng.uniform(-1, 1, (b, forks)).astype(np.float32),  # [B, M]
  )
  batch = jax.device_put(batch)
  t0 = time.perf_counter()
  state, m = update(state, base_params, batch)
  jax.block_until_ready(m["train/loss"])
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = update(state, base_params, batch)
    jax.block_until_ready(m["train/loss"])
    times.append(time.perf_counter() - t0)
  return statistics.median(times), compile_s, graphdef, state.params


def is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def mfu_bench(args):
  # The update of a 1.7B model with B x 1280 tokens needs most of an 80 GB card (JAX takes 75%).
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  import gc

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from omniopd_jax import sharding
  from omniopd_jax.models import lm as model_lib
  from omniopd_jax.rollout import sampler

  size = args.model_size
  default_p, default_l = UPDATE_SHAPES[size]
  p, length = args.prompt_len or default_p, args.response_len or default_l
  dtype = jnp.dtype(args.dtype)
  cfg = model_lib.ModelConfig(
    **MODEL_SIZES[size], architecture="qwen3", qk_norm=True, tie_word_embeddings=True,
    rope_theta=1e6, max_position_embeddings=max(4096, p + length),
  )  # fmt: skip
  device = jax.devices()[0]
  mesh = sharding.make_mesh()
  b = args.batch or fitting_batch(cfg, p, length, device)
  print(
    f"model {size}: {cfg.num_params() / 1e6:.1f}M params (float32 master, {dtype.name} compute"
    f"{', remat' if args.remat else ''}) "
    f"on {jax.device_count()} x {device.device_kind}",
    flush=True,
  )

  # Update: halve the batch until it fits (each try compiles again).
  while True:
    failed = None
    try:
      step_s, compile_s, graphdef, params = time_update(cfg, dtype, mesh, b, p, length, args)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
      if not is_oom(e) or b == 1:
        raise
      failed = str(e).splitlines()[0][:160]
    if failed is None:
      break
    print(f"update: batch {b} does not fit ({failed}); trying batch {b // 2}", flush=True)
    b //= 2
    gc.collect()
  flops = 4 * forward_flops(cfg, b, p, length)  # student forward + backward (3x), base forward
  tflops = flops / step_s / 1e12
  peak = peak_tflops(args, device)
  update_tok_s = b * (p + length) / step_s
  print(
    f"update: batch {b} x ({p} + {length}) tokens, {args.num_forks} forks x {args.chunk_len}: "
    f"{step_s * 1e3:.1f} ms (median of {args.steps}; first call {compile_s:.1f} s), "
    f"{update_tok_s:,.0f} tokens/s, {tflops:.1f} TFLOP/s"
    + (f", MFU {tflops / peak:.1%} of {peak:g}" if peak else ""),
    flush=True,
  )
  gc.collect()  # the optimizer state and the base copy go before the rollout

  # Rollout: sampler.generate (prefill + decode, no EOS so every row runs the full length) with the
  # trained parameters.
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(1)
  db, dp, dl = args.decode_batch, args.decode_prompt_len, args.decode_tokens
  prompts = [list(rng.integers(1, cfg.vocab_size, dp)) for _ in range(db)]
  gen = lambda: sampler.generate(model, prompts, max_new_tokens=dl, seed=1)  # noqa: E731
  t0 = time.perf_counter()
  gen()
  gen_compile_s = time.perf_counter() - t0
  gen_s = statistics.median(timed(gen, max(2, args.steps // 2)))
  decode_tok_s = db * dl / gen_s
  print(
    f"rollout: batch {db}, prompt {dp}, {dl} new tokens: {gen_s * 1e3:.1f} ms "
    f"(first call {gen_compile_s:.1f} s), {decode_tok_s:,.0f} decode tokens/s (prefill included)",
    flush=True,
  )
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.1f} GiB", flush=True)
  mfu = f" mfu={tflops / peak:.4f}" if peak else ""
  print(
    f"update_tokens_per_s={update_tok_s:.0f} update_tflops={tflops:.2f}{mfu} "
    f"decode_tokens_per_s={decode_tok_s:.0f}",
    flush=True,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=5, help="timed update steps")
  parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny")
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay float32)")
  parser.add_argument("--batch", type=int, default=0, help="update rows (0: what fits)")
  parser.add_argument("--prompt-len", type=int, default=0, help="update P (0: per model size)")
  parser.add_argument("--response-len", type=int, default=0, help="update L (0: per model size)")
  parser.add_argument(
    "--remat", action="store_true", help="per-layer rematerialisation (config.model.remat)"
  )
  parser.add_argument("--chunk-len", type=int, default=50, help="C")
  parser.add_argument("--num-forks", type=int, default=10, help="M")
  parser.add_argument("--decode-batch", type=int, default=32)
  parser.add_argument("--decode-prompt-len", type=int, default=128)
  parser.add_argument("--decode-tokens", type=int, default=256)
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="0: from the device kind")
  args = parser.parse_args()
  if args.model_size == "tiny":
    args.chunk_len, args.num_forks = min(args.chunk_len, 8), min(args.num_forks, 4)
    args.decode_batch, args.decode_prompt_len = min(args.decode_batch, 8), 16
    args.decode_tokens = min(args.decode_tokens, 32)
  return mfu_bench(args)


if __name__ == "__main__":
  main()
