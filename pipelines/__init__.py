"""Prompt to image at the edges of the JAX model: text encoders (PyTorch, through transformers),
the embedding cache, and `edit-jax generate`."""
