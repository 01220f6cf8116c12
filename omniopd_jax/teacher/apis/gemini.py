"""Gemini generateContent with a trailing model turn and candidateCount."""

from omniopd_jax.teacher.apis.base import Backend
from omniopd_jax.teacher.wire import (
  MISSING,
  Capabilities,
  MalformedResponse,
  empty_answer,
  failure,
  parsed_sample,
  usage_shares,
)


class Gemini(Backend):
  """Gemini generateContent with a trailing `model` turn (prefill), `candidateCount` samples per
  request and thinking disabled (thinking tokens are billed and eat `maxOutputTokens`)."""

  name = "gemini"
  config_fields = ("thinking_budget",)
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
    ins, outs = usage_shares(call, int(usage.get("promptTokenCount") or 0), t_out, None)
    candidates = body.get("candidates")
    if not isinstance(candidates, list):
      block = (body.get("promptFeedback") or {}).get("blockReason")
      if block:
        return [
          empty_answer(f"prompt blocked ({block})", call.mode, ins[j], outs[j])
          for j in range(len(ins))
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
        samples.append(
          empty_answer(f"filtered (finishReason={finish})", call.mode, ins[j], outs[j], finish)
        )
        continue
      parts = (c.get("content") or {}).get("parts") or []
      text = "".join(
        p.get("text", "") for p in parts if isinstance(p, dict) and not p.get("thought")
      )
      samples.append(parsed_sample(text, finish, call.mode, ins[j], outs[j]))
    return samples
