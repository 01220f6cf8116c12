"""Benchmark of one OmniOPD training step: the loop's wall time split and its overlap efficiency on
:smoke models behind a slow teacher (default), or update-step MFU and decode tokens/s (`--mfu`).

  python bench/step.py --quick                       # ~1-2 min CPU; last line overlap_efficiency=<x>
  python bench/step.py --latency-ms 200 --steps 8    # on-policy and one_step_off, 8 timed steps each
  python bench/step.py --mfu --model-size tiny       # CPU check of the MFU path (under a minute)
  python bench/step.py --mfu --model-size 0.5b       # GPU: random Qwen3-0.6B-shaped model, bf16

Default mode: our `serve` runs the :smoke teacher, behind a proxy (a subprocess of this script) that
sleeps `--latency-ms` before forwarding each POST; teacher and trainer get disjoint CPU halves (as
if the teacher were another machine; `--no-pin` shares them). `train.run` trains :smoke against
the proxy, on-policy and with `one_step_off`. Per mode it prints the medians of rollout / teacher
span / teacher wait / scoring / update, the mean step period, the overlap efficiency
max(device, teacher span) / step (device = rollout + update; teacher span = submission to last
result, collect's `teacher_span`), which exceeds 1 when consecutive steps' teacher spans overlap,
and the step period against the loop's dependency bound (see `summarize`).

`--mfu` imports only model, train_step, sampler (and their jax/flax/optax dependencies), so it runs
where ml_collections, grain or tensorboardX are not installed.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
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

# Random-weight architectures for --mfu (ModelConfig fields).
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


def mean_period(rows) -> float:
  """Seconds per step over the timed steps (a mean: in one_step_off consecutive periods alternate
  long and short, and their median is not the throughput)."""
  periods = [r["period_s"] for r in rows if "period_s" in r]
  if os.environ.get("BENCH_STEP_DEBUG"):
    print("periods (ms):", [round(x * 1e3) for x in periods], flush=True)
  return sum(periods) / len(periods) if periods else float("nan")


def median(rows, key: str) -> float:
  values = [r[key] for r in rows if key in r]
  return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------
# Latency proxy (runs as `python bench/step.py --proxy --upstream URL`)


def run_proxy(upstream: str, latency_s: float):
  """Forward every request to `upstream`, sleeping `latency_s` first on POSTs; prints PORT=."""
  import asyncio

  import aiohttp
  from aiohttp import web

  async def main():
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def forward(request: web.Request) -> web.Response:
      body = await request.read()
      if request.method == "POST":
        await asyncio.sleep(latency_s)  # the remote teacher's network and queueing delay
      headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type",)}
      async with session.request(
        request.method, upstream + request.path_qs, data=body, headers=headers
      ) as resp:
        payload = await resp.read()
        return web.Response(
          body=payload, status=resp.status, content_type=resp.content_type or "application/json"
        )

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"PORT={port}", flush=True)
    # Exit with the parent: stdin closes when the benchmark process goes away.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await session.close()
    await runner.cleanup()

  asyncio.run(main())


def start_proxy(upstream_root: str, latency_ms: float):
  import subprocess

  proc = subprocess.Popen(
    [sys.executable, os.path.abspath(__file__), "--proxy", "--upstream", upstream_root,
     "--latency-ms", str(latency_ms)],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
  )  # fmt: skip
  line = proc.stdout.readline().strip()
  if not line.startswith("PORT="):
    proc.kill()
    raise RuntimeError(f"latency proxy did not start (said {line!r})")
  return proc, f"http://127.0.0.1:{line[5:]}/v1"


# ------------------------------------------------------------------------------------------------
# Default mode: the training loop on :smoke models behind a slow teacher


def run_mode(args, root: str, teacher_url: str, one_step_off: bool) -> list[dict]:
  """train.run on :smoke for warmup + steps + 1 steps; the rows of the `steps` timed ones (not the
  warm-up, not the last), each with its step period added."""
  import json

  from omniopd_jax.configs import math as math_config
  from omniopd_jax.train import loop as train
  from omniopd_jax.train import metrics

  config = math_config.get_config("smoke")
  config.num_steps = args.warmup + args.steps + 1  # the last step has no next one to overlap
  config.one_step_off = one_step_off
  config.teacher.base_url = teacher_url
  config.checkpoint_every = 10**6  # only the final save, after the timed steps
  config.log_every = 10**6  # one progress line at the end
  config.eval.num_examples = 0  # no evaluation before/after
  config.batch_size = args.batch_size
  if args.max_new_tokens:
    config.rollout.max_new_tokens = args.max_new_tokens
  workdir = tempfile.mkdtemp(prefix="on_policy_" if not one_step_off else "one_step_off_", dir=root)
  os.symlink(os.path.join(root, "models"), os.path.join(workdir, "models"))

  # The step period is the time between consecutive steps reaching their metrics (finish_step);
  # the loop's own time/step_s spans more than one period in one_step_off mode.
  pushed: dict[int, float] = {}
  original = metrics.MetricsWriter.push

  def push(self, step, device_metrics, host_metrics):
    pushed[step] = time.perf_counter()
    return original(self, step, device_metrics, host_metrics)

  metrics.MetricsWriter.push = push
  try:
    train.run(config, workdir)
  finally:
    metrics.MetricsWriter.push = original
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "time/rollout_s" in r]
  for r in rows:
    if r["step"] - 1 in pushed:
      r["period_s"] = pushed[r["step"]] - pushed[r["step"] - 1]
  return [r for r in rows if args.warmup < r["step"] < config.num_steps]


def summarize(name: str, rows: list[dict], device_s: float, stale: int) -> float:
  """Prints the medians of one mode; returns its overlap efficiency.

  overlap efficiency = max(device, teacher span) / step period, device = rollout + update.
  It exceeds 1 when the teacher spans of consecutive steps overlap (one_step_off keeps two steps
  of requests in flight). The loop's dependencies give a tighter bound: with samples `stale`
  updates old, rollout -> teacher -> scoring -> update of one step spans stale + 1 periods, so
  period >= max(device, (device + span + scoring) / (stale + 1)); `of the bound` compares to it.
  """
  rollout, span = median(rows, "time/rollout_s"), median(rows, "time/teacher_span_s")
  wait, scoring = median(rows, "time/teacher_wait_s"), median(rows, "time/scoring_s")
  update, period = median(rows, "time/update_s"), mean_period(rows)
  efficiency = max(device_s, span) / period
  bound = max(device_s, (device_s + span + scoring) / (stale + 1))
  print(
    f"{name:>13}: step {period * 1e3:6.1f} ms | rollout {rollout * 1e3:5.1f} | update "
    f"{update * 1e3:5.1f} | teacher span {span * 1e3:5.1f} (wait {wait * 1e3:5.1f}) | scoring "
    f"{scoring * 1e3:4.1f} || device {device_s * 1e3:5.1f} | overlap efficiency "
    f"{efficiency:.3f} | bound {bound * 1e3:5.1f} ms: {bound / period:.0%} of the bound",
    flush=True,
  )
  return efficiency


@contextlib.contextmanager
def cpus(which: set[int] | None):
  """Run the body (e.g. a subprocess start: the child inherits it) on `which` CPUs, then return."""
  if not which:
    yield
    return
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, which)
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)


def overlap_bench(args):
  # Teacher (server and proxy) and trainer on disjoint CPU halves, as if the teacher were another
  # machine: on a few shared cores its generation would otherwise slow the update it overlaps.
  # Set before JAX starts, so that every thread the trainer creates inherits its half.
  available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  teacher_cpus = None
  if args.pin and len(available) >= 2:
    half = len(available) // 2
    teacher_cpus = set(available[half:])
    os.sched_setaffinity(0, set(available[:half]))

  import io

  import jax

  from omniopd_jax.configs import math as math_config
  from omniopd_jax.experiments import demo_models
  from omniopd_jax.teacher import server as serve
  from omniopd_jax.train import loop as train

  train.setup_logging()
  root = args.workdir or tempfile.mkdtemp(prefix="omniopd_bench_step_")
  os.makedirs(root, exist_ok=True)
  # The second mode (and a rerun in the same --workdir) reuses the first one's compiled programs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  _, teacher_dir = demo_models.build(root, math_config.get_config("smoke"), log=lambda m: None)
  with cpus(teacher_cpus):
    log_path = os.path.join(root, "teacher_server.log")
    server = serve.start_subprocess(teacher_dir, log_path=log_path)
    proxy, url = start_proxy(server.root, args.latency_ms)
  where = f"CPUs {sorted(teacher_cpus)} (trainer: the others)" if teacher_cpus else "shared CPUs"
  print(
    f"teacher: serve on the :smoke teacher behind +{args.latency_ms:g} ms per request, on {where}; "
    f"{args.warmup} warm-up + {args.steps} timed steps per mode, batch {args.batch_size}; "
    f"workdir {root}",
    flush=True,
  )
  results = {}
  try:
    for name, off in (("on_policy", False), ("one_step_off", True)):
      log = io.StringIO()
      with contextlib.redirect_stdout(log):  # the loop's own progress lines
        results[name] = run_mode(args, root, url, off)
  finally:
    proxy.stdin.close()
    proxy.wait(timeout=10)
    server.stop()
  # Device time from the on-policy run for both modes (same programs, same shapes): in
  # one_step_off the update is asynchronous (its time/update_s spans the host work it overlaps)
  # and the rollout first waits for the previous update.
  on = results["on_policy"]
  device_s = median(on, "time/rollout_s") + median(on, "time/update_s")
  summarize("on_policy", on, device_s, stale=0)
  efficiency = summarize("one_step_off", results["one_step_off"], device_s, stale=1)
  speedup = mean_period(on) / mean_period(results["one_step_off"])
  print(
    f"one_step_off steps {speedup:.2f}x faster. On-policy cannot overlap: rollout -> teacher -> "
    "scoring -> update are serial within a step and the next rollout needs this update. "
    "one_step_off samples step t+1 and submits its teacher requests before waiting for step t's, "
    "so two steps of teacher requests are in flight and update t runs under them.",
    flush=True,
  )
  print(f"overlap_efficiency={efficiency:.3f}", flush=True)


# ------------------------------------------------------------------------------------------------
# --mfu: the jitted OmniOPD update and the sampler on a randomly initialised model


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
  batch = {
    "tokens": tokens,
    "attention_mask": np.ones((b, p + length), bool),
    "response_tokens": tokens[:, p:],
    "response_mask": np.ones((b, length), bool),
    "fork_starts": np.broadcast_to(starts, (b, forks)).astype(np.int32),  # [B, M]
    "fork_mask": np.ones((b, forks), bool),  # [B, M]
    "fork_weight": rng.uniform(-1, 1, (b, forks)).astype(np.float32),  # [B, M]
  }
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
  parser.add_argument("--quick", action="store_true", help="fewer steps (~1-2 min on CPU)")
  parser.add_argument("--latency-ms", type=float, default=200.0, help="added per teacher request")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per mode")
  parser.add_argument("--warmup", type=int, default=2, help="discarded (compile) steps per mode")
  parser.add_argument("--batch-size", type=int, default=8, help="prompts per step (:smoke: 8)")
  parser.add_argument("--max-new-tokens", type=int, default=0, help="0: :smoke's 32")
  parser.add_argument(
    "--no-pin", dest="pin", action="store_false", help="teacher and trainer share all CPUs"
  )
  parser.add_argument("--workdir", default="", help="default: a fresh temporary directory")
  parser.add_argument("--mfu", action="store_true", help="update MFU and decode tokens/s")
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
  parser.add_argument("--proxy", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.proxy:
    return run_proxy(args.upstream, args.latency_ms / 1e3)
  if args.mfu:
    if args.model_size == "tiny":
      args.chunk_len, args.num_forks = min(args.chunk_len, 8), min(args.num_forks, 4)
      args.decode_batch, args.decode_prompt_len = min(args.decode_batch, 8), 16
      args.decode_tokens = min(args.decode_tokens, 32)
    args.steps = args.steps or 5
    return mfu_bench(args)
  args.steps = args.steps or (8 if args.quick else 16)
  return overlap_bench(args)


if __name__ == "__main__":
  main()
