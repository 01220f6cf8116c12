"""Teacher wire formats: request building, response parsing and error classification per API.

Owns the request/result types and one backend per API (`openai_completions`, `openai_chat`,
`anthropic`, `gemini`). Everything here is pure (dicts and bytes in, dicts and Samples out); the
HTTP, retries, pacing and accounting live in `teacher_client`.
"""

import dataclasses
import email.utils
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

# Result modes: "raw" (completions) and "prefill" are exact continuations; "instructed" is
# approximate (the teacher is asked to continue a text shown in the user turn, so it is not a
# sample of p_teacher(. | prompt, prefix)).
INSTRUCTED = "instructed"
_encode_json = json.JSONEncoder(separators=(",", ":")).encode  # built once, not per request
# Error text of a sample the answer left out (the client asks again for just those samples).
MISSING = "missing from the answer"


@dataclasses.dataclass(frozen=True, slots=True)
class TeacherRequest:
  """One fork: continue `prefix` `num_samples` times (independent Monte Carlo samples).

  For `openai_completions` the prefix is the fully rendered prompt (chat template + partial answer),
  given as `prefix_token_ids` (preferred, exact) or `prefix_text`. For chat-style backends
  (`openai_chat`, `anthropic`, `gemini`) `problem` is the user turn and `prefix_text` the partial
  assistant answer that the teacher continues. `max_tokens`/`temperature` of None take the client's
  config values. `seed` is best effort (see `Backend.pack`); `key` names the fork in logs.
  """

  key: str
  prefix_text: str | None = None
  prefix_token_ids: tuple[int, ...] | None = None
  num_samples: int = 1
  max_tokens: int | None = None
  temperature: float | None = None
  seed: int | None = None
  problem: str | None = None
  system: str | None = None
  stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
  """One teacher continuation, or a failure: exactly one of `text` / `error` is set.

  `tokens_in`/`tokens_out` are this sample's share of the usage the API reported (shares of one
  HTTP call sum exactly to its usage). `mode` is "raw", "prefill" or "instructed" (approximate).
  """

  text: str | None
  error: str | None = None
  finish_reason: str | None = None
  token_ids: tuple[int, ...] | None = None
  tokens_in: int = 0
  tokens_out: int = 0
  mode: str = ""
  from_cache: bool = False

  @property
  def ok(self) -> bool:
    return self.error is None


def failure(reason: str, mode: str = "", tokens_in: int = 0, tokens_out: int = 0) -> Sample:
  return Sample(text=None, error=reason, mode=mode, tokens_in=tokens_in, tokens_out=tokens_out)


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
  """What one teacher API accepts; the client packs and validates requests by it."""

  samples_per_request: int  # n / candidateCount per HTTP call (Anthropic: 1)
  prompts_per_request: int  # prompts per HTTP call (vLLM completions: a list; others: 1)
  prefill: bool  # exact continuation of the prefix (False: approximate "instructed" mode)
  token_ids_in: bool  # prompts as token ids
  seed: bool
  max_temperature: float


@dataclasses.dataclass(slots=True, eq=False)
class HttpCall:
  """One HTTP request. `slots[j]` = (item id, sample index) of the j-th sample in the response.

  The last five fields are the client's delivery state (one object per request, not two: at
  thousands of requests a step, allocations are what the garbage collector charges for).
  """

  path: str
  payload: dict
  data: bytes  # the payload as sent
  slots: list[tuple[int, int]]
  n: int  # samples per prompt
  est_tokens_in: int  # for input-token pacing and the budget check
  max_tokens_out: int  # upper bound on billed output tokens
  mode: str
  context: tuple = ()  # per-prompt data parse() needs (stripped whitespace, prefix text)
  jobs: Any = None  # the client's per-request records that `slots` point into
  attempt: int = 0
  first_t: float = 0.0
  verdict: Any = None
  waiter: Any = None  # the probe's asyncio future


@dataclasses.dataclass(slots=True)
class Verdict:
  """How the client should treat one HTTP answer.

  kind: "ok" (body holds the JSON), "retry" (transient), "fatal" (this call's samples fail),
  "halt" (every later call would fail too: auth, spend limit, unknown model, unsupported mode).
  """

  kind: str
  reason: str = ""
  retry_after_s: float | None = None
  rate_limited: bool = False  # 429/529: feeds the shared cooldown gate
  capability: str | None = None  # "prefill" | "temperature" | "samples" when the API refused one
  body: Any = None
  status: int = 0


class MalformedResponse(ValueError):
  """A 200 whose JSON lacks what the wire format promises (retried by the client)."""


def estimate_tokens(text: str | None) -> int:
  """Rough token count (4 characters a token) for pacing and budget reservations."""
  return 0 if not text else len(text) // 4 + 1


def split_evenly(total: int, parts: int) -> list[int]:
  """Integer shares of `total` that sum exactly to it (earlier parts take the remainder)."""
  if parts <= 0:
    return []
  base, rem = divmod(max(int(total), 0), parts)
  return [base + (1 if i < rem else 0) for i in range(parts)]


# --------------------------------------------------------------------------------------------
# Error classification shared by all backends.

_PREFILL_PAT = re.compile(
  r"prefill|ending with a model turn|final (assistant )?message|continue_final_message"
  r"|conversation must end with a user",
  re.I,
)
_TEMPERATURE_PAT = re.compile(r"temperature", re.I)
_SAMPLES_PAT = re.compile(r"multiple candidates|candidate_?count|\bn\b must be|'n'", re.I)
_SPEND_PAT = re.compile(r"enforced_spend_limit_reached|insufficient_quota|spend limit|credit", re.I)


def error_message(body: Any, raw: bytes) -> str:
  """The human-readable error text of an OpenAI/Anthropic/Gemini/vLLM error body."""
  if isinstance(body, dict):
    err = body.get("error", body)
    if isinstance(err, dict):
      msg = err.get("message") or err.get("type") or err.get("status")
      details = err.get("details")
      codes = [err.get("code"), details.get("error_code") if isinstance(details, dict) else None]
      codes = [str(c) for c in codes if isinstance(c, str) and c and c not in str(msg)]
      if codes:
        msg = f"{msg} ({', '.join(codes)})"
      if msg:
        return str(msg)[:500]
    elif isinstance(err, str):
      return err[:500]
  return raw[:200].decode("utf-8", "replace")


def retry_after_seconds(headers: Mapping[str, str], body: Any = None) -> float | None:
  """Server-requested wait: `retry-after-ms`, `Retry-After` (seconds or HTTP date), Gemini's
  RetryInfo `retryDelay`, or Anthropic's `anthropic-ratelimit-*-reset` of an exhausted axis."""
  h = {k.lower(): v for k, v in headers.items()}
  try:
    if "retry-after-ms" in h:
      return max(float(h["retry-after-ms"]) / 1000.0, 0.0)
    if "retry-after" in h:
      value = h["retry-after"].strip()
      try:
        return max(float(value), 0.0)
      except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(when.timestamp() - time.time(), 0.0)
  except (TypeError, ValueError):
    pass
  if isinstance(body, dict) and isinstance(body.get("error"), dict):
    for detail in body["error"].get("details") or ():
      delay = detail.get("retryDelay") if isinstance(detail, dict) else None
      if isinstance(delay, str) and delay.endswith("s"):
        try:
          return max(float(delay[:-1]), 0.0)
        except ValueError:
          pass
  waits = []
  for axis in ("requests", "tokens", "input-tokens", "output-tokens"):
    if h.get(f"anthropic-ratelimit-{axis}-remaining") == "0":
      reset = h.get(f"anthropic-ratelimit-{axis}-reset")
      try:
        import datetime  # noqa: PLC0415  (rare path)

        when = datetime.datetime.fromisoformat(reset.replace("Z", "+00:00"))
        waits.append(max(when.timestamp() - time.time(), 0.0))
      except (AttributeError, ValueError):
        pass
  return max(waits) if waits else None


# --------------------------------------------------------------------------------------------
# Backends.


class Backend:
  """Base: generic packing and classification; subclasses build payloads and parse answers."""

  name = ""
  default_base_url = ""

  def __init__(
    self,
    model: str,
    base_url: str | None = None,
    api_key: str | None = None,
    samples_per_request: int | None = None,
    prompts_per_request: int | None = None,
    extra_body: Mapping[str, Any] | None = None,
    mode: str | None = None,
  ):
    if not model:
      raise ValueError(f"{self.name}: config `model` is empty; set the teacher's model name.")
    self.model = model
    self.base_url = (base_url or self.default_base_url).rstrip("/")
    if not self.base_url:
      raise ValueError(f"{self.name}: config `base_url` is empty, e.g. http://127.0.0.1:8000/v1.")
    self._api_key = api_key  # never logged, never in repr
    self.extra_body = dict(extra_body or {})
    self.mode = mode or self.default_mode()
    caps = self.default_caps()
    self.caps = dataclasses.replace(
      caps,
      samples_per_request=int(samples_per_request or caps.samples_per_request),
      prompts_per_request=int(prompts_per_request or caps.prompts_per_request),
    )

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, mode={self.mode!r})"
    )

  def default_mode(self) -> str:
    return "prefill"

  def default_caps(self) -> Capabilities:
    raise NotImplementedError

  @property
  def approximate(self) -> bool:
    return self.mode == INSTRUCTED

  def auth_headers(self) -> dict[str, str]:
    return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

  def set_samples_per_request(self, value: int) -> None:
    self.caps = dataclasses.replace(self.caps, samples_per_request=int(value))

  def validate(self, req: TeacherRequest) -> None:
    """Raises ValueError when this API cannot serve `req` as given."""
    if req.prefix_text is None:
      raise ValueError(
        f"{self.name}: request {req.key!r} has no prefix_text; this backend continues text "
        "(only openai_completions accepts prefix_token_ids alone)."
      )
    if req.problem is None:
      raise ValueError(
        f"{self.name}: request {req.key!r} has no `problem` (the user turn). Chat-style teachers "
        "need the user turn and the partial answer separately."
      )
    if req.temperature is not None and req.temperature > self.caps.max_temperature:
      raise ValueError(
        f"{self.name}: temperature {req.temperature} above this API's maximum "
        f"{self.caps.max_temperature}; lower teacher.temperature."
      )

  def plan(
    self,
    items: Sequence[tuple[int, TeacherRequest, Sequence[int]]],
    prompts_per_request: int | None = None,
  ) -> list[list[tuple[int, TeacherRequest, list[int]]]]:
    """Groups (item id, request, sample indices) into the runs of each HTTP call.

    A request's samples are cut into runs of at most `samples_per_request`; runs with equal
    (n, max_tokens, temperature, stop, prompt kind) share a call up to `prompts_per_request`.
    """
    spr, ppr = self.caps.samples_per_request, prompts_per_request or self.caps.prompts_per_request
    groups: dict[tuple, list[tuple[int, TeacherRequest, list[int]]]] = {}
    plans = []
    for item in items:  # (item id, request, sample indices[, anything])
      item_id, req, idxs = item[0], item[1], item[2]
      if type(idxs) is not list and type(idxs) is not range:  # ranges: no list per request
        idxs = list(idxs)
      for lo in range(0, len(idxs), spr):
        run = (item_id, req, idxs if len(idxs) <= spr else idxs[lo : lo + spr])
        if ppr == 1:
          plans.append([run])
          continue
        key = (len(run[2]), req.max_tokens, req.temperature, req.stop, req.prefix_token_ids is None)
        group = groups.setdefault(key, [])
        group.append(run)
        if len(group) == ppr:
          plans.append(group)
          del groups[key]
    plans.extend(groups.values())
    return plans

  def pack(
    self,
    items: Sequence[tuple[int, TeacherRequest, Sequence[int]]],
    prompts_per_request: int | None = None,
  ) -> list[HttpCall]:
    """Packs (item id, request, sample indices) into HTTP calls (see plan and make_call)."""
    return [self.make_call(runs) for runs in self.plan(items, prompts_per_request)]

  def make_call(self, runs: list[tuple[int, TeacherRequest, list[int]]]) -> HttpCall:
    """One HTTP call for `runs`. Its seed is derived from the first run's request seed and first
    sample index, so two calls for one prefix never repeat a seed (identical samples)."""
    req0, idx0 = runs[0][1], runs[0][2]
    n = len(idx0)
    seed = None if req0.seed is None else (req0.seed + 7919 * idx0[0]) % (2**31 - 1)
    if len(runs) == 1:
      slots = [(runs[0][0], i) for i in idx0]
      reqs = [req0]
    else:
      slots = [(item_id, i) for item_id, _, idxs in runs for i in idxs]
      reqs = [r for _, r, _ in runs]
    est_in = 0
    for r in reqs:
      if r.prefix_token_ids is not None:
        est_in += len(r.prefix_token_ids)
      else:
        est_in += (
          estimate_tokens(r.prefix_text) + estimate_tokens(r.problem) + estimate_tokens(r.system)
        )
    # APIs without `n` get one call per sample, each billed for the whole prompt.
    if self.caps.samples_per_request == 1:
      est_in *= n
    payload, path, context = self.build(reqs, n, seed)
    if self.extra_body:
      payload.update(self.extra_body)
    data = _encode_json(payload).encode()
    return HttpCall(
      path, payload, data, slots, n, est_in, req0.max_tokens * len(slots), self.mode, context
    )

  def build(self, reqs: list[TeacherRequest], n: int, seed: int | None) -> tuple[dict, str, tuple]:
    """Returns (payload, URL path, per-prompt context) for one call."""
    raise NotImplementedError

  def parse(self, call: HttpCall, body: dict) -> list[Sample]:
    """One Sample per slot of `call`. Raises MalformedResponse when the body is unusable."""
    raise NotImplementedError

  def classify(self, status: int, headers: Mapping[str, str], raw: bytes) -> Verdict:
    """Sorts an HTTP answer into ok / retry / fatal / halt, with a reason a human can act on."""
    try:
      # From str: json.loads(bytes) first runs a pure-Python encoding sniff.
      body = json.loads(raw.decode("utf-8", "replace")) if raw else None
    except ValueError:
      body = None
    if status == 200:
      if not isinstance(body, dict):
        return Verdict("retry", f"malformed JSON in a 200 answer ({len(raw)} bytes)")
      if body.get("error") or body.get("object") == "error":
        # OpenRouter and gateways report failures after generation started as a 200.
        return Verdict("retry", f"200 with an error body: {error_message(body, raw)}")
      return Verdict("ok", body=body)
    msg = error_message(body, raw)
    where = f"{self.name} {self.model} HTTP {status}"
    if status == 400:
      if _PREFILL_PAT.search(msg):
        return Verdict(
          "halt",
          f"{where}: the API refused the prefill ({msg}). Use a model that accepts assistant "
          "prefill, or backend openai_chat with chat_mode='instructed' and allow_approximate=True.",
          capability="prefill",
        )
      if _SAMPLES_PAT.search(msg):
        return Verdict(
          "halt", f"{where}: several samples per request refused ({msg}).", capability="samples"
        )
      if _TEMPERATURE_PAT.search(msg) and re.search(r"not support|remove|unsupported", msg, re.I):
        return Verdict(
          "halt",
          f"{where}: the model refuses `temperature` ({msg}); Monte Carlo sampling at a set "
          "temperature is impossible with it. Pick another teacher model.",
          capability="temperature",
        )
    if status == 402 or (status == 429 and _SPEND_PAT.search(msg)):
      return Verdict("halt", f"{where}: spend limit or credits exhausted ({msg}); not retried.")
    if status in (401, 403):
      return Verdict("halt", f"{where}: not authorised ({msg}); check the key in api_key_env.")
    if status == 404:
      return Verdict("halt", f"{where}: not found ({msg}); is the model retired or base_url wrong?")
    if status == 429 or status == 529:
      after = retry_after_seconds(headers, body)
      return Verdict("retry", f"{where}: {msg}", after, rate_limited=True, status=status)
    if status in (408, 409) or status >= 500:
      return Verdict("retry", f"{where}: {msg}", retry_after_s=retry_after_seconds(headers, body))
    return Verdict("fatal", f"{where}: {msg}")


def _usage_shares(call: HttpCall, tokens_in: int, tokens_out: int, outs: list[int] | None):
  k = len(call.slots)
  ins = split_evenly(tokens_in, k)
  if outs is None or sum(outs) != tokens_out:
    outs = split_evenly(tokens_out, k)
  return ins, outs


def _sample(text: Any, finish: Any, mode: str, t_in: int, t_out: int, ids=None) -> Sample:
  if not isinstance(text, str):
    # Not a string (null, a number): a broken answer, asked for again like a missing one.
    return failure(f"finish_reason={finish}, text {MISSING}", mode, t_in, t_out)
  if not text:
    return failure(f"empty continuation (finish_reason={finish})", mode, t_in, t_out)
  ids = tuple(ids) if isinstance(ids, list) else None
  return Sample(text, None, finish, ids, t_in, t_out, mode)


class OpenAICompletions(Backend):
  """vLLM / SGLang / our `serve`: POST /completions with text or token-id prompts, `n`, `seed`.

  Choices come back flattened, index = prompt_index * n + sample_index (vLLM's convention).
  """

  name = "openai_completions"
  default_base_url = "http://127.0.0.1:8000/v1"

  def default_mode(self) -> str:
    return "raw"

  def default_caps(self) -> Capabilities:
    return Capabilities(64, 16, True, True, True, 2.0)

  def validate(self, req: TeacherRequest) -> None:
    if req.prefix_text is None and req.prefix_token_ids is None:
      raise ValueError(f"{self.name}: request {req.key!r} needs prefix_token_ids or prefix_text.")

  def build(self, reqs, n, seed):
    prompts = [
      list(r.prefix_token_ids) if r.prefix_token_ids is not None else r.prefix_text for r in reqs
    ]
    r0 = reqs[0]
    payload = {
      "model": self.model,
      "prompt": prompts[0] if len(prompts) == 1 else prompts,
      "n": n,
      "max_tokens": r0.max_tokens,  # vLLM's default is 16: always set it
      "temperature": r0.temperature,
    }
    if seed is not None:
      payload["seed"] = seed
    if r0.stop:
      payload["stop"] = list(r0.stop)
    return payload, "/completions", ()

  def parse(self, call, body):
    choices = body.get("choices")
    if not isinstance(choices, list):
      raise MalformedResponse("no `choices` list")
    usage = body.get("usage") or {}
    if len(call.slots) == 1 and len(choices) == 1 and isinstance(choices[0], dict):  # fast path
      c = choices[0]
      ids = c.get("token_ids")
      return [_sample(c.get("text"), c.get("finish_reason"), call.mode, usage.get("prompt_tokens", 0),
                      usage.get("completion_tokens", 0), ids)]  # fmt: skip
    by_index = {c.get("index", j): c for j, c in enumerate(choices) if isinstance(c, dict)}
    ordered = [by_index.get(j) for j in range(len(call.slots))]
    outs = [
      len(c["token_ids"]) if c and isinstance(c.get("token_ids"), list) else -1 for c in ordered
    ]
    ins, outs = _usage_shares(
      call,
      usage.get("prompt_tokens", 0),
      usage.get("completion_tokens", 0),
      None if -1 in outs else outs,
    )
    samples = []
    for j, c in enumerate(ordered):
      if c is None:
        samples.append(failure(f"choice {j} {MISSING}", call.mode, ins[j], outs[j]))
      else:
        samples.append(
          _sample(
            c.get("text"), c.get("finish_reason"), call.mode, ins[j], outs[j], c.get("token_ids")
          )
        )
    return samples


_INSTRUCTION = (
  "Below is a problem and the beginning of a solution. Continue the solution from exactly where it "
  "stops. Output only the continuation, starting mid-sentence if needed; do not repeat any of the "
  "given text and add no preamble."
)
_PREAMBLE = re.compile(r"^\s*(continuing|continuation|here is the continuation)[^\n:]*:\s*", re.I)


def clean_instructed(text: str, prefix: str) -> str:
  """Post-processes an instructed continuation: drops a preamble, a wrapping code fence and any
  repeat of the prefix's tail (the longest overlap of at least 8 characters)."""
  text = _PREAMBLE.sub("", text, count=1)
  fence = re.fullmatch(r"\s*```[^\n]*\n(.*?)\n?```\s*", text, re.S)
  if fence:
    text = fence.group(1)
  for k in range(min(len(prefix), len(text)), 7, -1):
    if text.startswith(prefix[-k:]):
      return text[k:]
  return text


class OpenAIChat(Backend):
  """OpenAI-compatible chat. chat_mode: "continue_final_message" (vLLM/SGLang prefill),
  "trailing_assistant" (gateways such as OpenRouter pass a trailing assistant turn through), or
  "instructed" (OpenAI proper: approximate, the prefix goes in the user turn)."""

  name = "openai_chat"
  default_base_url = "http://127.0.0.1:8000/v1"
  chat_modes = ("continue_final_message", "trailing_assistant", INSTRUCTED)

  def __init__(self, *args, chat_mode: str = "continue_final_message", **kwargs):
    super().__init__(*args, **kwargs)
    self.set_chat_mode(chat_mode)

  def set_chat_mode(self, chat_mode: str) -> None:
    if chat_mode not in self.chat_modes:
      raise ValueError(f"openai_chat: chat_mode {chat_mode!r} not in {self.chat_modes}.")
    self.chat_mode = chat_mode
    self.mode = INSTRUCTED if chat_mode == INSTRUCTED else "prefill"
    self.caps = dataclasses.replace(self.caps, prefill=chat_mode != INSTRUCTED)

  def default_caps(self) -> Capabilities:
    return Capabilities(16, 1, True, False, True, 2.0)

  def build(self, reqs, n, seed):
    r = reqs[0]
    messages = [{"role": "system", "content": r.system}] if r.system else []
    payload = {
      "model": self.model,
      "n": n,
      "max_tokens": r.max_tokens,
      "temperature": r.temperature,
    }
    if self.chat_mode == INSTRUCTED:
      user = f"{_INSTRUCTION}\n\nProblem:\n{r.problem}\n\nSolution so far:\n{r.prefix_text}"
      messages.append({"role": "user", "content": user})
    else:
      messages.append({"role": "user", "content": r.problem})
      messages.append({"role": "assistant", "content": r.prefix_text})
      if self.chat_mode == "continue_final_message":
        payload["continue_final_message"] = True
        payload["add_generation_prompt"] = False  # defaults to true and conflicts with the above
    payload["messages"] = messages
    if seed is not None:
      payload["seed"] = seed
    if r.stop:
      payload["stop"] = list(r.stop)
    return payload, "/chat/completions", (r.prefix_text,)

  def parse(self, call, body):
    choices = body.get("choices")
    if not isinstance(choices, list):
      raise MalformedResponse("no `choices` list")
    by_index = {c.get("index", j): c for j, c in enumerate(choices) if isinstance(c, dict)}
    usage = body.get("usage") or {}
    ins, outs = _usage_shares(
      call, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), None
    )
    samples = []
    for j in range(len(call.slots)):
      c = by_index.get(j)
      if c is None:
        samples.append(failure(f"choice {j} {MISSING}", call.mode, ins[j], outs[j]))
        continue
      text = (c.get("message") or {}).get("content")
      if isinstance(text, str) and call.mode == INSTRUCTED:
        text = clean_instructed(text, call.context[0])
      samples.append(_sample(text, c.get("finish_reason"), call.mode, ins[j], outs[j]))
    return samples


class Anthropic(Backend):
  """Anthropic Messages with assistant prefill; no `n`, so one request per sample.

  The prefill may not end in whitespace: it is stripped before sending and the same whitespace is
  dropped from the front of the continuation, so `prefix_text + text` reads as the teacher wrote it.
  """

  name = "anthropic"
  default_base_url = "https://api.anthropic.com/v1"

  def __init__(self, *args, anthropic_version: str = "2023-06-01", **kwargs):
    super().__init__(*args, **kwargs)
    self.anthropic_version = anthropic_version

  def default_caps(self) -> Capabilities:
    return Capabilities(1, 1, True, False, False, 1.0)

  def auth_headers(self):
    headers = {"anthropic-version": self.anthropic_version}
    if self._api_key:
      headers["x-api-key"] = self._api_key
    return headers

  def build(self, reqs, n, seed):
    r = reqs[0]
    prefill = r.prefix_text.rstrip()
    messages = [{"role": "user", "content": r.problem}]
    if prefill:
      messages.append({"role": "assistant", "content": prefill})
    # Only temperature (Haiku 4.5 returns 400 when both temperature and top_p are set).
    payload = {
      "model": self.model,
      "max_tokens": r.max_tokens,
      "temperature": r.temperature,
      "messages": messages,
    }
    if r.system:
      payload["system"] = r.system
    if r.stop:
      payload["stop_sequences"] = list(r.stop)
    return payload, "/messages", (r.prefix_text[len(prefill) :],)

  def parse(self, call, body):
    content = body.get("content")
    if not isinstance(content, list):
      raise MalformedResponse("no `content` list")
    usage = body.get("usage") or {}
    t_in = sum(
      int(usage.get(k) or 0)
      for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    t_out = int(usage.get("output_tokens") or 0)
    stop = body.get("stop_reason")
    if stop == "refusal":
      return [failure("teacher refused (stop_reason=refusal)", call.mode, t_in, t_out)]
    text = "".join(
      b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
    )
    stripped = call.context[0]
    k = 0
    while k < min(len(stripped), len(text)) and text[k] == stripped[k]:
      k += 1
    return [_sample(text[k:], stop, call.mode, t_in, t_out)]

  def classify(self, status, headers, raw):
    verdict = super().classify(status, headers, raw)
    if status == 200 and verdict.kind == "ok" and verdict.body.get("type") == "error":
      return Verdict("retry", f"200 with an error body: {error_message(verdict.body, raw)}")
    return verdict


class Gemini(Backend):
  """Gemini generateContent with a trailing `model` turn (prefill), `candidateCount` samples per
  request and thinking disabled (thinking tokens are billed and eat `maxOutputTokens`)."""

  name = "gemini"
  default_base_url = "https://generativelanguage.googleapis.com/v1beta"

  def __init__(self, *args, thinking_budget: int | None = 0, **kwargs):
    super().__init__(*args, **kwargs)
    self.thinking_budget = thinking_budget

  def default_caps(self) -> Capabilities:
    return Capabilities(8, 1, True, False, True, 2.0)

  def auth_headers(self):
    return {"x-goog-api-key": self._api_key} if self._api_key else {}  # header, never the URL

  def build(self, reqs, n, seed):
    r = reqs[0]
    contents = [{"role": "user", "parts": [{"text": r.problem}]}]
    if r.prefix_text:
      contents.append({"role": "model", "parts": [{"text": r.prefix_text}]})
    config = {"candidateCount": n, "maxOutputTokens": r.max_tokens, "temperature": r.temperature}
    if seed is not None:
      config["seed"] = seed
    if r.stop:
      config["stopSequences"] = list(r.stop)[:5]
    if self.thinking_budget is not None:
      config["thinkingConfig"] = {"thinkingBudget": self.thinking_budget}
    payload = {"contents": contents, "generationConfig": config}
    if r.system:
      payload["systemInstruction"] = {"parts": [{"text": r.system}]}
    return payload, f"/models/{self.model}:generateContent", ()

  def parse(self, call, body):
    usage = body.get("usageMetadata") or {}
    t_out = int(usage.get("candidatesTokenCount") or 0) + int(usage.get("thoughtsTokenCount") or 0)
    ins, outs = _usage_shares(call, int(usage.get("promptTokenCount") or 0), t_out, None)
    candidates = body.get("candidates")
    if not isinstance(candidates, list):
      block = (body.get("promptFeedback") or {}).get("blockReason")
      if block:
        return [
          failure(f"prompt blocked ({block})", call.mode, ins[j], outs[j]) for j in range(len(ins))
        ]
      raise MalformedResponse("no `candidates` list")
    by_index = {c.get("index", j): c for j, c in enumerate(candidates) if isinstance(c, dict)}
    samples = []
    for j in range(len(call.slots)):
      c = by_index.get(j)
      if c is None:
        samples.append(failure(f"candidate {j} {MISSING}", call.mode, ins[j], outs[j]))
        continue
      finish = c.get("finishReason")
      if finish in ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "OTHER"):
        samples.append(failure(f"filtered (finishReason={finish})", call.mode, ins[j], outs[j]))
        continue
      parts = (c.get("content") or {}).get("parts") or []
      text = "".join(
        p.get("text", "") for p in parts if isinstance(p, dict) and not p.get("thought")
      )
      samples.append(_sample(text, finish, call.mode, ins[j], outs[j]))
    return samples


BACKENDS: dict[str, type[Backend]] = {
  b.name: b for b in (OpenAICompletions, OpenAIChat, Anthropic, Gemini)
}


def register_backend(cls: type[Backend]) -> type[Backend]:
  """Adds a backend (e.g. `local`, the in-process sampler). A backend without HTTP defines
  `async send(call, data) -> (status, headers, body_bytes)` and speaks its own wire format there;
  the client's retries, accounting and cache then work unchanged."""
  BACKENDS[cls.name] = cls
  return cls


def make_backend(name: str, **kwargs) -> Backend:
  """Builds a backend by config name (`local` is added with register_backend)."""
  if name not in BACKENDS:
    raise ValueError(
      f"unknown teacher backend {name!r}; choose one of {sorted(BACKENDS)} "
      "(or `local`, which TeacherClient.from_config builds from model_path)."
    )
  return BACKENDS[name](**kwargs)
