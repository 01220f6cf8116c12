"""Memory-bounded device kernels: the vocabulary-tiled head and losses, fused attention."""
