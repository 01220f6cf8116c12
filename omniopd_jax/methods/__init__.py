"""Training methods (omniopd, opd, grpo, sft): host-side collection and pure losses."""
