"""The local teacher engine: batched sampling of an HF checkpoint with our sampler, stop strings and
OpenAI-style log-probs (sampled and prompt tokens). No HTTP here: `protocol` turns OpenAI bodies
into its Jobs, `server` serves it, `local` is the in-process teacher backend built on it.

  teacher = engine.LocalTeacher.from_pretrained("hf_dir")
  samples = teacher.generate([TeacherRequest(key="f0", prefix_token_ids=ids, num_samples=4, seed=1)])
"""

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omniopd_jax.models import hf
from omniopd_jax.rollout import sampler
from omniopd_jax.teacher import wire

MAX_LOGPROBS = 20  # top log-probs per token, as vLLM's default max_logprobs
# Score (teacher-forced) calls hold [rows, S, V] float32 log-probs: rows are capped to this many
# elements so a big vocabulary never asks for more than ~1 GiB.
_SCORE_ELEMENTS = 1 << 28
_GREEDY_BELOW = 1e-5


class RequestError(ValueError):
  """A request this teacher cannot serve as given; `param` names the offending field."""

  def __init__(self, message: str, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.message, self.param, self.code = message, param, code


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One completion request's settings, named as OpenAI's /v1/completions names them."""

  max_tokens: int = 16  # 0 only with echo (prompt log-probs alone)
  n: int = 1  # samples per prompt
  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0  # 0 = off
  seed: int | None = None  # None: fresh randomness; else a deterministic function of the request
  stop: tuple[str, ...] = ()  # cut the text at the first of these
  logprobs: int | None = None  # top log-probs per token (0..20); None: no log-probs
  echo: bool = False  # prepend the prompt (and its log-probs) to every choice
  ignore_eos: bool = False
  include_stop_str_in_output: bool = False


@dataclasses.dataclass(frozen=True)
class Job:
  """One request: prompts as token ids; `prompt_texts` are echoed (None: decoded from the ids)."""

  prompts: tuple[tuple[int, ...], ...]
  params: SamplingParams
  prompt_texts: tuple[str, ...] | None = None

  @property
  def rows(self) -> int:
    return len(self.prompts) * (self.params.n if self.params.max_tokens else 1)


@dataclasses.dataclass
class Choice:
  """One continuation: `token_ids` are the generated ids (an EOS included), `text` their decoded
  text (cut at a stop string; echo prepends the prompt); `logprobs` is OpenAI's object or None."""

  text: str
  token_ids: list[int]
  finish_reason: str  # "length" | "stop"
  stop_reason: str | None = None  # the stop string that ended it (None: EOS or length)
  logprobs: dict | None = None


def generation_length(max_tokens: int) -> int:
  """max_tokens rounded up to one of 4 lengths per octave (>= 8), so that clients that vary
  max_tokens compile a few programs; the extra tokens (under a quarter) are dropped."""
  step = max(8, 1 << max(max_tokens.bit_length() - 3, 0))
  return -(-max_tokens // step) * step


def chunk_seed(seed: int, chunk: int) -> int:
  """The sampler seed of the chunk-th generate call of a seeded request (uint32)."""
  return int(np.random.SeedSequence([seed % 2**64, chunk]).generate_state(1)[0])


def _eos_ids(path: str | None, tokenizer, model) -> tuple[int, ...]:
  """EOS ids of a loaded model: hf.eos_token_ids with the config.json the model was built from."""
  return hf.eos_token_ids(tokenizer, path, hf_config=json.loads(model.hf_config_json or "{}"))


class LocalTeacher:
  """An HF checkpoint served in process: `run(jobs)` batches requests into sampler calls.

  Determinism: jobs with equal sampling options share generate calls of up to `max_batch` rows,
  each prompt drawing from its own seed (derived from its job's), so a seeded job's samples depend
  only on the job, never on which other jobs shared the batch.
  """

  def __init__(
    self,
    model,
    tokenizer,
    *,
    name: str = "local",
    max_batch: int = 64,
    max_model_len: int | None = None,
    eos_ids: Sequence[int] | None = None,
  ):
    if tokenizer is None:
      raise ValueError(
        "the teacher needs a tokenizer (tokenizer.json / tokenizer_config.json beside the model): "
        "it returns text. Save one with hf.save_pretrained(model, tokenizer, dir)."
      )
    self.model, self.tokenizer, self.name = model, tokenizer, name
    self.max_batch = int(max_batch)
    cfg_len = model.config.max_position_embeddings
    self.max_model_len = min(cfg_len, max_model_len or cfg_len)
    self.vocab_size = model.config.vocab_size
    self.eos_ids = tuple(eos_ids) if eos_ids is not None else _eos_ids(None, tokenizer, model)
    self.pad_id = tokenizer.pad_token_id or 0
    self._score_fns: dict = {}

  @classmethod
  def from_pretrained(cls, path: str, *, dtype: str = "float32", name: str | None = None, **kw):
    """Loads an HF directory (config.json, safetensors, tokenizer) our model family supports."""
    model, tokenizer = hf.load_pretrained(path, dtype=dtype)
    name = name or os.path.basename(os.path.normpath(path))
    return cls(model, tokenizer, name=name, eos_ids=_eos_ids(path, tokenizer, model), **kw)

  # ------------------------------------------------------------------------- requests -> ids

  def tokenize(self, text: str, add_special_tokens: bool = True) -> tuple[int, ...]:
    return tuple(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

  def check(self, job: Job) -> None:
    """Raises RequestError when `job` cannot be served (empty prompt, bad ids, too long)."""
    p = job.params
    if p.max_tokens == 0 and not p.echo:
      raise RequestError("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
    for i, ids in enumerate(job.prompts):
      if not ids:
        raise RequestError(f"prompt {i} is empty: it must hold at least one token", "prompt")
      bad = [t for t in ids if not 0 <= t < self.vocab_size]
      if bad:
        raise RequestError(
          f"prompt {i} has token ids outside [0, {self.vocab_size}): {bad[:5]}", "prompt"
        )
      if len(ids) + p.max_tokens > self.max_model_len:
        raise RequestError(
          f"This model's maximum context length is {self.max_model_len} tokens. However, you "
          f"requested {len(ids) + p.max_tokens} tokens ({len(ids)} in prompt {i}, {p.max_tokens} "
          "for the completion). Please reduce the length of the prompt or max_tokens.",
          "prompt",
          "context_length_exceeded",
        )

  # ------------------------------------------------------------------------------ batched run

  def run(self, jobs: Sequence[Job]) -> list[list[Choice] | Exception]:
    """Completes each job: its choices in vLLM order (prompt i, sample k at index i * n + k), or
    the exception that failed it. Jobs should have passed `check`."""
    results: list = [None] * len(jobs)
    rows = self._sample(jobs, results)
    for ji, job in enumerate(jobs):
      if results[ji] is not None:
        continue
      try:
        results[ji] = self._choices(job, rows.get(ji))
      except Exception as e:  # noqa: BLE001  (one bad job must not fail its batch mates)
        results[ji] = e
    try:
      self._add_logprobs(jobs, results)
    except Exception as e:  # noqa: BLE001
      for ji, job in enumerate(jobs):
        if job.params.logprobs is not None and not isinstance(results[ji], Exception):
          results[ji] = e
    return results

  def _sample(self, jobs, results) -> dict[int, list[tuple[np.ndarray, int]]]:
    """Generates every job's rows: job -> [(ids, length)] in (prompt, sample) order.

    Jobs with equal sampling options share calls of up to `max_batch` rows. A seeded job's
    prompts are cut into blocks of `max_batch // n`; block c draws with seed chunk_seed(seed, c),
    its own per-prompt stream in whatever call it lands (sampler rows depend only on prompt, seed
    and sample index), so its samples never depend on its batch mates. An unseeded block gets a
    fresh random seed."""
    groups: dict[tuple, list[int]] = {}
    for ji, job in enumerate(jobs):
      p = job.params
      if p.max_tokens == 0:
        continue
      # Below 1e-5 temperature is greedy (as in vLLM): dividing logits by it would overflow.
      temperature = 0.0 if p.temperature < _GREEDY_BELOW else p.temperature
      key = (generation_length(p.max_tokens), temperature, p.top_p, p.top_k, p.n, p.ignore_eos)
      groups.setdefault(key, []).append(ji)
    out: dict[int, list] = {}
    for (length, temperature, top_p, top_k, n, ignore_eos), jis in groups.items():
      per_call = max(1, self.max_batch // n)  # a prompt's n samples always share one call
      for call in _calls(jobs, jis, per_call):
        try:
          rollout = sampler.generate(
            self.model,
            [ids for _, ids, _ in call],
            max_new_tokens=length,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=[seed for _, _, seed in call],
            eos_ids=None if ignore_eos else self.eos_ids,
            pad_id=self.pad_id,
            num_samples=n,
          )
        except Exception as e:  # noqa: BLE001  (reported per job; the server answers 500)
          for ji in {ji for ji, _, _ in call}:
            results[ji] = e
          continue
        lengths = rollout.mask.sum(axis=1)  # [rows]; the mask is a prefix of each row
        for r, (ji, _, _) in enumerate(call):
          for k in range(n):
            row = r * n + k
            out.setdefault(ji, []).append((rollout.tokens[row], int(lengths[row])))
    return out  # a job with a failed call has its error in `results` (run skips its rows)

  def _choices(self, job: Job, rows) -> list[Choice]:
    p = job.params
    choices = []
    for i in range(len(job.prompts)):
      echo = self._prompt_text(job, i) if p.echo else ""
      if p.max_tokens == 0:
        choices.extend(Choice(echo, [], "length") for _ in range(p.n))
        continue
      for k in range(p.n):
        tokens, length = rows[i * p.n + k]
        ids = [int(t) for t in tokens[: min(length, p.max_tokens)]]
        choice = self._finish(ids, p)
        choice.text = echo + choice.text
        choices.append(choice)
    return choices

  def _prompt_text(self, job: Job, i: int) -> str:
    if job.prompt_texts is not None:
      return job.prompt_texts[i]
    return self.tokenizer.decode(list(job.prompts[i]), skip_special_tokens=True)

  def _decode(self, ids) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def _finish(self, ids: list[int], p: SamplingParams) -> Choice:
    """Decodes `ids`; cuts at the first stop string (keeping the tokens that produced it)."""
    eos = bool(ids) and not p.ignore_eos and ids[-1] in self.eos_ids
    text = self._decode(ids)
    hit = first_stop(text, p.stop)
    if hit is None:
      return Choice(text, ids, "stop" if eos else "length")
    # The fewest tokens whose text already holds a stop string (monotone in the token count).
    lo, hi = 1, len(ids)
    while lo < hi:
      mid = (lo + hi) // 2
      if first_stop(self._decode(ids[:mid]), p.stop) is None:
        lo = mid + 1
      else:
        hi = mid
    pos, stop = hit
    end = pos + len(stop) if p.include_stop_str_in_output else pos
    return Choice(text[:end], ids[:lo], "stop", stop)

  # ----------------------------------------------------------------------------- log-probs

  def _add_logprobs(self, jobs, results) -> None:
    """Fills OpenAI's logprobs objects from one teacher-forced pass over prompt + completion."""
    wanted = [
      (job, choice, ci // job.params.n)
      for ji, job in enumerate(jobs)
      if job.params.logprobs is not None and not isinstance(results[ji], Exception)
      for ci, choice in enumerate(results[ji])
    ]
    if not wanted:
      return
    seqs = [list(job.prompts[i]) + choice.token_ids for job, choice, i in wanted]
    for (job, choice, i), scores in zip(wanted, self.score(seqs)):
      choice.logprobs = self._logprobs_object(job, choice, i, *scores)

  def _logprobs_object(self, job, choice, i, lp, top_ids, top_lp) -> dict:
    p, prompt = job.params, list(job.prompts[i])
    seq = prompt + choice.token_ids
    start = 0 if p.echo else len(prompt)
    pieces = self.tokenizer.batch_decode([[t] for t in seq[start:]], skip_special_tokens=False)
    # Offsets into the choice text: prompt tokens into the echoed prompt, then the completion.
    offsets = []
    if p.echo:
      offsets = [len(s) for s in self._batch_decode_prefixes(prompt)]
    base = len(self._prompt_text(job, i)) if p.echo else 0
    offsets += [base + len(s) for s in self._batch_decode_prefixes(choice.token_ids)]
    token_logprobs, top_logprobs = [], []
    for j in range(start, len(seq)):
      if j == 0:  # nothing predicts the first prompt token (vLLM: null)
        token_logprobs.append(None)
        top_logprobs.append(None)
        continue
      token_logprobs.append(float(lp[j - 1]))
      top = {}
      for t, v in zip(top_ids[j - 1][: p.logprobs], top_lp[j - 1][: p.logprobs]):
        top[self.tokenizer.decode([int(t)], skip_special_tokens=False)] = float(v)
      top.setdefault(pieces[j - start], float(lp[j - 1]))  # the chosen token is always listed
      top_logprobs.append(top)
    return {
      "tokens": pieces,
      "token_logprobs": token_logprobs,
      "top_logprobs": top_logprobs,
      "text_offset": offsets,
    }

  def _batch_decode_prefixes(self, ids: list[int]) -> list[str]:
    """decode(ids[:j]) for j = 0 .. len(ids) - 1."""
    if not ids:
      return []
    return self.tokenizer.batch_decode([ids[:j] for j in range(len(ids))], skip_special_tokens=True)

  def score(self, seqs: Sequence[Sequence[int]]):
    """Teacher-forced log-probs: per sequence (lp [S-1], top_ids [S-1, K], top_lp [S-1, K]), where
    lp[j] = log p(seq[j+1] | seq[:j+1]) under the raw (temperature 1) model, float32, and K =
    min(20, V) best tokens in descending order."""
    top_n = min(MAX_LOGPROBS, self.vocab_size)  # one static width (one program); callers slice
    width = sampler.bucket(max(len(s) for s in seqs), sampler.PROMPT_BUCKETS)
    rows_cap = max(1, min(self.max_batch, _SCORE_ELEMENTS // (width * self.vocab_size)))
    out = []
    for lo in range(0, len(seqs), rows_cap):
      chunk = seqs[lo : lo + rows_cap]
      rows = sampler.bucket(len(chunk), sampler.BATCH_BUCKETS)
      tokens = np.zeros((rows, width), np.int32)  # [R, S] right-padded
      mask = np.zeros((rows, width), bool)
      for r, s in enumerate(chunk):
        tokens[r, : len(s)], mask[r, : len(s)] = s, True
      lp, top_lp, top_ids = jax.device_get(self._score_fn(top_n)(self._state(), tokens, mask))
      out.extend(
        (lp[r, : len(s) - 1], top_ids[r, : len(s) - 1], top_lp[r, : len(s) - 1])
        for r, s in enumerate(chunk)
      )
    return out

  def _state(self):
    return nnx.split(self.model)[1]

  def _score_fn(self, top_n: int):
    if top_n not in self._score_fns:
      graphdef = nnx.split(self.model)[0]

      @jax.jit
      def fn(state, tokens, mask):
        logits = nnx.merge(graphdef, state)(tokens, attention_mask=mask)  # [R, S, V] float32
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [R, S-1, V]
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [R, S-1]
        top_lp, top_ids = jax.lax.top_k(logp, top_n)  # [R, S-1, K]
        return picked, top_lp, top_ids

      self._score_fns[top_n] = fn
    return self._score_fns[top_n]

  # ------------------------------------------------------------------ the teacher-client API

  def generate(
    self, requests: Sequence[wire.TeacherRequest], *, max_tokens: int = 64, temperature: float = 1.0
  ) -> list[list[wire.Sample]]:
    """Continues each request's rendered prompt (`prefix_token_ids`, else `prefix_text`)
    `num_samples` times: per request a list of that many Samples, failures carrying a reason.
    `max_tokens` / `temperature` fill requests that leave them None."""
    jobs, where, out = [], [], []
    for r in requests:
      try:
        if r.prefix_token_ids is not None:
          ids = tuple(int(t) for t in r.prefix_token_ids)
        elif r.prefix_text is not None:
          ids = self.tokenize(r.prefix_text)
        else:
          raise RequestError(f"request {r.key!r} has neither prefix_token_ids nor prefix_text")
        params = SamplingParams(
          max_tokens=max_tokens if r.max_tokens is None else r.max_tokens,
          n=r.num_samples,
          temperature=temperature if r.temperature is None else r.temperature,
          seed=r.seed,
          stop=tuple(r.stop),
        )
        job = Job((ids,), params)
        self.check(job)
        where.append(len(out))
        jobs.append(job)
        out.append(None)
      except (RequestError, ValueError) as e:
        out.append([wire.failure(f"local teacher: {e}", "raw")] * r.num_samples)
    for i, job, res in zip(where, jobs, self.run(jobs)):
      out[i] = _samples(job, res)
    return out


def _calls(jobs, jis, per_call: int) -> list[list[tuple[int, tuple[int, ...], int]]]:
  """Packs the jobs' prompts into sampler calls of at most `per_call` prompts: (job, prompt ids,
  seed) each. A job's block of `per_call` prompts (one seed) never splits over calls, and no call
  holds two blocks with the same seed (equal prompts would then count as repeats of each other)."""
  calls, current, seeds = [], [], set()
  for ji in jis:
    job = jobs[ji]
    for c, lo in enumerate(range(0, len(job.prompts), per_call)):
      prompts = job.prompts[lo : lo + per_call]
      if job.params.seed is not None:
        seed = chunk_seed(job.params.seed, c)
      else:
        seed = int.from_bytes(os.urandom(4), "little")
      if current and (len(current) + len(prompts) > per_call or seed in seeds):
        calls.append(current)
        current, seeds = [], set()
      current += [(ji, ids, seed) for ids in prompts]
      seeds.add(seed)
  return calls + [current] if current else calls


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
  """(position, stop string) of the earliest stop string in `text` (longest on a tie), or None."""
  hits = [(text.find(s), -len(s), s) for s in stops if s and s in text]
  return (min(hits)[0], min(hits)[2]) if hits else None


def _samples(job: Job, result) -> list[wire.Sample]:
  n = job.params.n
  ins = wire.split_evenly(len(job.prompts[0]), n)
  if isinstance(result, Exception):
    return [wire.failure(f"local teacher failed: {result!r}", "raw", t) for t in ins]
  out = []
  for choice, t_in in zip(result, ins):
    t_out = len(choice.token_ids)
    if not choice.text:
      reason = f"empty continuation (finish_reason={choice.finish_reason})"
      out.append(wire.empty_answer(reason, "raw", t_in, t_out, choice.finish_reason))
      continue
    ids = tuple(choice.token_ids)
    out.append(wire.Sample(choice.text, None, choice.finish_reason, ids, t_in, t_out, "raw"))
  return out
