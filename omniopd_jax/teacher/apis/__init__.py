"""One module per teacher API; `omniopd_jax.teacher.backends` is their registry."""
