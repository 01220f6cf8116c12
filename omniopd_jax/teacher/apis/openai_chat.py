"""OpenAI-compatible chat: prefill where the server allows it, else the approximate "instructed" mode."""

import dataclasses
import re

from omniopd_jax.teacher.apis.base import Backend
from omniopd_jax.teacher.wire import (
  INSTRUCTED,
  MISSING,
  Capabilities,
  MalformedResponse,
  failure,
  parsed_sample,
  usage_shares,
)

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
  config_fields = ("chat_mode",)
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
    ins, outs = usage_shares(
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
      samples.append(parsed_sample(text, c.get("finish_reason"), call.mode, ins[j], outs[j]))
    return samples
