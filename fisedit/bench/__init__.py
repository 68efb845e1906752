"""Benchmarks and sizing of the engine on full-size model shapes (random weights)."""
