"""Flax NNX models: SVD spatio-temporal UNet, temporal VAE (and, later, the PCM layers)."""
