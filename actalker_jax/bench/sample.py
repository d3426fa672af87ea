"""Sampling-speed benchmark: the sampler of `actalker_jax.sample` on a randomly initialised model.

    python -m actalker_jax.bench.sample --config svd_xt                    # GPU: SVD-xt + PCM, 512x512, 25 steps
    python -m actalker_jax.bench.sample --config tiny --steps 2 --latent 8x8   # CPU smoke run

Runs `sample._sample_latents` (circular windows of 25 frames, 4 guidance branches = 3-way guidance in one
batched call per window, one jitted step) on random conditions for a clip of `--frames` output frames
(default 25 = 2 s at 12.5 fps; the buffer adds 25 unconditional padding frames, so 2 windows per step), twice:
the first run includes compilation, the second is reported as seconds per generated second of video
(12.5 fps) and milliseconds per window call. VAE decoding is not included. Peak device memory on GPU.
Parameters are random (timing does not depend on their values). Results go to docs/benchmarks.md.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from actalker_jax import diffusion
from actalker_jax.bench.timing import print_peak_memory
from actalker_jax.models.actalker import ACTalkerConfig, ACTalkerModel
from actalker_jax.sample import MAX_WINDOW, LoadedModel, _sample_latents

CONFIGS = {"tiny": ACTalkerConfig.tiny, "svd_xt": ACTalkerConfig.svd_xt}
FPS = 12.5


def random_inputs(config: ACTalkerConfig, frames: int, latent: tuple[int, int], factor: int = 8):
    """(static inputs, audio (T, ...), expression (T, De), pose (T, 6), ref latent (h, w, c)) with random values."""
    rng = np.random.default_rng(0)
    h, w = latent
    size = (h * factor, w * factor)
    channels = config.unet.out_channels
    static = dict(ref_latent=rng.standard_normal((1, h, w, channels)).astype(np.float32),
                  id_embed=rng.standard_normal((1, config.id_dim)).astype(np.float32),
                  face_image=np.zeros((1, *size, 3), np.float32), gates=np.ones((1, 2), np.float32),
                  mask_audio=np.ones((1, *size), np.float32), mask_motion=np.ones((1, *size), np.float32),
                  added_time_ids=np.asarray([[FPS, 12.0, 20.0]], np.float32),
                  guidance_mouth=None)   # whole-frame guidance, the released sampler's
    static["face_image"][:, size[0] // 4:3 * size[0] // 4, size[1] // 4:3 * size[1] // 4] = 1.0
    audio = rng.standard_normal((frames, config.audio_seq_len, config.audio_blocks, config.audio_channels))
    expression = rng.standard_normal((frames, config.expression_dim))
    pose = np.zeros((frames, 6))
    return static, audio.astype(np.float32), expression.astype(np.float32), pose.astype(np.float32), \
        static["ref_latent"][0]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m actalker_jax.bench.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="svd_xt")
    parser.add_argument("--frames", type=int, default=25, help="output frames (at 12.5 fps)")
    parser.add_argument("--latent", default="64x64", help="HxW of the latent (512x512 images: 64x64)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--window", type=int, default=MAX_WINDOW)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                        help="compute and parameter dtype")
    args = parser.parse_args(argv)
    try:
        latent = tuple(int(v) for v in args.latent.lower().split("x"))
    except ValueError:
        parser.error(f"--latent must look like 64x64, got {args.latent!r}")

    base = CONFIGS[args.config]()
    config = dataclasses.replace(base, unet=dataclasses.replace(base.unet, num_frames=args.window))
    dtype = jnp.dtype(args.dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ACTalkerModel(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                                         param_dtype=dtype)))
    state = jax.jit(lambda: nnx.split(ACTalkerModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))[1])()
    model = nnx.merge(graphdef, state)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    loaded = LoadedModel(model=model, config=ml_collections.ConfigDict(), step=0, path="random init", media=None,
                         window=args.window)
    static, audio, expression, pose, ref_latent = random_inputs(config, args.frames, latent)
    edm = diffusion.EDMConfig(num_steps=args.steps)
    total = diffusion.sampling_buffer_length(args.frames, args.window, edm.window_stride)
    calls = args.steps * len(diffusion.circular_windows(total, args.window, 0, edm.window_stride))

    def run():
        start = time.perf_counter()
        _sample_latents(loaded, static, audio, expression, pose, ref_latent=ref_latent, seed=0, edm=edm,
                        scales=edm.guidance_scales, progress=False)
        return time.perf_counter() - start

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"config: {args.config} ({params:,} params, {args.dtype}), {args.frames} frames ({args.frames / FPS:.2f} s "
          f"at {FPS} fps), latent {latent[0]}x{latent[1]}, window {args.window}, {args.steps} steps, "
          f"{calls} window calls of 4 x {args.window} frames")
    first = run()
    seconds = run()
    print(f"first run (incl. compile) {first:.1f} s; timed run {seconds:.2f} s = "
          f"{seconds / (args.frames / FPS):.2f} s per generated second, {1e3 * seconds / calls:.1f} ms per window call; "
          f"traces of the step: {loaded.traces}")
    print_peak_memory(device)


if __name__ == "__main__":
    main()
