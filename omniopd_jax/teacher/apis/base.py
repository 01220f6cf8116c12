"""The Backend base class: packing samples into HTTP calls and sorting answers into verdicts.

Each API (openai_completions, openai_chat, anthropic, gemini, local) subclasses it with its own
payload builder and parser; the client's retries, pacing, cache and accounting work on any of them.
"""

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omniopd_jax.teacher import wire
from omniopd_jax.teacher.wire import (
  INSTRUCTED,
  Capabilities,
  HttpCall,
  Sample,
  TeacherRequest,
  Verdict,
  error_message,
  estimate_tokens,
  retry_after_seconds,
)

_encode_json = json.JSONEncoder(separators=(",", ":")).encode  # built once, not per request


class Backend:
  """Base: generic packing and classification; subclasses build payloads and parse answers."""

  name = ""
  default_base_url = ""
  config_fields: tuple[str, ...] = ()  # backend-specific teacher config fields its __init__ takes
  public_headers: tuple[str, ...] = ()  # auth_headers() entries that are not credentials
  template_tokens = 64  # most tokens a server adds around one prompt (chat roles, BOS, system)

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

  def secret_values(self) -> list[str]:
    """The key and every credential header value: never to appear in an error, log or metric."""
    headers = self.auth_headers()
    return [self._api_key or ""] + [v for k, v in headers.items() if k not in self.public_headers]

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

    A request's samples are cut into runs (blocks) of at most `samples_per_request`; runs with
    equal (block start, n, max_tokens, temperature, stop, prompt kind) share a call up to
    `prompts_per_request`.
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
        # The block's first index is in the key: two blocks of one prompt never share a call (one
        # seed per call, so they would repeat each other's draws).
        key = (run[2][0], len(run[2]), req.max_tokens, req.temperature, req.stop,
               req.prefix_token_ids is None)  # fmt: skip
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
    """One HTTP call for `runs`. Its seed is derived from the first run's request seed and the
    first sample index of its block (blocks of samples_per_request are fixed by the request, not
    by which samples are missing), so two calls for one prefix never repeat a seed and a call
    sent again gets the same draws."""
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
    if req0.prefix_token_ids is not None:  # exact: the ids are the prompt
      max_in = sum(len(r.prefix_token_ids) for r in reqs)
    else:
      max_in = wire.max_input_tokens(payload, len(reqs), self.template_tokens)
    max_out = req0.max_tokens * len(slots)
    return HttpCall(path, payload, data, slots, n, est_in, max_out, max_in, self.mode, context)

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
      if wire.PREFILL_PAT.search(msg):
        return Verdict(
          "halt",
          f"{where}: the API refused the prefill ({msg}). Use a model that accepts assistant "
          "prefill, or backend openai_chat with chat_mode='instructed' and allow_approximate=True.",
          capability="prefill",
        )
      if wire.SAMPLES_PAT.search(msg):
        return Verdict(
          "halt", f"{where}: several samples per request refused ({msg}).", capability="samples"
        )
      if wire.TEMPERATURE_PAT.search(msg) and re.search(
        r"not support|remove|unsupported", msg, re.I
      ):
        return Verdict(
          "halt",
          f"{where}: the model refuses `temperature` ({msg}); Monte Carlo sampling at a set "
          "temperature is impossible with it. Pick another teacher model.",
          capability="temperature",
        )
    if status == 402 or (status == 429 and wire.SPEND_PAT.search(msg)):
      return Verdict(
        "halt", f"{where}: spend limit or credits exhausted ({msg}); not retried.", status=status
      )
    if status in (401, 403):
      return Verdict(
        "halt", f"{where}: not authorised ({msg}); check the key in api_key_env.", status=status
      )
    if status == 404:
      return Verdict(
        "halt",
        f"{where}: not found ({msg}); is the model retired or base_url wrong?",
        status=status,
      )
    if status == 429 or status == 529:
      after = retry_after_seconds(headers, body)
      return Verdict("retry", f"{where}: {msg}", after, rate_limited=True, status=status)
    if status in (408, 409) or status >= 500:
      return Verdict("retry", f"{where}: {msg}", retry_after_s=retry_after_seconds(headers, body))
    return Verdict("fatal", f"{where}: {msg}")
