"""OmniOPD (SPEC §1): rollouts -> peak-entropy forks -> black-box teacher continuations ->
similarity -> Dirichlet posterior -> chunk weights, and the weighted log-likelihood loss with the
KL anchor on unaudited tokens.

Host side (`collect`): numpy, strings and the teacher client; device side (`loss`,
`center_fork_weights`): pure jnp inside the jitted update.
"""

import dataclasses
import hashlib
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omniopd_jax.methods import base, losses, overlap, packing
from omniopd_jax.reward import posterior
from omniopd_jax.rollout import chunks, forks, sampler
from omniopd_jax.teacher import backends as tb


@flax.struct.dataclass
class OmniOPDBatch:
  seq: base.Sequences
  fork_starts: Any  # [B, M] int32 chunk starts (response positions)
  fork_mask: Any  # [B, M] bool audited chunks (>= 1 teacher sample came back)
  fork_weight: Any  # [B, M] float32 chunk weight w_c (pi_hat; centred on device if asked)
  # omniopd.token_credit != "none": each chunk token's own weight and whether any teacher sample
  # speaks for it ([B, M, C] float32 / bool); these replace fork_weight in the loss.
  fork_token_weight: Any = None
  fork_token_mask: Any = None


# ----------------------------------------------------------------------------- host: collection


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
      seed=base.stable_seed(
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


def uses_token_ids(ctx: base.Context) -> bool:
  """Whether the teacher continues token ids (then after the moved whitespace), not text."""
  fmt = ctx.config.teacher.prompt_format
  return ctx.backend in ("openai_completions", "local") and fmt == "token_ids"


def clip_fn(ctx: base.Context):
  """Texts -> the same texts cut to chunk_len student tokens (chunks.clip_to_tokens)."""
  return lambda texts: chunks.clip_to_tokens(ctx.tokenizer, texts, ctx.config.omniopd.chunk_len)


def _forks_and_submit(ctx: base.Context, prompts, roll, rng, examples, step: int):
  """After the whole decode: forks of every row, their requests, sent at once. Returns (starts
  [B, M], valid [B, M], ForkRequests, boundary mismatches, futures, arrival times)."""
  o = ctx.config.omniopd
  starts, valid = forks.select_forks(
    roll.entropy, roll.mask, num_forks=o.num_forks, chunk_len=o.chunk_len,
    method=o.fork_method, rng=rng,
  )  # fmt: skip
  starts, valid = np.asarray(starts), np.asarray(valid)
  req, mismatches = chunks.build_fork_requests(
    ctx.tokenizer, prompts, roll.tokens, roll.mask, starts, valid, chunk_len=o.chunk_len
  )
  arrivals = [time.perf_counter()]  # teacher_span = last arrival - submission
  futures = ctx.teacher.submit(teacher_requests(ctx.config, req, examples, ctx.backend, step))
  overlap.track_arrivals(futures, arrivals)
  return starts, valid, req, mismatches, futures, arrivals


def collect(ctx: base.Context, model, batch: dict, step: int):
  """Rollouts, peak-entropy forks and teacher submission now (device work done when this
  returns); the returned `finish()` waits for the teacher, scores and builds the batch.

  With rollout.overlap_teacher (and the continuous engine), each row's forks are chosen and its
  requests sent as the row ends (methods/overlap.py); otherwise after the whole decode. Both
  build the same requests in the same order."""
  o, r = ctx.config.omniopd, ctx.config.rollout
  prompts = base.step_prompts(ctx, batch)
  t0 = time.perf_counter()
  rng = jax.random.key(base.stable_seed(ctx.config.seed, step, "forks"))
  rows = None
  if r.overlap_teacher and sampler.continuous_engine_used(r.engine, ctx.rollout_mesh):
    rows = overlap.RowSubmitter(
      ctx.teacher, ctx.tokenizer, prompts,
      lambda req: teacher_requests(ctx.config, req, batch["examples"], ctx.backend, step),
      num_forks=o.num_forks, chunk_len=o.chunk_len, fork_method=o.fork_method, rng=rng,
      length=r.max_new_tokens,
    )  # fmt: skip
  roll = base.rollout(ctx, model, prompts, step, on_row_done=rows)
  if rows is not None:
    starts, valid, req, mismatches, futures, arrivals = rows.finish()
  else:
    starts, valid, req, mismatches, futures, arrivals = _forks_and_submit(
      ctx, prompts, roll, rng, batch["examples"], step
    )
  fork_stats = jax.device_get(forks.fork_metrics(roll.entropy, roll.mask, starts, valid))
  rollout_s = time.perf_counter() - t0
  student_texts = clip_fn(ctx)(req.chunk_text_for_ids() if uses_token_ids(ctx) else req.chunk_text)

  drafts = None
  if o.weight_form == "group" and len(req):  # the student's K-1 other drafts, while it waits
    t1 = time.perf_counter()
    drafts = sampler.draft_chunks(
      model, [list(map(int, p)) for p in req.prefix_ids], num_drafts=o.num_drafts - 1,
      chunk_len=o.chunk_len, seed=base.stable_seed(ctx.config.seed, step, "drafts"),
      eos_ids=ctx.eos_ids,
    )  # fmt: skip
    rollout_s += time.perf_counter() - t1
  return InFlight(
    ctx, prompts, roll, starts, valid, fork_stats, req, mismatches, student_texts, futures,
    drafts, rollout_s, arrivals,
  ).finish  # fmt: skip


@dataclasses.dataclass
class InFlight:
  """A step whose teacher requests are out: everything `finish` needs to build its batch."""

  ctx: base.Context
  prompts: list  # this step's prompt ids
  roll: sampler.Rollout  # the student's rollouts (numpy)
  starts: np.ndarray  # [B, M] fork starts
  valid: np.ndarray  # [B, M] forks chosen
  fork_stats: dict  # forks.fork_metrics
  req: chunks.ForkRequests  # one per chosen fork
  mismatches: int  # chunk boundary mismatches (chunks.build_fork_requests)
  student_texts: list[str]  # the student's own chunk per fork, clipped
  futures: list  # teacher futures, one per fork
  drafts: sampler.Rollout | None  # weight_form=group: the K-1 other drafts per fork
  rollout_s: float
  arrivals: list[float]  # submission time, then each future's arrival time

  def finish(self) -> base.Collected:
    """Host half of an OmniOPD step: wait for the teacher, score, posterior, pack."""
    ctx, o = self.ctx, self.ctx.config.omniopd
    sim, teacher_texts, reasons, wait_s, score_s = overlap.wait_and_score(
      self.futures,
      self.student_texts,
      ctx.scorer,
      o.num_teacher_samples,
      clip=clip_fn(ctx),
      stop=ctx.stop_requested,
    )
    asked = len(self.req) * o.num_teacher_samples
    sim_bm, pi_bar_bm, draft_s = self._similarities_and_prior(sim, teacher_texts)
    # `centered` is finished on device (center_fork_weights), over the global batch.
    credit = o.token_credit != "none"
    rewards = posterior.build_reward_arrays(
      sim_bm, pi_bar_bm, alpha=o.alpha, form=o.weight_form, use_prior=o.use_prior,
      token_credit=o.token_credit, chunk_len=o.chunk_len,
      diverge=self.req.scatter(self._divergence(teacher_texts), fill_value=0) if credit else None,
    )  # fmt: skip
    seq = base.pack(self.prompts, self.roll.tokens, self.roll.mask, ctx.config.max_prompt_len)
    batch = OmniOPDBatch(
      seq=seq,
      fork_starts=self.starts.astype(np.int32),
      fork_mask=rewards.mask,
      fork_weight=rewards.weight,
      fork_token_weight=rewards.token_weight,
      fork_token_mask=rewards.token_mask,
    )
    metrics = {
      **{k: float(v) for k, v in self.fork_stats.items()},
      **posterior.reward_metrics(rewards, fork_valid=self.valid),
      "omniopd/forks_sent": float(len(self.req)),
      "omniopd/boundary_mismatches": float(self.mismatches),
      "omniopd/teacher_failures": float(len(reasons)),
      "omniopd/teacher_failed_frac": len(reasons) / max(asked, 1),
      "rollout/response_len": float(self.roll.mask.sum(1).mean()),
    }
    timings = dict(rollout=self.rollout_s, teacher_wait=wait_s, scoring=score_s + draft_s,
                   teacher_span=max(self.arrivals) - self.arrivals[0])  # fmt: skip
    texts = self._samples(sim, teacher_texts, rewards, reasons)
    return base.Collected(batch, metrics, texts, timings, teacher_samples=(asked, len(reasons)))

  def _divergence(self, teacher_texts) -> np.ndarray:
    """[n, N] first chunk token of each fork that each teacher sample does not reproduce
    (posterior.divergence_tokens), on the same text basis as the scored chunks."""
    ctx, c, req = self.ctx, self.ctx.config.omniopd.chunk_len, self.req
    lead = [""] * len(req) if uses_token_ids(ctx) else req.moved_whitespace
    out = np.zeros((len(req), ctx.config.omniopd.num_teacher_samples), np.int32)
    for i in range(len(req)):
      ids = self.roll.tokens[req.row[i], req.start[i] : req.start[i] + c]
      texts = ctx.tokenizer.batch_decode([ids[: t + 1] for t in range(c)], skip_special_tokens=True)
      ends = [len(lead[i]) + len(text) for text in texts]
      out[i] = posterior.divergence_tokens(self.student_texts[i], ends, teacher_texts[i])
    return out

  def _similarities_and_prior(self, sim, teacher_texts):
    """(sim, pi_bar) scattered to [B, M(, K), N] / [B, M(, K)], and seconds scoring drafts."""
    ctx, o, req = self.ctx, self.ctx.config.omniopd, self.req
    pi_bar = posterior.chunk_pi_bar(self.roll.logprobs, self.starts, self.valid, o.chunk_len)
    if o.weight_form != "group":
      return req.scatter(sim), pi_bar, 0.0
    k, t1 = o.num_drafts, time.perf_counter()
    sims = np.full((len(req), k, o.num_teacher_samples), np.nan, np.float32)  # [F, K, N]
    pis = np.zeros((len(req), k), np.float32)  # [F, K]
    sims[:, 0] = sim
    pis[:, 0] = pi_bar[req.row, req.slot]
    if len(req):
      for j in range(1, k):
        tokens_j = self.drafts.tokens[:, j - 1]
        texts_j = ctx.tokenizer.batch_decode(tokens_j, skip_special_tokens=True)
        if not uses_token_ids(ctx):  # drafts continue prefix_ids: put the moved whitespace back
          texts_j = clip_fn(ctx)([w + x for w, x in zip(req.moved_whitespace, texts_j)])
        sims[:, j] = ctx.scorer.score(texts_j, teacher_texts)
        pis[:, j] = posterior.pi_bar_from_logprobs(self.drafts.logprobs[:, j - 1])
    draft_s = time.perf_counter() - t1 if len(req) else 0.0
    return req.scatter(sims), req.scatter(pis, fill_value=0.0), draft_s

  def _samples(self, sim, teacher_texts, rewards, reasons) -> list[dict]:
    """A few (prompt, student chunk, teacher chunks, phi, pi_hat) records for samples.jsonl."""
    ctx, req = self.ctx, self.req
    texts = []
    for i in range(min(ctx.config.num_text_samples, len(req))):
      texts.append(
        {
          "prompt": ctx.tokenizer.decode(self.prompts[req.row[i]], skip_special_tokens=True),
          "response_prefix": req.response_prefix_text[i],
          "student_chunk": self.student_texts[i],
          "teacher_chunks": teacher_texts[i],
          "phi": [None if np.isnan(x) else round(float(x), 3) for x in sim[i]],
          "pi_hat": float(rewards.pi_hat[req.row[i], req.slot[i]]),
        }
      )
    if reasons:
      texts.append({"teacher_failure_example": reasons[0]})
    return texts


# ----------------------------------------------------------------------------- device: loss


def chunk_token_weights(
  starts, valid, weights, chunk_len: int, length: int, token_weights=None, token_valid=None
) -> tuple[jax.Array, jax.Array]:
  """Spreads per-chunk weights (or each chunk token's own weight) onto the tokens of each chunk.

  Token s of row b is in chunk m when valid[b, m] and starts[b, m] <= s < starts[b, m] + C.
  `starts` index the same axis as the [B, length] output: if the loss's token axis also holds
  the prompt, add its offset to `starts` first. Chunks do not overlap (select_forks).

  Args:
    starts: [B, M] int; valid: [B, M] bool, the audited chunks (RewardArrays.mask);
    weights: [B, M] float chunk weights w_c; chunk_len: C; length: T (static).
    token_weights, token_valid: [B, M, C] per chunk token (token credit), else None: token s of
      chunk m then gets token_weights[b, m, s - start] and is audited only where token_valid.

  Returns:
    token_weight [B, T] float32 (w_c on chunk tokens, else 0) and audited_tokens [B, T] bool.
  """
  pos = jnp.arange(length)[None, None, :]  # [1, 1, T]
  starts = jnp.asarray(starts)[..., None]  # [B, M, 1]
  in_chunk = (
    jnp.asarray(valid, bool)[..., None] & (pos >= starts) & (pos < starts + chunk_len)
  )  # [B, M, T]
  if token_weights is None:
    weights = jnp.asarray(weights, jnp.float32)[..., None]  # [B, M, 1]
  else:
    offset = jnp.clip(pos - starts, 0, chunk_len - 1)  # [B, M, T] token index inside the chunk
    weights = jnp.take_along_axis(jnp.asarray(token_weights, jnp.float32), offset, axis=2)
    in_chunk = in_chunk & jnp.take_along_axis(jnp.asarray(token_valid, bool), offset, axis=2)
  return jnp.where(in_chunk, weights, 0.0).sum(axis=1), in_chunk.any(axis=1)


def omniopd_loss(
  logits,
  base_logits,
  targets,
  token_mask,
  token_weight,
  audited_tokens,
  *,
  beta: float,
  reduction: str = "sequence_sum",
  norm_constant: float | None = None,
  kl_anchor: bool = True,
  kl_on_audited: bool = False,
  totals=None,
) -> tuple[jax.Array, dict]:
  """The OmniOPD loss (SPEC §1.6).

  x_bt = -w_bt * log p(y_bt) * [audited_bt]  +  beta * KL(p_base || p)_bt * [not audited_bt]
  over tokens with token_mask, then `masked_reduce`. w_bt is the weight of the chunk holding token
  t (chunk_token_weights); KL is exact over the full vocabulary. kl_anchor=False drops the KL term
  (ablation; base_logits may then be None); kl_on_audited=True anchors every token.

  Args:
    logits, base_logits: [B, T, V] from the student and the frozen base; targets: [B, T] int.
    token_mask: [B, T] bool generated tokens; token_weight: [B, T] float; audited_tokens: [B, T] bool.
    totals: a packed batch's global normalisers (losses.masked_reduce), else None.

  Returns:
    (loss scalar float32, aux dict of scalars: loss/pg, loss/kl_anchor, kl/unaudited_mean,
    omniopd/tokens_audited_frac, omniopd/token_weight_mean, loss/logprob_mean).
  """
  mask = token_mask.astype(bool)
  audited = audited_tokens.astype(bool) & mask
  logp = losses.token_logprobs(logits, targets)  # [B, T]
  pg = jnp.where(audited, -token_weight.astype(jnp.float32) * logp, 0.0)  # [B, T]
  anchored = mask if kl_on_audited else mask & ~audited
  kl = losses.kl_anchor(base_logits, logits, logp, enabled=kl_anchor, who="omniopd_loss")
  kl_term = beta * jnp.where(anchored, kl, 0.0) if kl_anchor else jnp.zeros_like(logp)  # [B, T]
  pg_loss = losses.masked_reduce(pg, mask, reduction, norm_constant, totals)
  kl_loss = losses.masked_reduce(kl_term, mask, reduction, norm_constant, totals)
  aux = {
    "loss/pg": pg_loss,
    "loss/kl_anchor": kl_loss,
    "kl/unaudited_mean": losses.masked_mean(kl, mask & ~audited),
    "omniopd/tokens_audited_frac": audited.sum() / jnp.maximum(mask.sum(), 1),
    "omniopd/token_weight_mean": losses.masked_mean(token_weight.astype(jnp.float32), audited),
    "loss/logprob_mean": losses.masked_mean(logp, mask),
  }
  return pg_loss + kl_loss, aux


def loss(config, logits, batch: OmniOPDBatch, base_logits=None, teacher_logits=None):
  """(loss, aux) of one (micro-)batch; logits [B, L, V] predict batch.seq.response_tokens."""
  del teacher_logits
  o, seq = config.omniopd, batch.seq
  length = seq.response_tokens.shape[1]
  token_weight, audited = chunk_token_weights(
    batch.fork_starts, batch.fork_mask, batch.fork_weight, o.chunk_len, length,
    batch.fork_token_weight, batch.fork_token_mask,
  )  # [B, L] each  # fmt: skip
  return omniopd_loss(
    logits, base_logits, seq.response_tokens, seq.response_mask, token_weight, audited,
    beta=o.beta, reduction=o.reduction, norm_constant=o.norm_constant or length,
    kl_anchor=o.kl_anchor,
  )  # fmt: skip


def center_fork_weights(config, batch: OmniOPDBatch) -> OmniOPDBatch:
  """weight_form=centered: pi_hat minus its mean over the audited forks of the global batch
  (with token credit: each token's pi_hat minus the mean over the audited chunk tokens).

  The one place the centred weight is computed: on device, so that every process and
  micro-batch sees the same (global) mean. Other weight forms pass through.
  """
  if config.omniopd.weight_form != "centered":
    return batch
  if batch.fork_token_weight is not None:
    mask = (batch.fork_token_mask & batch.fork_mask[..., None]).astype(jnp.float32)  # [B, M, C]
    weight = batch.fork_token_weight.astype(jnp.float32)
    mean = (weight * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return batch.replace(fork_token_weight=(weight - mean) * mask)
  mask = batch.fork_mask.astype(jnp.float32)  # [B, M]
  weight = batch.fork_weight.astype(jnp.float32)  # [B, M] pi_hat
  mean = (weight * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return batch.replace(fork_weight=(weight - mean) * mask)


def token_fields(config, batch: OmniOPDBatch) -> dict:
  """Per-token inputs of a packed update (methods/packing.py), numpy: each chunk's weight on its
  tokens [B, L] (not yet centred), the audited tokens [B, L], and per row [B] the sum and count
  of what centring averages (its audited forks' weights; with token credit its audited chunk
  tokens' weights), counted once per row on device."""
  length = batch.seq.response_tokens.shape[1]
  starts, valid = np.asarray(batch.fork_starts), np.asarray(batch.fork_mask, bool)
  weight = np.asarray(batch.fork_weight, np.float32)
  token_weight, audited = chunk_token_weights(
    starts, valid, weight, config.omniopd.chunk_len, length,
    batch.fork_token_weight, batch.fork_token_mask,
  )  # [B, L] each  # fmt: skip
  if batch.fork_token_weight is not None:  # sums over [M, C]
    valid = np.asarray(batch.fork_token_mask, bool) & valid[..., None]
    weight = np.asarray(batch.fork_token_weight, np.float32)
  rows = tuple(range(1, valid.ndim))
  return {
    "token_weight": np.asarray(token_weight),
    "audited": np.asarray(audited),
    "fork_weight_sum": np.where(valid, weight, 0.0).sum(rows).astype(np.float32),  # [B]
    "fork_count": valid.sum(rows).astype(np.float32),  # [B]
  }


def center_packed_weights(config, batch: packing.PackedBatch) -> packing.PackedBatch:
  """center_fork_weights for a packed batch: the same global mean over audited forks, from the
  per-row sums taken once per row (at row_first), subtracted on the audited tokens."""
  if config.omniopd.weight_form != "centered":
    return batch
  f, once = batch.fields, batch.row_first
  mean = jnp.where(once, f["fork_weight_sum"], 0.0).sum() / jnp.maximum(
    jnp.where(once, f["fork_count"], 0.0).sum(), 1.0
  )
  token_weight = jnp.where(f["audited"], f["token_weight"] - mean, 0.0)  # [R, S]
  return batch.replace(fields={**f, "token_weight": token_weight})


def packed_loss(config, logits, batch: packing.PackedBatch, base_logits=None, teacher_logits=None):
  """`loss` of a packed (micro-)batch; logits [R, S, V] (or HeadStats) predict batch.targets."""
  del teacher_logits
  o, f = config.omniopd, batch.fields
  return omniopd_loss(
    logits, base_logits, batch.targets, batch.loss_mask, f["token_weight"], f["audited"],
    beta=o.beta, reduction=o.reduction, norm_constant=o.norm_constant or batch.response_len,
    kl_anchor=o.kl_anchor, totals=packing.totals(batch),
  )  # fmt: skip


def needs_base(config) -> bool:
  return bool(config.omniopd.kl_anchor)


def abstract_batch(config, rows: int, prompt_len: int, length: int) -> OmniOPDBatch:
  o, s = config.omniopd, jax.ShapeDtypeStruct
  m, credit = o.num_forks, o.get("token_credit", "none") != "none"
  return OmniOPDBatch(
    seq=base.abstract_sequences(rows, prompt_len, length),
    fork_starts=s((rows, m), jnp.int32),
    fork_mask=s((rows, m), jnp.bool_),
    fork_weight=s((rows, m), jnp.float32),
    fork_token_weight=s((rows, m, o.chunk_len), jnp.float32) if credit else None,
    fork_token_mask=s((rows, m, o.chunk_len), jnp.bool_) if credit else None,
  )


METHOD = base.Method(
  name="omniopd",
  collect=collect,
  loss=loss,
  abstract_batch=abstract_batch,
  teacher="api",
  needs_base=needs_base,
  prepare_batch=center_fork_weights,
  token_fields=token_fields,
  packed_loss=packed_loss,
  prepare_packed=center_packed_weights,
)
