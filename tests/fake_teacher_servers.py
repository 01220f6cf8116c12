"""Fake teacher APIs on 127.0.0.1 (tests and bench): OpenAI completions/chat, Anthropic Messages and
Gemini generateContent wire formats, with scripted and seeded random faults.

Scripted faults: put `[[fault:429,500]]` anywhere in a prompt and the 1st and 2nd attempts of that
exact body get a 429 and a 500; later attempts succeed. Random faults: `fault_rate` of attempts fail,
chosen by hash(seed, body, attempt), so the same body meets the same faults in any arrival order.
Run standalone (bench): `python tests/fake_teacher_servers.py [--fault-rate 0.1] [--seeded]
[--latency-s 0.3]` prints `PORT=<n>`.
"""

import argparse
import asyncio
import collections
import hashlib
import json
import random
import re
import threading
import time

from aiohttp import web

FAULTS = (
  "429",
  "429ms",
  "500",
  "503",
  "529",
  "timeout",
  "slow",
  "malformed",
  "reset",
  "error200",
  "partial",
)
PERMANENT = ("400", "401", "spend")
_DIRECTIVE = re.compile(rb"\[\[fault:([a-z0-9,]+)\]\]")


def _json(obj, status=200, headers=None):
  body = json.dumps(obj).encode()
  return web.Response(body=body, status=status, headers=headers, content_type="application/json")


class FakeTeacher:
  """One aiohttp app speaking every wire format, with fault injection and a request log.

  Model names select real-world refusals: anthropic `*-4-6` (no prefill), `*haiku-5-5` (no
  temperature), gemini
  `gemini-3.6-flash` (no trailing model turn), `gemini-3.5-flash` (no candidateCount > 1), openai
  chat `gpt-4o` (rejects continue_final_message).
  """

  def __init__(
    self,
    fault_rate: float = 0.0,
    faults: tuple[str, ...] = FAULTS,
    seed: int = 0,
    api_key: str | None = None,
    hang_s: float = 1.0,
    slow_s: float = 0.05,
    retry_after_ms: int = 10,
    log_size: int = 10000,
    echo_key: bool = False,
    bill_worst_case: bool = False,
    seeded: bool = False,
    latency_s: float = 0.0,
  ):
    self.fault_rate, self.faults, self.seed = fault_rate, faults, seed
    self.api_key, self.hang_s, self.slow_s, self.retry_after_ms = (
      api_key,
      hang_s,
      slow_s,
      retry_after_ms,
    )
    self.log: collections.deque = collections.deque(maxlen=log_size)  # bounded
    # completions usage at the most a client may assume: a token per prompt byte, max_tokens out
    self.bill_worst_case = bill_worst_case
    # completions as a seeded server samples: a pure function of (prompt, seed, n, sample index);
    # a prompt holding "[[empties]]" gets some empty continuations (finish_reason "stop")
    self.seeded = seeded
    self.latency_s = latency_s  # every answer waits this long (a slow teacher; bench, overlap)
    self.echo_key = echo_key  # error bodies quote the credentials received, as careless gateways do
    self.billed = {"tokens_in": 0, "tokens_out": 0, "ok": 0}
    self.attempts: dict[bytes, int] = {}
    self.counter = 0

  def app(self) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/completions", self._wrap(self.completions))
    app.router.add_post("/v1/chat/completions", self._wrap(self.chat))
    app.router.add_post("/v1/messages", self._wrap(self.messages))
    app.router.add_post("/v1beta/models/{model}:generateContent", self._wrap(self.gemini))
    app.router.add_get("/health", lambda r: web.Response(text="ok"))
    return app

  def _fault_for(self, raw: bytes) -> str | None:
    key = hashlib.sha1(raw).digest()
    attempt = self.attempts.get(key, 0)
    self.attempts[key] = attempt + 1
    m = _DIRECTIVE.search(raw)
    if m:
      script = m.group(1).decode().split(",")
      return script[attempt] if attempt < len(script) and script[attempt] != "ok" else None
    if self.fault_rate:
      rng = random.Random(f"{self.seed}:{key.hex()}:{attempt}")
      if rng.random() < self.fault_rate:
        return rng.choice(self.faults)
    return None

  def _wrap(self, handler):
    async def echoing(request: web.Request):
      resp = await wrapped(request)
      if not self.echo_key or resp.status < 400 or not isinstance(resp, web.Response):
        return resp
      body = json.loads(resp.body)
      error = body["error"] if isinstance(body.get("error"), dict) else body
      creds = {k: request.headers.get(k) for k in ("Authorization", "x-api-key", "x-goog-api-key")}
      error["message"] = f"{error.get('message')}; you sent {creds}"
      return _json(body, resp.status, {k: v for k, v in resp.headers.items() if "etry" in k})

    async def wrapped(request: web.Request):
      raw = await request.read()
      fault = self._fault_for(raw)
      self.log.append(
        {
          "path": request.path,
          "body": raw,
          "headers": dict(request.headers),
          "t": time.monotonic(),
          "fault": fault,
        }
      )
      if self.api_key and self.api_key not in (
        request.headers.get("Authorization", "").removeprefix("Bearer "),
        request.headers.get("x-api-key"),
        request.headers.get("x-goog-api-key"),
      ):
        return _json(
          {"error": {"type": "authentication_error", "message": "invalid x-api-key"}}, 401
        )
      if self.latency_s:
        await asyncio.sleep(self.latency_s)
      if fault:
        early = await self._fault(request, fault)
        if early is not None:
          return early
      try:
        body = json.loads(raw)
      except ValueError:
        return _json(
          {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}}, 400
        )
      result = handler(body, request)
      if isinstance(result, web.StreamResponse):
        return result
      payload, t_in, t_out = result
      for field in ("choices", "candidates"):  # "partial": a 200 that leaves one sample out
        if fault == "partial" and len(payload.get(field) or ()) > 1:
          payload[field] = payload[field][:-1]
      self.billed["tokens_in"] += t_in
      self.billed["tokens_out"] += t_out
      self.billed["ok"] += 1
      if fault == "slow":  # headers now, the body in slow pieces (bounded: 4 pieces)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        data = json.dumps(payload).encode()
        step = len(data) // 4 + 1
        try:
          await resp.prepare(request)
          for i in range(0, len(data), step):
            await resp.write(data[i : i + step])
            await asyncio.sleep(self.slow_s / 4)
          await resp.write_eof()
        except ConnectionError:  # the client gave up waiting: that is its right
          pass
        return resp
      return _json(payload)

    return echoing

  async def _fault(self, request: web.Request, fault: str):
    err = lambda t, m: {"type": "error", "error": {"type": t, "message": m}}
    if fault == "429":
      return _json(err("rate_limit_error", "rate limited"), 429, {"Retry-After": "0"})
    if fault == "429ms":
      return _json(
        err("rate_limit_error", "rate limited"), 429, {"retry-after-ms": str(self.retry_after_ms)}
      )
    if fault == "429bare":
      return _json(err("rate_limit_error", "rate limited"), 429)
    if fault in ("500", "503"):
      return _json(err("api_error", "internal error"), int(fault))
    if fault == "529":
      return _json(err("overloaded_error", "Overloaded"), 529)
    if fault == "timeout":
      await asyncio.sleep(self.hang_s)  # the client gives up first; bounded either way
      return _json(err("timeout_error", "deadline exceeded"), 504)
    if fault == "malformed":
      return web.Response(body=b'{"choices": [{"text": "trunc', content_type="application/json")
    if fault == "reset":
      request.transport.abort()  # no answer at all: the client sees a dropped connection
      return web.Response(status=500)
    if fault == "error200":
      return _json({"error": {"message": "upstream provider error", "code": 502}})
    if fault == "400":
      return _json(err("invalid_request_error", "prompt is too long"), 400)
    if fault == "401":
      return _json(err("authentication_error", "invalid x-api-key"), 401)
    if fault == "spend":
      body = {"type": "error", "error": {"type": "rate_limit_error", "message": "spend limit reached",
                                         "details": {"error_code": "enforced_spend_limit_reached"}}}  # fmt: skip
      return _json(body, 429)
    return None  # "slow", "partial": applied to the answer

  def _seeded_choice(self, prompt, seed, n: int, index: int) -> dict:
    digest = hashlib.sha256(json.dumps([prompt, seed, n, index]).encode()).hexdigest()
    if "[[empties]]" in str(prompt) and digest[0] in "0123":
      return {"text": "", "finish_reason": "stop"}
    return {"text": f" draw-{digest[:10]}", "finish_reason": "length"}

  def _text(self, tail: str, index: int) -> str:
    self.counter += 1
    return f" then{index} after[{tail[-6:]}] #{self.counter}"

  def completions(self, body, request):
    prompt = body.get("prompt")
    prompts = (
      prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    )
    n, max_tokens = int(body.get("n", 1)), int(body.get("max_tokens", 16))  # vLLM's default: 16
    choices, t_out = [], 0
    for p_idx, p in enumerate(prompts):
      tail = str(p[-1]) if isinstance(p, list) else p
      for s in range(n):
        k = min(max_tokens, 5)
        choice = {"index": p_idx * n + s, "text": self._text(tail, s), "finish_reason": "length"}
        if self.seeded:
          choice.update(self._seeded_choice(p, body.get("seed"), n, s))
        if body.get("return_token_ids"):
          choice["token_ids"] = list(range(k))
        choices.append(choice)
        t_out += k
    t_in = sum(len(p) if isinstance(p, list) else len(p) // 4 + 1 for p in prompts)
    if self.bill_worst_case:
      t_in = sum(len(p) if isinstance(p, list) else len(p.encode()) for p in prompts)
      t_out = max_tokens * len(choices)
    random.Random(self.counter).shuffle(choices)  # order is not part of the contract: index is
    usage = {"prompt_tokens": t_in, "completion_tokens": t_out, "total_tokens": t_in + t_out}
    return (
      {"object": "text_completion", "model": body.get("model"), "choices": choices, "usage": usage},
      t_in,
      t_out,
    )

  def chat(self, body, request):
    if body.get("model") == "gpt-4o" and "continue_final_message" in body:
      msg = "Unrecognized request argument supplied: continue_final_message"
      return _json({"error": {"message": msg, "type": "invalid_request_error"}}, 400)
    messages = body["messages"]
    n, max_tokens = int(body.get("n", 1)), int(body.get("max_tokens", 16))
    tail = messages[-1]["content"]
    instructed = messages[-1]["role"] == "user"
    choices = []
    for s in range(n):
      text = self._text(tail, s)
      if instructed:  # chat models like to repeat the end of the prefix and add a preamble
        text = "Continuing: " + tail[-10:] + text
      choices.append(
        {"index": s, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
      )
    t_in = sum(len(m["content"]) // 4 + 1 for m in messages)
    t_out = n * min(max_tokens, 5)
    usage = {"prompt_tokens": t_in, "completion_tokens": t_out}
    return {"object": "chat.completion", "choices": choices, "usage": usage}, t_in, t_out

  def messages(self, body, request):
    err = lambda m: _json(
      {"type": "error", "error": {"type": "invalid_request_error", "message": m}}, 400
    )
    model, messages = body.get("model", ""), body["messages"]
    if "max_tokens" not in body:
      return err("max_tokens: Field required")
    if "temperature" in body and "top_p" in body:
      return err("`temperature` and `top_p` cannot both be specified for this model.")
    if "haiku-5-5" in model and "temperature" in body:
      return err(
        "temperature is not supported for this model. Remove temperature, top_p and top_k."
      )
    last = messages[-1]
    if last["role"] == "assistant":
      if "4-6" in model:
        return err(
          "This model does not support assistant message prefill. The conversation must end with a user message."
        )
      if last["content"] != last["content"].rstrip():
        return err("messages: final assistant content cannot end with trailing whitespace")
    if body.get("temperature", 1.0) > 1.0:
      return err("temperature: range: 0 <= temperature <= 1")
    text = self._text(last["content"], 0)
    t_in = sum(len(m["content"]) // 4 + 1 for m in messages) + len(body.get("system", "")) // 4
    t_out = min(body["max_tokens"], 5)
    usage = {"input_tokens": t_in, "output_tokens": t_out, "cache_read_input_tokens": 0}
    answer = {"id": f"msg_{self.counter}", "type": "message", "role": "assistant", "stop_reason": "max_tokens",
              "content": [{"type": "text", "text": text}], "usage": usage}  # fmt: skip
    return answer, t_in, t_out

  def gemini(self, body, request):
    model = request.match_info["model"]
    err = lambda m: _json({"error": {"code": 400, "message": m, "status": "INVALID_ARGUMENT"}}, 400)
    contents, config = body["contents"], body.get("generationConfig", {})
    count = int(config.get("candidateCount", 1))
    if contents[-1]["role"] == "model" and model == "gemini-3.6-flash":
      return err("Requests ending with a model turn are not supported.")
    if count > 1 and model == "gemini-3.5-flash":
      return err("Multiple candidates is not enabled for this model")
    if count > 8:
      return err("candidateCount must be in [1, 8]")
    thinking = config.get("thinkingConfig", {}).get("thinkingBudget", -1) != 0
    tail = contents[-1]["parts"][0]["text"]
    candidates = []
    for s in range(count):
      parts = [{"text": self._text(tail, s)}]
      finish = "SAFETY" if "[[unsafe]]" in tail and s == 0 else "MAX_TOKENS"
      candidates.append(
        {"index": s, "content": {"role": "model", "parts": parts}, "finishReason": finish}
      )
    t_in = sum(len(c["parts"][0]["text"]) // 4 + 1 for c in contents)
    t_think = 7 if thinking else 0
    t_out = count * min(int(config.get("maxOutputTokens", 8192)), 5)
    usage = {"promptTokenCount": t_in, "candidatesTokenCount": t_out, "thoughtsTokenCount": t_think}
    return {"candidates": candidates, "usageMetadata": usage}, t_in, t_out + t_think


class ServerThread:
  """Serves a FakeTeacher on 127.0.0.1:<free port> from a background thread (tests)."""

  def __init__(self, teacher: FakeTeacher):
    self.teacher = teacher
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
    self._thread.start()
    self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

  async def _start(self) -> int:
    self._runner = web.AppRunner(self.teacher.app(), access_log=None)
    await self._runner.setup()
    site = web.TCPSite(self._runner, "127.0.0.1", 0)
    await site.start()
    return self._runner.addresses[0][1]

  def url(self, prefix: str = "/v1") -> str:
    return f"http://127.0.0.1:{self.port}{prefix}"

  def close(self):
    asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--fault-rate", type=float, default=0.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seeded", action="store_true", help="completions as a seeded server")
  parser.add_argument("--latency-s", type=float, default=0.0, help="added to every answer")
  args = parser.parse_args()
  teacher = FakeTeacher(fault_rate=args.fault_rate, seed=args.seed, hang_s=0.3, log_size=1,
                        seeded=args.seeded, latency_s=args.latency_s)  # fmt: skip

  async def serve():
    runner = web.AppRunner(teacher.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    print(f"PORT={runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()

  asyncio.run(serve())


if __name__ == "__main__":
  main()
