"""Custom kernels of actalker_jax, importable as `actalker_jax.kernels`."""
