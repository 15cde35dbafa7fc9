"""Shared neural network layers: one attention entry point, norms, MLPs, embeddings."""
