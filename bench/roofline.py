"""What the matmuls themselves allow on this machine: XLA against torch, same shapes, same run.

  python bench/roofline.py

The sampler and the encoder are matmul-bound on CPU, so their ratios against PyTorch cannot exceed
the ratio of the two frameworks' matmuls on the shapes they run:

- decode (batch 8) streams every weight once per step: `stream_gb_s` times a chain of 30
  [8, K] x [K, N] matmuls over distinct weights (too big for the caches) and reports the bytes
  of weights read per second;
- the encoder's feed-forward layers are large matmuls: `gemm_gflops` reports GFLOP/s.

`bench/sampler.py` and `bench/scoring.py` print these next to their own ratios.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch


def _best(fn, reps: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def stream_gb_s(k: int = 576, n: int = 3072, m: int = 8, layers: int = 30, reps: int = 5):
  """(XLA, torch) GB/s of fp32 weights read by a chain of small-batch matmuls."""
  rng = np.random.default_rng(0)
  weights = [rng.standard_normal((k, n), np.float32) * 0.02 for _ in range(layers)]
  x = rng.standard_normal((m, k), np.float32)
  nbytes = sum(w.nbytes for w in weights)

  def chain(x, ws, tanh, mean):
    for w in ws:  # every output column feeds the next step, so no matmul can be pruned
      x = x + 0.01 * mean(tanh(x @ w))
    return x

  jx = jax.jit(lambda x, ws: chain(x, ws, jnp.tanh, lambda y: y.mean(axis=1, keepdims=True)))
  jw, jxv = [jnp.asarray(w) for w in weights], jnp.asarray(x)
  xla = _best(lambda: jx(jxv, jw).block_until_ready(), reps)
  tw, txv = [torch.from_numpy(w) for w in weights], torch.from_numpy(x)
  with torch.no_grad():
    ref = _best(lambda: chain(txv, tw, torch.tanh, lambda y: y.mean(dim=1, keepdim=True)), reps)
  return nbytes / xla / 1e9, nbytes / ref / 1e9


def gemm_gflops(m: int = 4096, k: int = 384, n: int = 1536, reps: int = 10):
  """(XLA, torch) GFLOP/s of one fp32 [m, k] x [k, n] matmul."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  f = jax.jit(jnp.matmul)
  xla = _best(lambda: f(ja, jb).block_until_ready(), reps)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  ref = _best(lambda: torch.matmul(ta, tb), reps)
  flops = 2.0 * m * k * n
  return flops / xla / 1e9, flops / ref / 1e9


def main():
  print(f"# jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), float32")  # fmt: skip
  for k, n in ((576, 3072), (1536, 576), (576, 49152)):
    layers = 30 if n < 10000 else 3
    xla, ref = stream_gb_s(k, n, layers=layers)
    print(f"decode [8,{k}]x[{k},{n}] x{layers}: XLA {xla:5.1f} GB/s  torch {ref:5.1f} GB/s  "
          f"ratio {xla / ref:.2f}")  # fmt: skip
  for k, n in ((384, 1536), (1536, 384)):
    xla, ref = gemm_gflops(4096, k, n)
    print(f"encoder [4096,{k}]x[{k},{n}]: XLA {xla:6.1f} GFLOP/s  torch {ref:6.1f} GFLOP/s  "
          f"ratio {xla / ref:.2f}")  # fmt: skip


if __name__ == "__main__":
  main()
