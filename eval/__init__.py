"""Evaluation: the fidelity demo and its judge, metrics and baselines, `edit-jax eval`, the
random-weight smoke run, pictures, and the benchmarks."""
