"""config.method -> its Method. Adding a method: one module under methods/, one line here."""

from omniopd_jax.methods import base, grpo, omniopd, opd, sft

METHODS: dict[str, base.Method] = {
  "omniopd": omniopd.METHOD,
  "opd": opd.METHOD,
  "grpo": grpo.METHOD,
  "sft": sft.METHOD,
}


def get(name: str) -> base.Method:
  """The Method called `name`, or a clear error listing the known ones."""
  if name not in METHODS:
    raise ValueError(f"config.method={name!r}: choose from {tuple(METHODS)}")
  return METHODS[name]
