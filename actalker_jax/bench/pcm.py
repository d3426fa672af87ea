"""PCM layer time against the spatial transformer block of the same UNet transformer.

    python -m actalker_jax.bench.pcm --preset cpu-small          # CPU: ratios, scan_over frame and video
    python -m actalker_jax.bench.pcm --preset svd-320 --dtype bfloat16 --impl auto   # GPU: absolute times

For each `scan_over` it times (jitted, median of --steps after a compile call) the forward and the
forward+backward of: the PCM layer, the spatial BasicTransformerBlock (self-attn, cross-attn, GEGLU
feed-forward) and its self-attention alone, on the same (B*F, h*w, C) tokens, with a mouth-sized audio
mask and a face-sized motion mask. Prints milliseconds and the PCM / spatial-block ratio.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actalker_jax.bench.timing import median_ms
from actalker_jax.models.pcm import PCMLayer
from actalker_jax.models.transformer import BasicTransformerBlock

PRESETS = {  # batch, frames, (h, w), channels, heads, cond_dim, audio tokens
    "cpu-small": (1, 4, (16, 16), 64, 2, 64, 8),
    "svd-320": (1, 14, (64, 64), 320, 5, 1024, 32),   # top level of SVD-xt at 512x512, 14 frames
    "svd-640": (1, 14, (32, 32), 640, 10, 1024, 32),
    "svd-1280": (1, 14, (16, 16), 1280, 20, 1024, 32),
}


def region_masks(batch, grid):
    """Image-resolution masks: audio = lower-middle box ("mouth"), motion = a larger face box minus it."""
    height, width = 8 * grid[0], 8 * grid[1]
    mouth = np.zeros((batch, height, width), np.float32)
    mouth[:, int(0.6 * height):int(0.85 * height), int(0.3 * width):int(0.7 * width)] = 1
    face = np.zeros_like(mouth)
    face[:, int(0.15 * height):int(0.9 * height), int(0.2 * width):int(0.8 * width)] = 1
    return jnp.asarray(mouth), jnp.asarray(face - mouth)


def forward_and_train(module, call):
    """Jitted forward and forward+backward (grads w.r.t. params and input) of `call(module, x)`."""
    graphdef, state = nnx.split(module)

    def forward(state, x):
        return call(nnx.merge(graphdef, state), x)

    def loss(state, x):
        return jnp.mean(jnp.square(forward(state, x).astype(jnp.float32)))

    return state, jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m actalker_jax.bench.pcm", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--impl", default="auto", help="selective-scan impl: auto | xla | pallas | reference")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    batch, frames, grid, channels, heads, cond_dim, audio_tokens = PRESETS[args.preset]
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    bf = batch * frames
    x = jnp.asarray(rng.standard_normal((bf, grid[0] * grid[1], channels)), dtype)
    context = jnp.asarray(rng.standard_normal((bf, 1, cond_dim)), dtype)
    mask_audio, mask_motion = region_masks(batch, grid)
    conditions = dict(audio_tokens=jnp.asarray(rng.standard_normal((batch, frames, audio_tokens, cond_dim)), dtype),
                      motion_tokens=jnp.asarray(rng.standard_normal((batch, frames, 1, cond_dim)), dtype),
                      mask_audio=mask_audio, mask_motion=mask_motion)
    keys = nnx.Rngs(jax.random.key(0, impl="rbg"))
    kw = dict(dtype=dtype, param_dtype=jnp.float32)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"preset {args.preset}: batch {batch} x {frames} frames, {grid[0]}x{grid[1]} tokens, C={channels}, "
          f"{args.dtype}, scan impl {args.impl}")
    block = BasicTransformerBlock(channels, heads, channels // heads, cond_dim, rngs=keys, **kw)
    rows = []
    for name, module, call in (
            ("spatial block", block, lambda m, h: m(h, context)),
            ("self-attention", block.attn1, lambda m, h: m(h))):
        state, fwd, train = forward_and_train(module, call)
        rows.append((name, median_ms(fwd, (state, x), 1, args.steps), median_ms(train, (state, x), 1, args.steps)))
    for scan_over in ("frame", "video"):
        pcm = PCMLayer(channels, cond_dim, rngs=keys, scan_over=scan_over, scan_impl=args.impl, **kw)
        state, fwd, train = forward_and_train(
            pcm, lambda m, h: m(h, encoder_hidden_states=context, conditions=conditions, num_frames=frames, grid=grid))
        rows.append((f"PCM ({scan_over})", median_ms(fwd, (state, x), 1, args.steps),
                     median_ms(train, (state, x), 1, args.steps)))
    spatial_fwd, spatial_train = rows[0][1], rows[0][2]
    print(f"{'module':18s} {'fwd ms':>10s} {'fwd+bwd ms':>12s} {'fwd / spatial':>14s} {'fwd+bwd / spatial':>18s}")
    for name, fwd_ms, train_ms in rows:
        print(f"{name:18s} {fwd_ms:10.2f} {train_ms:12.2f} {fwd_ms / spatial_fwd:14.2f} {train_ms / spatial_train:18.2f}")


if __name__ == "__main__":
    main()
