"""Held-out evaluation: greedy pass@1, pass@k, maj@k."""
