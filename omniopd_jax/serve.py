"""`python -m omniopd_jax.serve`: the OpenAI-compatible teacher server (omniopd_jax.teacher.server).

`serve.start_subprocess(DIR)` starts one as a child process (omniopd_jax.teacher.launch)."""

from omniopd_jax.teacher.launch import ServerHandle, start_subprocess
from omniopd_jax.teacher.server import main

__all__ = ["ServerHandle", "main", "start_subprocess"]

if __name__ == "__main__":
  main()
