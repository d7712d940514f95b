"""Interoperability: PEFT and mlx-lm adapter configs and weights to and from specs and adapter directories."""
