"""Teacher wire types: requests, samples, HTTP calls and verdicts, and the error parsing that every
API shares (error bodies, Retry-After, the refusal patterns). Pure: no I/O.
"""

import dataclasses
import email.utils
import re
import time
from collections.abc import Mapping
from typing import Any

# Result modes: "raw" (completions) and "prefill" are exact continuations; "instructed" is
# approximate (the teacher is asked to continue a text shown in the user turn, so it is not a
# sample of p_teacher(. | prompt, prefix)).
INSTRUCTED = "instructed"
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
  `empty`: the teacher answered, with no usable text (an empty, filtered or refused
  continuation). That is a draw like any other, so it is cached and never asked again (a re-run
  step gets the same outcome), but it is no evidence about a chunk, so it is not `ok`.
  """

  text: str | None
  error: str | None = None
  finish_reason: str | None = None
  token_ids: tuple[int, ...] | None = None
  tokens_in: int = 0
  tokens_out: int = 0
  mode: str = ""
  from_cache: bool = False
  empty: bool = False

  @property
  def ok(self) -> bool:
    return self.error is None

  @property
  def settled(self) -> bool:
    """A draw the teacher made (text or empty), as opposed to a transport failure."""
    return self.error is None or self.empty


def failure(reason: str, mode: str = "", tokens_in: int = 0, tokens_out: int = 0) -> Sample:
  """A sample that did not come back (transport, server error, halt): asked again on a re-run."""
  return Sample(text=None, error=reason, mode=mode, tokens_in=tokens_in, tokens_out=tokens_out)


def empty_answer(reason: str, mode: str = "", tokens_in: int = 0, tokens_out: int = 0, finish=None):
  """A teacher answer with no usable text (see Sample.empty); `reason` says why."""
  return Sample(None, reason, finish, None, tokens_in, tokens_out, mode, False, True)


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
  est_tokens_in: int  # a typical count, for input-token pacing (reconciled from usage)
  max_tokens_out: int  # upper bound on billed output tokens
  max_tokens_in: int  # upper bound on billed input tokens (the budget reserves it)
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
  """Rough token count (4 characters a token) for pacing; never for the budget."""
  return 0 if not text else len(text) // 4 + 1


def max_input_tokens(payload, prompts: int, template_tokens: int) -> int:
  """An upper bound on the input tokens of a text call: one token per UTF-8 byte of every string
  in the payload (a byte-level BPE token holds at least one byte; the strings hold all the text
  sent) plus `template_tokens` per prompt for what the server adds (BOS, chat roles, markers)."""
  return _string_bytes(payload) + prompts * template_tokens


def _string_bytes(value) -> int:
  if isinstance(value, str):
    return len(value.encode("utf-8"))
  if isinstance(value, dict):
    return sum(_string_bytes(v) for v in value.values())
  if isinstance(value, (list, tuple)):
    return sum(_string_bytes(v) for v in value)
  return 0


def split_evenly(total: int, parts: int) -> list[int]:
  """Integer shares of `total` that sum exactly to it (earlier parts take the remainder)."""
  if parts <= 0:
    return []
  base, rem = divmod(max(int(total), 0), parts)
  return [base + (1 if i < rem else 0) for i in range(parts)]


# --------------------------------------------------------------------------------------------
# Error classification shared by all backends.

PREFILL_PAT = re.compile(
  r"prefill|ending with a model turn|final (assistant )?message|continue_final_message"
  r"|conversation must end with a user",
  re.I,
)
TEMPERATURE_PAT = re.compile(r"temperature", re.I)
SAMPLES_PAT = re.compile(r"multiple candidates|candidate_?count|\bn\b must be|'n'", re.I)
SPEND_PAT = re.compile(r"enforced_spend_limit_reached|insufficient_quota|spend limit|credit", re.I)


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


def usage_shares(call: HttpCall, tokens_in: int, tokens_out: int, outs: list[int] | None):
  """Per-slot (input, output) token shares of one call's usage; exact per-choice counts win."""
  k = len(call.slots)
  ins = split_evenly(tokens_in, k)
  if outs is None or sum(outs) != tokens_out:
    outs = split_evenly(tokens_out, k)
  return ins, outs


def parsed_sample(text: Any, finish: Any, mode: str, t_in: int, t_out: int, ids=None) -> Sample:
  """The Sample for one parsed choice: a non-string text is missing, an empty one a failure."""
  if not isinstance(text, str):
    # Not a string (null, a number): a broken answer, asked for again like a missing one.
    return failure(f"finish_reason={finish}, text {MISSING}", mode, t_in, t_out)
  if not text:
    return empty_answer(f"empty continuation (finish_reason={finish})", mode, t_in, t_out, finish)
  ids = tuple(ids) if isinstance(ids, list) else None
  return Sample(text, None, finish, ids, t_in, t_out, mode)
