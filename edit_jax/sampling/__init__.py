"""Sampling: schedules (`schedules`), the latent layout (`latents`), the flow-matching sampler with
its conditions (`sampler`), prompts in batches (`batches`) and the embeddings files users give
(`embeddings`). Import each from its module (`from edit_jax.sampling.sampler import sample`)."""
