"""Benchmark commands (`python -m actalker_jax.bench.<name>`); numbers go to docs/benchmarks.md."""
