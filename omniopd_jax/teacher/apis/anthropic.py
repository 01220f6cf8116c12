"""Anthropic Messages with assistant prefill."""

from omniopd_jax.teacher.apis.base import Backend
from omniopd_jax.teacher.wire import (
  Capabilities,
  MalformedResponse,
  Verdict,
  empty_answer,
  error_message,
  parsed_sample,
)


class Anthropic(Backend):
  """Anthropic Messages with assistant prefill; no `n`, so one request per sample.

  The prefill may not end in whitespace: it is stripped before sending and the same whitespace is
  dropped from the front of the continuation, so `prefix_text + text` reads as the teacher wrote it.
  """

  name = "anthropic"
  config_fields = ("anthropic_version",)
  public_headers = ("anthropic-version",)
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
      return [empty_answer("teacher refused (stop_reason=refusal)", call.mode, t_in, t_out, stop)]
    text = "".join(
      b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
    )
    stripped = call.context[0]
    k = 0
    while k < min(len(stripped), len(text)) and text[k] == stripped[k]:
      k += 1
    return [parsed_sample(text[k:], stop, call.mode, t_in, t_out)]

  def classify(self, status, headers, raw):
    verdict = super().classify(status, headers, raw)
    if status == 200 and verdict.kind == "ok" and verdict.body.get("type") == "error":
      return Verdict("retry", f"200 with an error body: {error_message(verdict.body, raw)}")
    return verdict
