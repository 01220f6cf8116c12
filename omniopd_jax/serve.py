"""`python -m omniopd_jax.serve`: the OpenAI-compatible teacher server (omniopd_jax.teacher.server)."""

from omniopd_jax.teacher.server import main

if __name__ == "__main__":
  main()
