"""OpenAI-compatible /v1/completions (vLLM, SGLang, our own server)."""

from omniopd_jax.teacher.apis.base import Backend
from omniopd_jax.teacher.wire import (
  MISSING,
  Capabilities,
  MalformedResponse,
  TeacherRequest,
  failure,
  parsed_sample,
  usage_shares,
)


class OpenAICompletions(Backend):
  """vLLM / SGLang / our `serve`: POST /completions with text or token-id prompts, `n`, `seed`.

  Choices come back flattened, index = prompt_index * n + sample_index (vLLM's convention).
  """

  name = "openai_completions"
  default_base_url = "http://127.0.0.1:8000/v1"
  template_tokens = 8  # a text prompt gets at most a BOS or so

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
      return [parsed_sample(c.get("text"), c.get("finish_reason"), call.mode, usage.get("prompt_tokens", 0),
                      usage.get("completion_tokens", 0), ids)]  # fmt: skip
    by_index = {c.get("index", j): c for j, c in enumerate(choices) if isinstance(c, dict)}
    ordered = [by_index.get(j) for j in range(len(call.slots))]
    outs = [
      len(c["token_ids"]) if c and isinstance(c.get("token_ids"), list) else -1 for c in ordered
    ]
    ins, outs = usage_shares(
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
          parsed_sample(
            c.get("text"), c.get("finish_reason"), call.mode, ins[j], outs[j], c.get("token_ids")
          )
        )
    return samples
