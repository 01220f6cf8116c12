"""Decode throughput of omniopd_jax.sampler against transformers' greedy `generate` (PyTorch), same
weights, batch, prompt lengths and number of new tokens, measured interleaved in one process.

  python bench/sampler.py --quick          # SmolLM2-135M, batch 8, < 1 min; last line is the ratio
  python bench/sampler.py                  # SmolLM2-135M and a tiny model, batch 1 / 8 / 32
  python bench/sampler.py --model-size 0.5b --batches 8 32   # random 0.5B Qwen3 (for GPU figures)

Picks the GPU when both JAX and torch see one. The last line is always
`sampler_vs_transformers_ratio=<x>` for batch 8 on the first model benchmarked.
"""

import argparse
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import roofline  # noqa: E402  (bench/roofline.py, beside this script)
import torch  # noqa: E402
import transformers  # noqa: E402

from omniopd_jax.models import hf  # noqa: E402
from omniopd_jax.rollout import sampler  # noqa: E402

# The same converted copy the tests use (tests/conftest.py), so it is converted once per checkout.
SMOLLM2_DIR = os.path.join(
  os.environ.get("OMNIOPD_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache")),
  "smollm2-135m-instruct",
)
FORMS = [
  "What is {a} + {b}?",
  "Compute {a} * {b}.",
  "Solve x + {a} = {b}.",
  "What is {a} - {b}?",
  "Is {a} a prime number?",
  "Find {a}% of {b}.",
  "Sam has {a} coins and finds {b}. Total?",
  "Divide {a} by {b}.",
]
# Random-weight configs (transformers config kwargs): SmolLM2-135M's shape, a tiny Llama (the
# perf_anchors one) and a 0.5B-class Qwen3 (Qwen3-0.6B's shape) for GPU figures.
RANDOM_CONFIGS = {
  "135m": dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
  ),
  "tiny": dict(
    model_type="llama",
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
  ),
  "0.5b": dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
  ),
}


def smollm2_dir() -> str | None:
  """SmolLM2-135M-Instruct as an HF directory (converted once from the GGUF), or None."""
  if os.path.exists(os.path.join(SMOLLM2_DIR, "config.json")):
    return SMOLLM2_DIR
  try:
    from omniopd_jax.tools import import_gguf

    gguf = import_gguf.default_gguf_path()
  except (ImportError, FileNotFoundError) as e:
    print(f"# SmolLM2 GGUF unavailable ({e}); using a random model with its config")
    return None
  t = time.perf_counter()
  import_gguf.convert(gguf, SMOLLM2_DIR)
  print(f"# converted {gguf} -> {SMOLLM2_DIR} in {time.perf_counter() - t:.1f}s")
  return SMOLLM2_DIR


def random_dir(size: str) -> str:
  kwargs = dict(RANDOM_CONFIGS[size])
  config = transformers.AutoConfig.for_model(
    kwargs.pop("model_type"), max_position_embeddings=4096, pad_token_id=0, **kwargs
  )
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  path = tempfile.mkdtemp(prefix=f"bench_sampler_{size}_")
  model.save_pretrained(path)
  return path


def make_prompts(tokenizer, vocab_size: int, n: int) -> list[list[int]]:
  """n prompts: SmolLM2 chat prompts (38-46 tokens), or random ids with the same lengths."""
  rng = random.Random(0)
  texts = [
    FORMS[i % len(FORMS)].format(a=rng.randint(2, 999), b=rng.randint(2, 999)) for i in range(n)
  ]
  if tokenizer is not None:
    return [
      list(
        tokenizer.apply_chat_template(
          [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
      )
      for t in texts
    ]
  lengths = [38 + (7 * i) % 9 for i in range(n)]
  ids = np.random.default_rng(0)
  return [ids.integers(3, vocab_size, size=k).tolist() for k in lengths]


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class ExtraRss:
  """Peak resident memory above the starting level while the block runs (CPU; sampled at 200 Hz)."""

  def __enter__(self):
    self.base, self.peak, self.running = rss_gb(), 0.0, True
    self.thread = threading.Thread(target=self._watch, daemon=True)
    self.thread.start()
    return self

  def _watch(self):
    while self.running:
      self.peak = max(self.peak, rss_gb() - self.base)
      time.sleep(0.005)

  def __exit__(self, *exc):
    self.running = False
    self.thread.join()
    self.peak = max(self.peak, rss_gb() - self.base)


def bench_model(name, path, args, use_gpu):
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  device = "cuda" if use_gpu else "cpu"
  rss0 = peak_rss_gb()
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
  torch_model.eval()
  torch_model.generation_config.eos_token_id = None  # every row makes exactly L tokens
  ours, tokenizer = hf.load_pretrained(path, dtype=args.dtype)
  vocab = ours.config.vocab_size
  if tokenizer is not None and name != "smollm2":
    tokenizer = None
  results = {}
  for batch in args.batches:
    prompts = make_prompts(tokenizer, vocab, batch)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    new = args.new_tokens

    def run_torch(ids=ids, mask=mask, new=new):
      with torch.no_grad():
        out = torch_model.generate(
          input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0
        )
      if use_gpu:
        torch.cuda.synchronize()
      return out[:, ids.shape[1] :].cpu().numpy()

    def run_ours(prompts=prompts, new=new):
      return sampler.generate(
        ours, prompts, max_new_tokens=new, temperature=0.0, engine=args.engine
      ).tokens

    def timed(fn):
      t = time.perf_counter()
      out = fn()
      return time.perf_counter() - t, out

    # Warm-up: torch needs no compilation (a 4-token call warms its kernels and allocator); ours
    # compiles on its first call, timed separately.
    run_torch(new=4)
    compile_before = CompileClock.seconds
    with ExtraRss() as first_rss:
      timed(run_ours)
    compile_s = CompileClock.seconds - compile_before
    # Peak memory: on GPU each framework's peak device bytes (weights included); on CPU the peak
    # resident memory a call adds on top of the loaded weights (compilation included for ours).
    if use_gpu:
      torch.cuda.reset_peak_memory_stats()
    # (Ours keeps its buffers after the first call, so that call's growth counts too.)
    times, outputs, extra = {"torch": [], "ours": []}, {}, {"torch": 0.0, "ours": first_rss.peak}
    for trial in range(args.trials):  # interleaved, alternating order: the machine is shared
      order = ("torch", "ours") if trial % 2 == 0 else ("ours", "torch")
      for side in order:
        with ExtraRss() as rss:
          dt, outputs[side] = timed(run_torch if side == "torch" else run_ours)
        times[side].append(dt)
        extra[side] = max(extra[side], rss.peak)
    torch_mem = torch.cuda.max_memory_allocated() / 2**30 if use_gpu else extra["torch"]
    ours_mem = _jax_peak_gb() if use_gpu else extra["ours"]
    ref, got = outputs["torch"], outputs["ours"]
    t_torch, t_ours = statistics.median(times["torch"]), statistics.median(times["ours"])
    tps_torch, tps_ours = batch * new / t_torch, batch * new / t_ours
    same_rows = int((ref == got).all(axis=1).sum())
    agree = np.cumprod(ref == got, axis=1).sum() / ref.size  # tokens before the first divergence
    print(
      f"{name:8s} B={batch:<3d} L={new:<4d} prompt<={width:<4d} "
      f"ours {tps_ours:8.1f} tok/s  transformers {tps_torch:8.1f} tok/s  "
      f"ratio {tps_ours / tps_torch:5.2f}  compile {compile_s:5.1f}s  "
      f"peak mem{' (GPU)' if use_gpu else ' (+RSS)'} ours {ours_mem:5.2f} GB / "
      f"transformers {torch_mem:5.2f} GB  "
      f"greedy match {same_rows}/{batch} rows ({agree:.1%} tokens)  "
      f"[ours {min(times['ours']):.2f}-{max(times['ours']):.2f}s, "
      f"torch {min(times['torch']):.2f}-{max(times['torch']):.2f}s]",
      flush=True,
    )
    results[batch] = tps_ours / tps_torch
  print(f"# {name}: process peak RSS {peak_rss_gb():.2f} GB (was {rss0:.2f} GB before loading)")
  return results


class CompileClock:
  """Seconds JAX spends tracing, lowering and compiling (its own monitoring events)."""

  seconds = 0.0

  @classmethod
  def install(cls):
    def listen(name, duration, **_):
      if name.startswith("/jax/core/compile/"):
        cls.seconds += duration

    jax.monitoring.register_event_duration_secs_listener(listen)


def _jax_peak_gb() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="SmolLM2, batch 8, 2 trials, < 1 min")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--trials", type=int, default=3, help="timed runs per side, interleaved")
  parser.add_argument(
    "--model-size",
    choices=["smollm2", "135m", "tiny", "0.5b"],
    nargs="+",
    default=["smollm2", "tiny"],
    help="smollm2: the real SmolLM2-135M-Instruct (random 135m weights if unavailable)",
  )
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--engine", choices=sampler.ENGINES, default="continuous")
  args = parser.parse_args(argv)
  CompileClock.install()
  if args.quick:
    args.batches, args.trials, args.model_size = [8], 2, ["smollm2"]
    args.new_tokens = min(args.new_tokens, 96)  # keeps --quick under a minute
  use_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  print(
    f"# jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on "
    f"{'cuda' if use_gpu else 'cpu'} ({torch.get_num_threads()} threads), {args.dtype}, greedy, "
    f"{args.engine} engine"
  )
  first = None
  for size in args.model_size:
    path = smollm2_dir() if size == "smollm2" else None
    name = "smollm2" if path else ("135m-rand" if size == "smollm2" else f"{size}-rand")
    path = path or random_dir("135m" if size == "smollm2" else size)
    results = bench_model(name, path, args, use_gpu)
    first = first or results
  ratio = first.get(8, next(iter(first.values())))
  if not use_gpu:
    xla, ref = roofline.stream_gb_s(576, 3072, reps=3)
    print(
      f"# ceiling (bench/roofline.py): batch-8 matmuls stream fp32 weights at {xla:.1f} GB/s in "
      f"XLA vs {ref:.1f} GB/s in torch (x{xla / ref:.2f}); decode reads every weight each step"
    )
  print(f"sampler_vs_transformers_ratio={ratio:.2f}")


if __name__ == "__main__":
  sys.exit(main())
