"""OpenAI's chat-completions protocol for the local engine: messages rendered with the served
model's chat template (off the event loop), then sampled like a completion; `n`, `seed`, `stop`,
`logprobs` / `top_logprobs`, and vLLM's `add_generation_prompt` / `continue_final_message` (an
assistant prefill, which the `openai_chat` teacher backend sends)."""

import asyncio
import time
import uuid

from omniopd_jax.teacher import engine, protocol
from omniopd_jax.teacher.protocol import BadRequest, Limits, field

ROLES = ("system", "developer", "user", "assistant")


def message_text(i: int, message) -> tuple[str, str]:
  """(role, text) of one message; content is a string or a list of text parts."""
  if not isinstance(message, dict) or message.get("role") not in ROLES:
    raise BadRequest(f"messages[{i}] must be an object with a role in {list(ROLES)}", "messages")
  content = message.get("content")
  if isinstance(content, list):
    parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
      raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
    content = "".join(parts)
  if not isinstance(content, str):
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
  return message["role"], content


def parse_messages(body, teacher, limits: Limits) -> list[dict]:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise BadRequest("`messages` must be a non-empty list", "messages")
  out = [dict(zip(("role", "content"), message_text(i, m))) for i, m in enumerate(messages)]
  chars, limit = sum(len(m["content"]) for m in out), protocol.prompt_char_limit(teacher, limits)
  if chars > limit:
    raise protocol.too_long(0, chars, limit)
  return out


def render(teacher, messages, add_generation_prompt: bool, continue_final: bool) -> tuple:
  """The token ids of the chat template applied to `messages` (a worker thread runs this)."""
  tokenizer = teacher.tokenizer
  if not getattr(tokenizer, "chat_template", None):
    raise BadRequest(f"model {teacher.name} has no chat template; use /v1/completions", None)
  text = tokenizer.apply_chat_template(
    messages,
    tokenize=False,
    add_generation_prompt=add_generation_prompt,
    continue_final_message=continue_final,
  )
  return teacher.tokenize(text, add_special_tokens=False)  # the template holds the specials


async def parse_chat(body, teacher, limits: Limits) -> tuple[engine.Job, dict]:
  """A /v1/chat/completions JSON body -> (Job, response options). Raises BadRequest."""
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object", None)
  protocol.check_model(body, teacher, limits)
  if body.get("tools") or body.get("functions"):
    raise BadRequest("tools are not supported by this server; leave them unset", "tools")
  key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  options = protocol.sampling_options(body, teacher, limits, max_tokens_key=key)
  if options["max_tokens"] == 0:
    raise BadRequest(f"`{key}` must be at least 1", key)
  want = field(body, "logprobs", bool, False, None, "true or false")
  limit = engine.MAX_LOGPROBS
  top = field(
    body, "top_logprobs", int, 0, lambda v: 0 <= v <= limit, f"an integer in [0, {limit}]"
  )
  if top and not want:
    raise BadRequest("`top_logprobs` needs `logprobs`: true", "top_logprobs")
  add_gen = field(body, "add_generation_prompt", bool, True, None, "true or false")
  continue_final = field(body, "continue_final_message", bool, False, None, "true or false")
  messages = parse_messages(body, teacher, limits)
  if continue_final and (add_gen and "add_generation_prompt" in body):
    raise BadRequest(
      "`continue_final_message` and `add_generation_prompt` cannot both be true", "messages"
    )
  if continue_final and messages[-1]["role"] != "assistant":
    raise BadRequest("`continue_final_message` needs a final assistant message", "messages")
  protocol.check_rows(1, options["n"], limits)
  ids = await asyncio.to_thread(
    render, teacher, messages, add_gen and not continue_final, continue_final
  )
  params = engine.SamplingParams(**options, logprobs=top if want else None)
  job = protocol.checked_job(teacher, engine.Job((ids,), params))
  return job, {"top_logprobs": top}


def chat_logprobs(choice: engine.Choice, top: int) -> dict | None:
  """OpenAI's chat logprobs object from the engine's completions-style one."""
  lp = choice.logprobs
  if lp is None:
    return None
  content = []
  for token, value, alternatives in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
    best = sorted((alternatives or {}).items(), key=lambda kv: -kv[1])[:top]
    content.append({
      "token": token, "logprob": value, "bytes": list(token.encode()),
      "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in best],
    })  # fmt: skip
  return {"content": content}


def chat_response(job, choices, model_name: str, top_logprobs: int) -> dict:
  """The /v1/chat/completions answer: one choice per sample, in order."""
  out = [
    {
      "index": i,
      "message": {"role": "assistant", "content": c.text},
      "logprobs": chat_logprobs(c, top_logprobs),
      "finish_reason": c.finish_reason,
      "stop_reason": c.stop_reason,
    }
    for i, c in enumerate(choices)
  ]
  return {
    "id": f"chatcmpl-{uuid.uuid4().hex}",
    "object": "chat.completion",
    "created": int(time.time()),
    "model": model_name,
    "choices": out,
    "usage": protocol.usage(job, choices),
  }


async def handle_chat(body, teacher, batcher, limits: Limits | None = None):
  """(HTTP status, JSON body) answering one /v1/chat/completions body."""
  return await protocol.answer(parse_chat, chat_response, body, teacher, batcher, limits)
