"""How well OmniOPD's signal tells right from wrong on real forks of the demo student (issue 17).

  python -m omniopd_jax.experiments.signal_quality --workdir=/tmp/sq                # :demo, 4 steps
  python -m omniopd_jax.experiments.signal_quality --workdir=/tmp/sq --quick        # smoke plumbing

Runs the :demo config's real collection (bundled student base, its teacher served over HTTP,
peak-entropy forks, N teacher continuations each) for a few batches of training prompts, then
scores the same chunks and samples with several signals: phi (MiniLM with floors 0 / 0.8 / 0.9 /
0.95, edit, exact) x token credit (none / prefix / decision), each through the Dirichlet posterior
and centred over the batch as the update centres it. Chain sums have one gold worked solution,
so every response token gets a label: `right` (the response so far is a prefix of the gold),
`wrong` (the first token that leaves the gold: where the student decided wrongly) or `after`
(a token after that: it follows from the error, neither right nor wrong by itself).

Printed per signal, over the audited chunks that start on the gold (`chunks`; `off_gold_chunks`
start after an earlier error and are not judged): chunk AUC (chunk pi_hat, right chunks vs chunks
holding a wrong token), token AUC (each token's centred weight, right vs wrong tokens), the
fractions of wrong tokens pushed down and right tokens pushed up, and `forced_mass`: the share of
the weight mass on tokens after the chunk's own wrong token (credit for or against what the error
forced). Writes <workdir>/signal_quality.json.
"""

import json
import os

import numpy as np
from absl import app, flags

from omniopd_jax.reward import posterior
from omniopd_jax.reward import similarity as scoring

FLAGS = flags.FLAGS

FLOORS = (0.0, 0.8, 0.9, 0.95)
CREDITS = posterior.TOKEN_CREDITS
RIGHT, WRONG, AFTER = 0, 1, 2


def token_labels(tokenizer, tokens, mask, gold: str) -> np.ndarray:
  """[L] RIGHT / WRONG / AFTER per response token against the gold solution text (EOS and
  padding read as RIGHT while the text so far is still a prefix of the gold)."""
  labels = np.full(len(tokens), AFTER, np.int8)
  n = int(np.sum(mask))
  for p in range(n):
    text = tokenizer.decode(tokens[: p + 1], skip_special_tokens=True)
    if not gold.startswith(text):
      labels[p] = WRONG
      break
    labels[p] = RIGHT
  else:
    labels[n:] = RIGHT
  return labels


def auc(scores, positive) -> float:
  """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
  scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
  pos, neg = positive.sum(), (~positive).sum()
  if not pos or not neg:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  for f, c in zip(first, counts):  # average rank of each tie group (1-based)
    ranks[order[f : f + c]] = f + (c + 1) / 2.0
  return float((ranks[positive].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def share(flags) -> float:
  """Fraction of True in `flags`, NaN when there are none."""
  return float(np.mean(flags)) if np.size(flags) else float("nan")


def floored(sim, floor: float):
  return sim if not floor else np.maximum(0.0, (sim - floor) / (1.0 - floor))


def centred_token_weights(rewards: posterior.RewardArrays, chunk_len: int) -> np.ndarray:
  """[B, M, C] what the centred loss puts on each chunk token (0 where nothing speaks for it):
  the host twin of methods.omniopd.center_fork_weights."""
  mask = np.broadcast_to(rewards.mask[..., None], rewards.mask.shape + (chunk_len,))
  weight = np.broadcast_to(rewards.weight[..., None], mask.shape)
  if rewards.token_weight is not None:
    mask, weight = mask & rewards.token_mask, rewards.token_weight
  mean = weight[mask].mean() if mask.any() else 0.0
  return np.where(mask, weight - mean, 0.0)


def collect_forks(rt, state, step: int):
  """One real collection; returns the in-flight step (forks, rollouts, requests) and the teacher
  texts (clipped as the scorer sees them)."""
  from flax import nnx

  from omniopd_jax.methods import omniopd

  model = nnx.merge(rt.graphdef, state.params)
  batch = next(rt.data)
  inflight = rt.method.collect(rt.ctx, model, batch, step).__self__
  inflight.finish()  # the run's own scoring (and its checks); the futures stay readable
  clip = omniopd.clip_fn(rt.ctx)
  texts = [clip([s.text if s.ok else None for s in f.result()]) for f in inflight.futures]
  return inflight, batch["examples"], texts


def step_records(rt, inflight, examples, teacher_texts, raw_sims) -> dict:
  """Per signal: the chunk pi_hat / chunk labels and the token weights / labels of one step."""
  from omniopd_jax.data import tasks

  o, req, roll = rt.config.omniopd, inflight.req, inflight.roll
  labels = np.stack([
    token_labels(rt.ctx.tokenizer, roll.tokens[b], roll.mask[b], tasks.worked_solution(ex))
    for b, ex in enumerate(examples)
  ])  # [B, L]  # fmt: skip
  idx = inflight.starts[..., None] + np.arange(o.chunk_len)  # [B, M, C]
  chunk_labels = np.take_along_axis(labels[:, None, :], idx, axis=2)  # [B, M, C]
  pi_bar = posterior.chunk_pi_bar(roll.logprobs, inflight.starts, inflight.valid, o.chunk_len)
  diverge = req.scatter(inflight._divergence(teacher_texts), fill_value=0)
  out = {}
  for name, sim in raw_sims.items():
    for credit in CREDITS:
      rewards = posterior.build_reward_arrays(
        req.scatter(sim), pi_bar, alpha=o.alpha, form="centered", use_prior=o.use_prior,
        token_credit=credit, diverge=diverge if credit != "none" else None, chunk_len=o.chunk_len,
      )  # fmt: skip
      out[f"{name}/{credit}"] = dict(
        audited=rewards.mask, chunk_pi_hat=rewards.pi_hat, labels=chunk_labels,
        weights=centred_token_weights(rewards, o.chunk_len),
      )  # fmt: skip
  return out


def summarize(records: list[dict]) -> dict:
  """Pools the steps' records per signal into the printed figures."""
  out = {}
  for name in records[0]:
    cat = {k: np.concatenate([r[name][k].reshape(-1, *r[name][k].shape[2:]) for r in records])
           for k in ("audited", "chunk_pi_hat", "labels", "weights")}  # fmt: skip
    audited, labels, weights = cat["audited"], cat["labels"], cat["weights"]  # [F], [F, C] x2
    starts_right = labels[:, 0] != AFTER  # the chunk starts on the gold: it can be judged
    decidable = audited & starts_right
    chunk_wrong = (labels == WRONG).any(axis=1)
    tok = decidable[:, None] & (labels != AFTER)
    mass = np.abs(weights[decidable])  # [F_d, C]
    out[name] = dict(
      chunks=int(decidable.sum()),
      wrong_chunks=int((decidable & chunk_wrong).sum()),
      off_gold_chunks=int((audited & ~starts_right).sum()),
      chunk_auc=auc(cat["chunk_pi_hat"][decidable], ~chunk_wrong[decidable]),
      token_auc=auc(weights[tok], labels[tok] == RIGHT),
      wrong_pushed_down=share(weights[tok & (labels == WRONG)] < 0),
      right_pushed_up=share(weights[tok & (labels == RIGHT)] > 0),
      forced_mass=float(mass[labels[decidable] == AFTER].sum() / max(mass.sum(), 1e-12)),
    )
  return out


def measure(config, workdir: str, steps: int) -> dict:
  from omniopd_jax.train import setup as setup_lib

  rt, state = setup_lib.setup(config, workdir)
  try:
    raw = scoring.make_scorer({**config.scoring.to_dict(), "phi_floor": 0.0})
    others = {phi: scoring.make_scorer({"phi": phi}) for phi in ("edit", "exact")}
    records = []
    for step in range(steps):
      inflight, examples, texts = collect_forks(rt, state, step)
      student = inflight.student_texts
      emb = raw.score(student, texts)
      sims = {f"{config.scoring.phi}@{f:g}": floored(emb, f) for f in FLOORS}
      sims.update({phi: s.score(student, texts) for phi, s in others.items()})
      records.append(step_records(rt, inflight, examples, texts, sims))
      print(f"step {step + 1}/{steps}: {len(inflight.req)} forks", flush=True)
  finally:
    rt.close()
  return summarize(records)


def report(results: dict) -> str:
  keys = ("chunks", "wrong_chunks", "off_gold_chunks", "chunk_auc", "token_auc",
          "wrong_pushed_down", "right_pushed_up", "forced_mass")  # fmt: skip
  lines = ["| signal | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, row in results.items():
    cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  from omniopd_jax.configs import math as math_config
  from omniopd_jax.train import loop as train

  train.setup_logging()
  config = math_config.get_config("smoke" if FLAGS.quick else "demo")
  config.unlock()
  if FLAGS.quick:
    config.scoring.phi = "edit"  # no encoder needed for plumbing
  results = measure(config, FLAGS.workdir, 1 if FLAGS.quick else FLAGS.steps)
  with open(os.path.join(FLAGS.workdir, "signal_quality.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(report(results), flush=True)


if __name__ == "__main__":
  # Defined here, not at import: experiments.compare defines flags of the same names.
  flags.DEFINE_string("workdir", None, "Where the models, the run's logs and the JSON go.")
  flags.DEFINE_integer("steps", 4, "Batches of training prompts to collect.")
  flags.DEFINE_bool("quick", False, "Plumbing check: :smoke's untrained tiny models, 1 step.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
