"""OpenAI's completions protocol for the local engine: a JSON body -> an engine Job (validated, with
OpenAI-style errors), the engine's choices -> the JSON answer. Shared by the HTTP server and the
in-process `local` backend; no HTTP here.

The server defends itself here, before any work: the `model` must be one it serves (404), `n` and
prompts x n are capped, and text prompts are measured in characters before they are tokenised (off
the event loop), so an abusive request costs neither memory nor the loop's time.
"""

import asyncio
import dataclasses
import time
import uuid

from omniopd_jax.teacher import engine

DEFAULT_MAX_TOKENS = 16  # vLLM's default for /v1/completions
CHARS_PER_TOKEN_CAP = 32  # a prompt longer than 32 characters per context token cannot fit


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask of the server (its command-line flags)."""

  served_names: tuple[str, ...] = ()  # `model` values answered; () answers any (in process)
  max_tokens_cap: int | None = None  # largest max_tokens; None: the context length
  max_n: int = 128  # samples per prompt
  max_rows: int = 1024  # prompts x n in one request
  max_prompt_chars: int | None = None  # per prompt, before tokenising; None: 32 x context


class BadRequest(engine.RequestError):
  """An invalid request: answered with `status` (400, or 404 for an unknown model) and an
  OpenAI-style error body."""

  def __init__(self, message: str, param=None, code=None, status: int = 400):
    super().__init__(message, param, code)
    self.status = status


def error_body(status: int, message: str, param=None, code=None) -> dict:
  kind = "invalid_request_error" if status < 500 else "internal_server_error"
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------- request parsing


def field(body, name, kinds, default, check=None, what=""):
  """body[name] (default when absent or null), type- and range-checked; BadRequest otherwise."""
  value = body.get(name, default)
  if value is None:
    return default
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
  if not ok or (check is not None and not check(value)):
    raise BadRequest(f"`{name}` must be {what}; got {str(value)[:80]!r}", name)
  return value


def check_model(body, teacher, limits: Limits) -> None:
  """404, as vLLM answers, when `model` names a model this server does not serve."""
  model = body.get("model")
  if limits.served_names and model is not None and model not in limits.served_names:
    raise BadRequest(
      f"The model `{str(model)[:200]}` does not exist. This server serves "
      f"{list(limits.served_names)}.",
      "model",
      "model_not_found",
      status=404,
    )


def prompt_char_limit(teacher, limits: Limits) -> int:
  return limits.max_prompt_chars or CHARS_PER_TOKEN_CAP * teacher.max_model_len


def too_long(i: int, chars: int, limit: int) -> BadRequest:
  return BadRequest(
    f"prompt {i} has {chars} characters, above this server's limit of {limit} (--max_prompt_chars"
    "); it cannot fit the model's context. Please reduce the length of the prompt.",
    "prompt",
    "context_length_exceeded",
  )


def split_prompts(prompt, teacher, limits: Limits):
  """(texts, None) or (None, token-id prompts) from a str, list of str, list of ids or list of id
  lists, with every size checked before anything is tokenised."""
  is_ids = lambda x: (
    isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
  )
  if isinstance(prompt, str):
    prompt = [prompt]
  if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
    limit = prompt_char_limit(teacher, limits)
    for i, p in enumerate(prompt):
      if len(p) > limit:
        raise too_long(i, len(p), limit)
    return tuple(prompt), None
  if isinstance(prompt, list) and prompt and is_ids(prompt):
    prompt = [prompt]
  if isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
    return None, tuple(tuple(p) for p in prompt)
  raise BadRequest(
    "`prompt` must be a string, a list of strings, a list of token ids or a list of token-id "
    f"lists (non-empty); got {str(prompt)[:80]!r}",
    "prompt",
  )


async def tokenize_off_loop(teacher, texts, add_special_tokens: bool) -> tuple:
  """Token ids of `texts`, computed on a worker thread so that /health and other requests
  keep being answered while a long prompt is tokenised."""
  return await asyncio.to_thread(
    lambda: tuple(teacher.tokenize(t, add_special_tokens) for t in texts)
  )


def sampling_options(body, teacher, limits: Limits, max_tokens_key="max_tokens") -> dict:
  """The SamplingParams fields shared by completions and chat (no prompt, no log-probs)."""
  for name in ("stream", "suffix", "logit_bias"):
    if body.get(name):
      raise BadRequest(f"`{name}` is not supported by this server; leave it unset", name)
  best_of = body.get("best_of")
  if best_of is not None and best_of != body.get("n", 1):
    raise BadRequest("`best_of` is not supported by this server; leave it unset", "best_of")
  n = field(body, "n", int, 1, lambda v: v >= 1, "a positive integer")
  if n > limits.max_n:
    raise BadRequest(f"`n`={n} is above this server's cap of {limits.max_n} (--max_n)", "n")
  cap = min(limits.max_tokens_cap or teacher.max_model_len, teacher.max_model_len)
  default_max = min(DEFAULT_MAX_TOKENS, cap)
  max_tokens = field(body, max_tokens_key, int, default_max, lambda v: v >= 0, "an integer >= 0")
  if max_tokens > cap:
    raise BadRequest(
      f"`{max_tokens_key}`={max_tokens} is above this server's cap of {cap} (the smaller of "
      "--max_tokens_cap and the model's context length); ask for fewer tokens",
      max_tokens_key,
    )
  number = (int, float)
  stop = body.get("stop")
  stop = [stop] if isinstance(stop, str) else stop or []
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise BadRequest("`stop` must be a non-empty string or a list of them", "stop")
  flag = lambda name: field(body, name, bool, False, None, "true or false")
  return dict(
    max_tokens=max_tokens,
    n=n,
    temperature=float(field(body, "temperature", number, 1.0, lambda v: v >= 0, "a number >= 0")),
    top_p=float(field(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
    top_k=max(
      field(body, "top_k", int, 0, lambda v: v >= -1, "an integer >= -1 (-1 or 0: off)"), 0
    ),
    seed=field(body, "seed", int, None, None, "an integer"),
    stop=tuple(stop),
    ignore_eos=flag("ignore_eos"),
    include_stop_str_in_output=flag("include_stop_str_in_output"),
  )


def check_rows(prompts: int, n: int, limits: Limits) -> None:
  if prompts * n > limits.max_rows:
    raise BadRequest(
      f"{prompts} prompts x n={n} = {prompts * n} samples, above this server's cap of "
      f"{limits.max_rows} a request (--max_rows); split the request",
      "n",
    )


def checked_job(teacher, job: engine.Job) -> engine.Job:
  try:
    teacher.check(job)
  except engine.RequestError as e:
    raise BadRequest(e.message, e.param, e.code) from None
  return job


async def parse_request(body, teacher, limits: Limits) -> tuple[engine.Job, dict]:
  """A /v1/completions JSON body -> (Job, options for the response). Raises BadRequest."""
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object", None)
  check_model(body, teacher, limits)
  if "prompt" not in body:
    raise BadRequest("`prompt` is required", "prompt")
  options = sampling_options(body, teacher, limits)
  limit = engine.MAX_LOGPROBS
  logprobs = field(
    body, "logprobs", int, None, lambda v: 0 <= v <= limit, f"an integer in [0, {limit}]"
  )
  echo, return_ids = (field(body, k, bool, False, None, "true or false") for k in ("echo", "return_token_ids"))  # fmt: skip
  add_special = field(body, "add_special_tokens", bool, True, None, "true or false")
  texts, ids = split_prompts(body["prompt"], teacher, limits)
  check_rows(len(texts or ids), options["n"], limits)
  if ids is None:
    ids = await tokenize_off_loop(teacher, texts, add_special)
  params = engine.SamplingParams(**options, logprobs=logprobs, echo=echo)
  job = checked_job(teacher, engine.Job(ids, params, texts))
  return job, {"return_token_ids": return_ids}


def completion_response(job, choices, model_name: str, return_token_ids: bool) -> dict:
  """The /v1/completions answer: choice index = prompt index * n + sample index; usage counts
  each prompt once and every choice's generated tokens."""
  n = job.params.n
  out = []
  for index, c in enumerate(choices):
    choice = {
      "index": index,
      "text": c.text,
      "logprobs": c.logprobs,
      "finish_reason": c.finish_reason,
      "stop_reason": c.stop_reason,
    }
    if return_token_ids:
      choice["token_ids"] = c.token_ids
      choice["prompt_token_ids"] = list(job.prompts[index // n])
    out.append(choice)
  return {
    "id": f"cmpl-{uuid.uuid4().hex}",
    "object": "text_completion",
    "created": int(time.time()),
    "model": model_name,
    "choices": out,
    "usage": usage(job, choices),
  }


def usage(job, choices) -> dict:
  prompt_tokens = sum(len(p) for p in job.prompts)
  completion_tokens = sum(len(c.token_ids) for c in choices)
  return {
    "prompt_tokens": prompt_tokens,
    "completion_tokens": completion_tokens,
    "total_tokens": prompt_tokens + completion_tokens,
  }


async def answer(parse, respond, body, teacher, batcher, limits) -> tuple[int, dict]:
  """(HTTP status, JSON body): `parse(body, teacher, limits)` -> (job, options), the batcher runs
  the job, `respond(job, choices, model name, **options)` builds the answer."""
  limits = limits or Limits()
  try:
    job, opts = await parse(body, teacher, limits)
  except BadRequest as e:
    return e.status, error_body(e.status, e.message, e.param, e.code)
  try:
    choices = await batcher.submit(job)
  except Exception as e:  # noqa: BLE001  (reported to the caller, who may retry a 500)
    return 500, error_body(500, f"generation failed: {e!r}")
  name = limits.served_names[0] if limits.served_names else teacher.name
  return 200, respond(job, choices, name, **opts)


async def handle_completion(body, teacher, batcher, limits: Limits | None = None):
  """(HTTP status, JSON body) answering one /v1/completions body (shared by the HTTP route and
  the in-process `local` backend)."""
  return await answer(parse_request, completion_response, body, teacher, batcher, limits)
