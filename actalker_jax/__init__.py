"""ACTalker in JAX/Flax NNX: SVD UNet with Parallel-Control Mamba layers."""

__version__ = "0.1.0"
