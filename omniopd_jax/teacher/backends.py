"""The registry of teacher APIs: config name -> Backend class (one module each under `apis/`).

Every backend, the in-process `local` one included, is an entry here; `local` is named by its
import path so that building an HTTP client never imports JAX. The wire types are re-exported so
that `from omniopd_jax.teacher import backends as tb; tb.TeacherRequest(...)` keeps reading well.
"""

import importlib

from omniopd_jax.teacher.apis.anthropic import Anthropic
from omniopd_jax.teacher.apis.base import Backend
from omniopd_jax.teacher.apis.gemini import Gemini
from omniopd_jax.teacher.apis.openai_chat import OpenAIChat, clean_instructed
from omniopd_jax.teacher.apis.openai_completions import OpenAICompletions
from omniopd_jax.teacher.wire import (
  INSTRUCTED,
  MISSING,
  Capabilities,
  HttpCall,
  MalformedResponse,
  Sample,
  TeacherRequest,
  Verdict,
  error_message,
  estimate_tokens,
  failure,
  retry_after_seconds,
  split_evenly,
)

__all__ = [
  "INSTRUCTED", "MISSING", "Anthropic", "Backend", "Capabilities", "Gemini", "HttpCall",
  "MalformedResponse", "OpenAIChat", "OpenAICompletions", "Sample", "TeacherRequest", "Verdict",
  "backend_class", "clean_instructed", "error_message", "estimate_tokens", "failure",
  "make_backend", "register_backend", "retry_after_seconds", "split_evenly",
]  # fmt: skip

# name -> Backend class, or "module:Class" imported on first use.
BACKENDS: dict[str, type[Backend] | str] = {
  b.name: b for b in (OpenAICompletions, OpenAIChat, Anthropic, Gemini)
}
BACKENDS["local"] = "omniopd_jax.teacher.local:LocalBackend"  # pulls in the sampler and JAX


def register_backend(cls: type[Backend]) -> type[Backend]:
  """Adds a backend under `cls.name`. A backend without HTTP defines
  `async send(call, data) -> (status, headers, body_bytes)` and speaks its own wire format there;
  the client's retries, accounting and cache then work unchanged."""
  BACKENDS[cls.name] = cls
  return cls


def backend_class(name: str) -> type[Backend]:
  """The Backend class registered as `name` (imported on first use)."""
  if name not in BACKENDS:
    raise ValueError(f"unknown teacher backend {name!r}; choose one of {sorted(BACKENDS)}.")
  entry = BACKENDS[name]
  if isinstance(entry, str):
    module, attr = entry.split(":")
    entry = BACKENDS[name] = getattr(importlib.import_module(module), attr)
  return entry


def make_backend(name: str, **kwargs) -> Backend:
  """Builds a backend by config name with its constructor's keyword arguments."""
  return backend_class(name)(**kwargs)
