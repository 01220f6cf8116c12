"""What the teacher client raises. A train loop catches `TeacherHalted` to stop the run."""

# Why a client halts (TeacherHalted.kind).
HALT_KINDS = (
  "auth", "spend_limit", "not_found", "capability", "budget", "unreachable", "refused", "stopped"
)  # fmt: skip


class TeacherError(RuntimeError):
  """The teacher cannot be used as configured (auth, unknown model, unusable probe answer)."""


class TeacherCapabilityError(TeacherError):
  """The teacher refuses something the method needs (prefill, temperature) or an approximate
  mode was found while the config does not allow it."""


class TeacherHalted(TeacherError):
  """The client stopped sending for good; every later request fails at once.

  `kind`: "auth" (401/403), "spend_limit" (402, or a 429 naming a spend limit or credits),
  "not_found" (404: model or base_url), "capability" (the API refuses prefill, temperature or
  several samples), "budget" (teacher.budget_usd reached), "unreachable" (teacher.
  halt_after_failed_calls calls in a row gave up after their retries: server down or unusable),
  "refused" (any other halting answer), "stopped" (the caller's TeacherClient.halt, e.g. on
  SIGTERM). `cause`: the reason, secrets scrubbed.
  """

  def __init__(self, kind: str, cause: str):
    super().__init__(f"teacher halted ({kind}): {cause}")
    self.kind, self.cause = kind, cause


def halt_kind(status: int, capability: str | None) -> str:
  """The TeacherHalted kind of a halting HTTP answer."""
  if capability:
    return "capability"
  if status in (401, 403):
    return "auth"
  if status in (402, 429):
    return "spend_limit"
  if status == 404:
    return "not_found"
  return "refused"
