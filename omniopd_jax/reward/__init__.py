"""From teacher samples to chunk weights: similarity phi, the sentence encoder and the Dirichlet posterior."""
