"""OpenAI's completions protocol for the local engine: a JSON body -> an engine Job (validated, with
OpenAI-style 400 errors), the engine's choices -> the JSON answer. Shared by the HTTP server and the
in-process `local` backend; no HTTP here.
"""

import time
import uuid

from omniopd_jax.teacher import engine

DEFAULT_MAX_TOKENS = 16  # vLLM's default for /v1/completions


class BadRequest(engine.RequestError):
  """An invalid request: answered with HTTP 400 and an OpenAI-style error body."""


# ---------------------------------------------------------------------------- request parsing


def _field(body, name, kinds, default, check=None, what=""):
  value = body.get(name, default)
  if value is None:
    return default
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
  if not ok or (check is not None and not check(value)):
    raise BadRequest(f"`{name}` must be {what}; got {value!r}", name)
  return value


def parse_prompts(prompt, teacher, add_special_tokens: bool):
  """(token-id prompts, echo texts) from a str, list of str, list of ids or list of id lists."""
  is_ids = lambda x: (
    isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
  )
  if isinstance(prompt, str):
    prompt = [prompt]
  if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
    ids = tuple(teacher.tokenize(p, add_special_tokens) for p in prompt)
    return ids, tuple(prompt)
  if isinstance(prompt, list) and prompt and is_ids(prompt):
    return (tuple(prompt),), None
  if isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
    return tuple(tuple(p) for p in prompt), None
  raise BadRequest(
    "`prompt` must be a string, a list of strings, a list of token ids or a list of token-id "
    f"lists (non-empty); got {str(prompt)[:80]!r}",
    "prompt",
  )


def parse_request(body, teacher, *, max_tokens_cap: int) -> tuple[engine.Job, dict]:
  """A /v1/completions JSON body -> (Job, options for the response). Raises BadRequest."""
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object", None)
  if "prompt" not in body:
    raise BadRequest("`prompt` is required", "prompt")
  for name in ("stream", "suffix", "logit_bias"):
    if body.get(name):
      raise BadRequest(f"`{name}` is not supported by this server; leave it unset", name)
  best_of = body.get("best_of")
  if best_of is not None and best_of != body.get("n", 1):
    raise BadRequest("`best_of` is not supported by this server; leave it unset", "best_of")
  n = _field(body, "n", int, 1, lambda v: v >= 1, "a positive integer")
  default_max = min(DEFAULT_MAX_TOKENS, max_tokens_cap)
  max_tokens = _field(body, "max_tokens", int, default_max, lambda v: v >= 0, "an integer >= 0")
  if max_tokens > max_tokens_cap:
    raise BadRequest(
      f"`max_tokens`={max_tokens} is above this server's cap of {max_tokens_cap} (the smaller of "
      "--max_tokens_cap and the model's context length); ask for fewer tokens",
      "max_tokens",
    )
  number = (int, float)
  temperature = _field(body, "temperature", number, 1.0, lambda v: v >= 0, "a number >= 0")
  top_p = _field(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
  top_k = _field(body, "top_k", int, 0, lambda v: v >= -1, "an integer >= -1 (-1 or 0: off)")
  seed = _field(body, "seed", int, None, None, "an integer")
  limit = engine.MAX_LOGPROBS
  logprobs = _field(
    body, "logprobs", int, None, lambda v: 0 <= v <= limit, f"an integer in [0, {limit}]"
  )
  flags = {
    name: _field(body, name, bool, default, None, "true or false")
    for name, default in (
      ("echo", False),
      ("ignore_eos", False),
      ("include_stop_str_in_output", False),
      ("add_special_tokens", True),
      ("return_token_ids", False),
    )
  }
  stop = body.get("stop")
  stop = [stop] if isinstance(stop, str) else stop or []
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise BadRequest("`stop` must be a non-empty string or a list of them", "stop")
  prompts, texts = parse_prompts(body["prompt"], teacher, flags["add_special_tokens"])
  params = engine.SamplingParams(
    max_tokens=max_tokens,
    n=n,
    temperature=float(temperature),
    top_p=float(top_p),
    top_k=max(top_k, 0),
    seed=seed,
    stop=tuple(stop),
    logprobs=logprobs,
    echo=flags["echo"],
    ignore_eos=flags["ignore_eos"],
    include_stop_str_in_output=flags["include_stop_str_in_output"],
  )
  job = engine.Job(prompts, params, texts)
  try:
    teacher.check(job)
  except engine.RequestError as e:
    raise BadRequest(e.message, e.param, e.code) from None
  return job, {"return_token_ids": flags["return_token_ids"]}


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
  prompt_tokens = sum(len(p) for p in job.prompts)
  completion_tokens = sum(len(c.token_ids) for c in choices)
  return {
    "id": f"cmpl-{uuid.uuid4().hex}",
    "object": "text_completion",
    "created": int(time.time()),
    "model": model_name,
    "choices": out,
    "usage": {
      "prompt_tokens": prompt_tokens,
      "completion_tokens": completion_tokens,
      "total_tokens": prompt_tokens + completion_tokens,
    },
  }


def error_body(status: int, message: str, param=None, code=None) -> dict:
  kind = "invalid_request_error" if status < 500 else "internal_server_error"
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def handle_completion(body, teacher, batcher, max_tokens_cap=None) -> tuple[int, dict]:
  """(HTTP status, JSON body) answering one /v1/completions body (shared by the HTTP route and
  the in-process `local` backend)."""
  cap = min(max_tokens_cap or teacher.max_model_len, teacher.max_model_len)
  try:
    job, opts = parse_request(body, teacher, max_tokens_cap=cap)
  except BadRequest as e:
    return 400, error_body(400, e.message, e.param, e.code)
  try:
    choices = await batcher.submit(job)
  except Exception as e:  # noqa: BLE001  (reported to the caller, who may retry a 500)
    return 500, error_body(500, f"generation failed: {e!r}")
  return 200, completion_response(job, choices, teacher.name, **opts)
