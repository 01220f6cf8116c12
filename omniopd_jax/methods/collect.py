"""Per-step batch collection for each method: rollouts -> (forks -> teacher -> scores -> rewards)
-> the padded arrays the train step takes. Host side: numpy, strings and the teacher client.

Every batch has tokens/attention_mask [B, P + L] (prompt left-padded to P = config.max_prompt_len,
then the response), response_tokens/response_mask [B, L], plus the method's own fields.
"""

import concurrent.futures
import dataclasses
import hashlib
import time

import jax
import numpy as np

from omniopd_jax.data import grading, tasks
from omniopd_jax.methods import losses
from omniopd_jax.reward import posterior as reward
from omniopd_jax.rollout import chunks, forks, sampler
from omniopd_jax.teacher import backends as tb


@dataclasses.dataclass
class Collected:
  batch: dict[str, np.ndarray]  # arrays for train_step.update
  metrics: dict[str, float]  # host metrics of this step
  texts: list[dict]  # a few human-readable samples
  timings: dict[str, float]  # seconds: rollout, teacher_wait, scoring


def stable_seed(*parts) -> int:
  """A 31-bit seed from any values: the same inputs give the same seed in every process."""
  digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") & 0x7FFFFFFF


def left_truncate(prompts, max_len: int) -> tuple[list[list[int]], int]:
  """Prompts cut to their last `max_len` tokens, and how many were cut."""
  cut = sum(len(p) > max_len for p in prompts)
  return [list(p)[-max_len:] for p in prompts], cut


def pack(prompts, responses: np.ndarray, response_mask: np.ndarray, prompt_len: int) -> dict:
  """tokens/attention_mask [B, P + L] from ragged prompts and [B, L] responses."""
  b, length = responses.shape
  tokens = np.zeros((b, prompt_len + length), np.int32)
  mask = np.zeros((b, prompt_len + length), bool)
  for i, p in enumerate(prompts):
    tokens[i, prompt_len - len(p) : prompt_len] = p
    mask[i, prompt_len - len(p) : prompt_len] = True
  tokens[:, prompt_len:] = np.where(response_mask, responses, 0)
  mask[:, prompt_len:] = response_mask
  return {
    "tokens": tokens,
    "attention_mask": mask,
    "response_tokens": tokens[:, prompt_len:],
    "response_mask": response_mask.astype(bool),
  }


def rollout(model, prompts, config, *, seed: int, mesh, rules, eos_ids, num_samples=1):
  r = config.rollout
  return sampler.generate(
    model, prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
    top_k=r.top_k, seed=seed, eos_ids=eos_ids, num_samples=num_samples, mesh=mesh, rules=rules,
    prompt_len=config.max_prompt_len,  # one static shape per run (and across processes)
  )  # fmt: skip


def teacher_requests(config, req: chunks.ForkRequests, examples, backend: str, step: int):
  """One TeacherRequest per fork, shaped for the backend (raw prefix or chat prefill)."""
  o, t = config.omniopd, config.teacher
  out = []
  for i in range(len(req)):
    row, slot = int(req.row[i]), int(req.slot[i])
    common = dict(
      key=f"s{step}/r{row}/f{slot}",
      num_samples=o.num_teacher_samples,
      max_tokens=t.max_tokens or o.chunk_len,
      # From the prefix itself, not its batch position: the same fork gets the same teacher
      # samples whatever the batch layout (process count, order).
      seed=stable_seed(
        config.seed,
        step,
        hashlib.blake2b(np.asarray(req.prefix_ids[i], np.int64).tobytes()).hexdigest(),
      ),
    )
    if backend in ("openai_completions", "local"):
      if t.prompt_format == "token_ids":
        out.append(tb.TeacherRequest(prefix_token_ids=tuple(map(int, req.prefix_ids[i])), **common))
      else:
        out.append(tb.TeacherRequest(prefix_text=req.prefix_text[i], **common))
    else:  # chat APIs add their own roles: the problem is the user turn, the prefix a prefill
      question = examples[row]["question"]
      out.append(
        tb.TeacherRequest(problem=question, prefix_text=req.response_prefix_text[i], **common)
      )
  return out


def wait_and_score(futures, student_texts, scorer, num_samples: int, clip=None):
  """Scores completed requests in waves while later ones are still in flight.

  Returns (sim [n, N] with NaN for failed samples, teacher texts n x N (None = failed),
  failure reasons, seconds waiting, seconds scoring).
  """
  n = len(futures)
  sim = np.full((n, num_samples), np.nan, np.float32)
  texts: list[list[str | None]] = [[None] * num_samples for _ in range(n)]
  reasons: list[str] = []
  pending = {f: i for i, f in enumerate(futures)}
  wait_s = score_s = 0.0
  while pending:
    t0 = time.perf_counter()
    done, _ = concurrent.futures.wait(list(pending), return_when=concurrent.futures.FIRST_COMPLETED)
    # Take everything finished by now as one wave: one batched encode per wave.
    done = [f for f in pending if f.done()]
    wait_s += time.perf_counter() - t0
    idx = [pending.pop(f) for f in done]
    for i, f in zip(idx, done):
      samples = f.result()
      texts[i] = [s.text if s.ok else None for s in samples]
      if clip is not None:
        texts[i] = clip(texts[i])
      reasons += [s.error for s in samples if not s.ok]
    t0 = time.perf_counter()
    sim[idx] = scorer.score([student_texts[i] for i in idx], [texts[i] for i in idx])
    score_s += time.perf_counter() - t0
  return sim, texts, reasons, wait_s, score_s


def _uses_ids(ctx) -> bool:
  """Whether the teacher continues token ids (then after the moved whitespace), not text."""
  fmt = ctx.config.teacher.prompt_format
  return ctx.backend in ("openai_completions", "local") and fmt == "token_ids"


def _clip(ctx):
  """Texts -> the same texts cut to chunk_len student tokens (chunks.clip_to_tokens)."""
  return lambda texts: chunks.clip_to_tokens(ctx.tokenizer, texts, ctx.config.omniopd.chunk_len)


def collect_omniopd(ctx, model, batch, step: int):
  """Rollouts, peak-entropy forks and teacher submission now (device work done when this
  returns); the returned `finish()` waits for the teacher, scores and builds the batch."""
  config, o = ctx.config, ctx.config.omniopd
  prompts, _ = left_truncate(batch["prompt_ids"], config.max_prompt_len)
  t0 = time.perf_counter()
  roll = rollout(
    model, prompts, config, seed=stable_seed(config.seed, step, "rollout", ctx.process_index),
    mesh=ctx.rollout_mesh, rules=ctx.rules, eos_ids=ctx.eos_ids,
  )  # fmt: skip
  starts, valid = forks.select_forks(
    roll.entropy, roll.mask, num_forks=o.num_forks, chunk_len=o.chunk_len,
    method=o.fork_method, rng=jax.random.key(stable_seed(config.seed, step, "forks")),
  )  # fmt: skip
  fork_stats = jax.device_get(forks.fork_metrics(roll.entropy, roll.mask, starts, valid))
  starts, valid = np.asarray(starts), np.asarray(valid)
  rollout_s = time.perf_counter() - t0

  req, mismatches = chunks.build_fork_requests(
    ctx.tokenizer, prompts, roll.tokens, roll.mask, starts, valid, chunk_len=o.chunk_len
  )
  student_texts = _clip(ctx)(req.chunk_text_for_ids() if _uses_ids(ctx) else req.chunk_text)
  t_submit = time.perf_counter()
  futures = ctx.teacher.submit(teacher_requests(config, req, batch["examples"], ctx.backend, step))
  arrivals = [t_submit]  # teacher_span = last arrival - submission (callbacks fire on arrival)
  for f in futures:
    f.add_done_callback(lambda _: arrivals.append(time.perf_counter()))

  group = o.weight_form == "group"
  drafts = None
  if group and len(req):  # the student's K-1 other drafts, sampled while the teacher works
    t1 = time.perf_counter()
    drafts = sampler.draft_chunks(
      model, [list(map(int, p)) for p in req.prefix_ids], num_drafts=o.num_drafts - 1,
      chunk_len=o.chunk_len, seed=stable_seed(config.seed, step, "drafts"), eos_ids=ctx.eos_ids,
    )  # fmt: skip
    rollout_s += time.perf_counter() - t1

  return lambda: _finish_omniopd(
    ctx, step, prompts, roll, starts, valid, fork_stats, req, mismatches, student_texts, futures,
    drafts, rollout_s, arrivals,
  )  # fmt: skip


def _finish_omniopd(
  ctx,
  step,
  prompts,
  roll,
  starts,
  valid,
  fork_stats,
  req,
  mismatches,
  student_texts,
  futures,
  drafts,
  rollout_s,
  arrivals,
) -> Collected:
  """Host half of an OmniOPD step: wait for the teacher, score, posterior, pack."""
  config, o = ctx.config, ctx.config.omniopd
  group = o.weight_form == "group"
  num_n = o.num_teacher_samples
  sim, teacher_texts, reasons, wait_s, score_s = wait_and_score(
    futures, student_texts, ctx.scorer, num_n, clip=_clip(ctx)
  )
  pi_bar = reward.chunk_pi_bar(roll.logprobs, starts, valid, o.chunk_len)  # [B, M]
  if group:
    k = o.num_drafts
    sims = np.full((len(req), k, num_n), np.nan, np.float32)
    pis = np.zeros((len(req), k), np.float32)
    sims[:, 0] = sim
    pis[:, 0] = pi_bar[req.row, req.slot]
    if len(req):
      t1 = time.perf_counter()
      for j in range(1, k):
        texts_j = ctx.tokenizer.batch_decode(drafts.tokens[:, j - 1], skip_special_tokens=True)
        if not _uses_ids(ctx):  # drafts continue prefix_ids: put the moved whitespace back
          texts_j = _clip(ctx)([w + x for w, x in zip(req.moved_whitespace, texts_j)])
        sims[:, j] = ctx.scorer.score(texts_j, teacher_texts)
        pis[:, j] = reward.pi_bar_from_logprobs(drafts.logprobs[:, j - 1])
      score_s += time.perf_counter() - t1
    sim_bm, pi_bar_bm = req.scatter(sims), req.scatter(pis, fill_value=0.0)
  else:
    sim_bm, pi_bar_bm = req.scatter(sim), pi_bar
  # `centered` is finished on device (train_step.center_fork_weights), over the global batch.
  form = "pi_hat" if o.weight_form == "centered" else o.weight_form
  rewards = reward.build_reward_arrays(
    sim_bm, pi_bar_bm, alpha=o.alpha, form=form, use_prior=o.use_prior
  )

  out = pack(prompts, roll.tokens, roll.mask, config.max_prompt_len)
  out.update(
    fork_starts=starts.astype(np.int32), fork_mask=rewards.mask, fork_weight=rewards.weight
  )
  metrics = {
    **{k: float(v) for k, v in fork_stats.items()},
    **reward.reward_metrics(rewards, fork_valid=valid),
    "omniopd/forks_sent": float(len(req)),
    "omniopd/boundary_mismatches": float(mismatches),
    "omniopd/teacher_failures": float(len(reasons)),
    "rollout/response_len": float(roll.mask.sum(1).mean()),
  }
  texts = []
  for i in range(min(config.num_text_samples, len(req))):
    texts.append(
      {
        "prompt": ctx.tokenizer.decode(prompts[req.row[i]], skip_special_tokens=True),
        "response_prefix": req.response_prefix_text[i],
        "student_chunk": student_texts[i],
        "teacher_chunks": teacher_texts[i],
        "phi": [None if np.isnan(x) else round(float(x), 3) for x in sim[i]],
        "pi_hat": float(rewards.pi_hat[req.row[i], req.slot[i]]),
      }
    )
  if reasons:
    texts.append({"teacher_failure_example": reasons[0]})
  return Collected(
    out, metrics, texts, dict(rollout=rollout_s, teacher_wait=wait_s, scoring=score_s,
                              teacher_span=max(arrivals) - arrivals[0]),
  )  # fmt: skip


def grade_rows(tokenizer, tokens, mask, examples) -> np.ndarray:
  texts = tokenizer.batch_decode(
    np.where(mask, tokens, tokenizer.pad_token_id or 0), skip_special_tokens=True
  )
  return np.array([grading.grade(t, ex) for t, ex in zip(texts, examples)], np.float32)


def collect_grpo(ctx, model, batch, step: int):
  """G samples per prompt, verifiable rewards, group-normalised advantages."""
  config, g = ctx.config, ctx.config.grpo.group_size
  prompts, _ = left_truncate(batch["prompt_ids"], config.max_prompt_len)
  t0 = time.perf_counter()
  roll = rollout(
    model, prompts, config, seed=stable_seed(config.seed, step, "rollout", ctx.process_index),
    mesh=ctx.rollout_mesh, rules=ctx.rules, eos_ids=ctx.eos_ids, num_samples=g,
  )  # fmt: skip
  rollout_s = time.perf_counter() - t0
  examples = [ex for ex in batch["examples"] for _ in range(g)]
  t0 = time.perf_counter()
  rewards = grade_rows(ctx.tokenizer, roll.tokens, roll.mask, examples)  # [B*G]
  score_s = time.perf_counter() - t0
  advantages = np.asarray(losses.grpo_advantages(rewards, g))
  out = pack([p for p in prompts for _ in range(g)], roll.tokens, roll.mask, config.max_prompt_len)
  out.update(advantages=advantages.astype(np.float32), old_logprobs=roll.logprobs)
  metrics = {
    "grpo/reward_mean": float(rewards.mean()),
    "grpo/solved_groups": float((rewards.reshape(-1, g).max(1) > 0).mean()),
    "rollout/response_len": float(roll.mask.sum(1).mean()),
  }
  got = Collected(out, metrics, [], dict(rollout=rollout_s, teacher_wait=0.0, scoring=score_s))
  return lambda: got


def collect_sft(ctx, model, batch, step: int):
  """Reference (worked) solutions as responses; no sampling."""
  del model, step
  config, length = ctx.config, ctx.config.rollout.max_new_tokens
  prompts, _ = left_truncate(batch["prompt_ids"], config.max_prompt_len)
  responses = np.zeros((len(prompts), length), np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, ex in enumerate(batch["examples"]):
    try:
      text = tasks.worked_solution(ex)
    except (ValueError, KeyError):
      text = f"Answer: {ex['answer']}"
    ids = ctx.tokenizer.encode(text, add_special_tokens=False) + list(ctx.eos_ids[:1])
    ids = ids[:length]
    responses[i, : len(ids)], mask[i, : len(ids)] = ids, True
  out = pack(prompts, responses, mask, config.max_prompt_len)
  got = Collected(
    out,
    {"sft/response_len": float(mask.sum(1).mean())},
    [],
    dict(rollout=0.0, teacher_wait=0.0, scoring=0.0),
  )
  return lambda: got


def collect_opd(ctx, model, batch, step: int):
  """Student rollouts scored token by token by a same-tokenizer teacher in process."""
  config = ctx.config
  prompts, _ = left_truncate(batch["prompt_ids"], config.max_prompt_len)
  t0 = time.perf_counter()
  roll = rollout(
    model, prompts, config, seed=stable_seed(config.seed, step, "rollout", ctx.process_index),
    mesh=ctx.rollout_mesh, rules=ctx.rules, eos_ids=ctx.eos_ids,
  )  # fmt: skip
  rollout_s = time.perf_counter() - t0
  out = pack(prompts, roll.tokens, roll.mask, config.max_prompt_len)
  t0 = time.perf_counter()
  if config.opd.estimator == "sampled":
    out["teacher_logprobs"] = np.asarray(ctx.teacher_logprobs_fn(out))
  metrics = {"rollout/response_len": float(roll.mask.sum(1).mean())}
  got = Collected(
    out, metrics, [], dict(rollout=rollout_s, teacher_wait=time.perf_counter() - t0, scoring=0.0)
  )
  return lambda: got


# method -> collector(ctx, model, batch, step) -> finish() -> Collected. The collector does all
# device work with `model` (whose buffers the next update may donate); finish() is host work only.
COLLECTORS = {
  "omniopd": collect_omniopd,
  "grpo": collect_grpo,
  "sft": collect_sft,
  "opd": collect_opd,
}
