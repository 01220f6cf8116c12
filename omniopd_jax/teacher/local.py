"""The `local` teacher backend: the local engine in process, answering exactly as our server would.

Also re-exports the engine's request types, so `teacher.local.{Job, LocalTeacher, ...}` keep working.
"""

import json

from omniopd_jax.teacher import engine
from omniopd_jax.teacher.apis.openai_completions import OpenAICompletions
from omniopd_jax.teacher.batcher import Batcher
from omniopd_jax.teacher.engine import (
  MAX_LOGPROBS,
  Choice,
  Job,
  LocalTeacher,
  RequestError,
  SamplingParams,
)
from omniopd_jax.teacher.protocol import handle_completion
from omniopd_jax.teacher.wire import HttpCall

__all__ = ["MAX_LOGPROBS", "Choice", "Job", "LocalBackend", "LocalTeacher", "RequestError",
           "SamplingParams"]  # fmt: skip


class LocalBackend(OpenAICompletions):
  """The `local` teacher backend: a LocalTeacher in process. TeacherClient calls `send` instead of
  HTTP, and it answers exactly as `omniopd_jax.serve` would (same batching, seeds, errors), so the
  client's pacing, cache and accounting apply as for any `openai_completions` server.

    backend = teacher_local.LocalBackend("hf_dir")
    client = teacher_client.TeacherClient(backend, max_tokens=32)
    # or TeacherClient.from_config(dict(backend="local", model_path="hf_dir", ...))
  """

  name = "local"
  config_fields = ("model_path",)

  def __init__(
    self,
    model_path: str,
    model: str | None = None,
    *,
    dtype: str = "float32",
    max_batch: int = 64,
    base_url: str | None = None,  # ignored: nothing goes over the network
    api_key: str | None = None,  # ignored
    **kwargs,
  ):
    del base_url, api_key
    if not model_path:
      raise ValueError("teacher backend `local` needs model_path: an HF model directory.")
    self.teacher = engine.LocalTeacher.from_pretrained(
      model_path, dtype=dtype, name=model, max_batch=max_batch
    )
    self._batcher = None
    super().__init__(model or self.teacher.name, base_url=f"local://{self.teacher.name}", **kwargs)

  async def send(self, call: HttpCall, data: bytes) -> tuple[int, dict, bytes]:
    """(status, headers, body bytes) for one call, on the client's event loop."""
    if self._batcher is None:  # created on the loop that calls send
      self._batcher = Batcher(self.teacher, self.teacher.max_batch)
    status, body = await handle_completion(call.payload, self.teacher, self._batcher)
    return status, {}, json.dumps(body).encode()

  def close(self) -> None:
    if self._batcher is not None:
      self._batcher.close()
      self._batcher = None
