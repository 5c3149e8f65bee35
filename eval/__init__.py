"""Evaluation: the end-to-end demo, forward timing against diffusers, (later) FLOPs and quality."""
