"""On-policy rollouts: the KV-cache sampler, peak-entropy forks and the chunk/prefix bookkeeping."""
