"""Which attention implementation `layers.dot_product_attention` asks for: cuDNN only for shapes it trains on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actalker_jax.models import layers


@pytest.mark.parametrize("length,keys,dim_head,dtype,cudnn", [
    (8, 6, 16, jnp.bfloat16, True),
    (8, 1, 16, jnp.bfloat16, False),     # SVD-xt's one-token cross-attention: cuDNN's backward rejects it
    (7, 6, 16, jnp.bfloat16, False),     # odd query length
    (8, 6, 12, jnp.bfloat16, False),     # head dim not a multiple of 8
    (8, 6, 256, jnp.bfloat16, False),    # head dim over 128
    (8, 6, 16, jnp.float32, False),      # cuDNN flash attention is bf16/fp16 only
])
def test_cudnn_only_for_shapes_it_supports(monkeypatch, length, keys, dim_head, dtype, cudnn):
    calls = []
    xla_attention = jax.nn.dot_product_attention

    def spy(q, k, v, *, scale, implementation=None):
        calls.append(implementation)
        return xla_attention(q, k, v, scale=scale)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, length, 2, dim_head)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((2, keys, 2, dim_head)), dtype) for _ in range(2))
    out = layers.dot_product_attention(q, k, v, scale=dim_head ** -0.5)
    assert out.shape == q.shape
    assert calls == (["cudnn"] if cudnn else [None])
