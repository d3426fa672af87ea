"""Training step benchmark: step time, MFU and peak memory of any config on any mesh, synthetic batches.

    python -m actalker_jax.bench.train --config configs/demo.py                                  # CPU
    python -m actalker_jax.bench.train --config configs/actalker_svd_xt.py --frames 14 --image 512  # one GPU

Builds exactly the training program of `train.py` (sharded init, EDM loss with gate sampling, AdamW,
donated state) for the config (plus `--config.key=value` overrides), feeds it random batches of the
record shapes (no data loading), and prints the median step time over `--steps` timed steps after
`--warmup` steps, tokens/s (latent pixels x frames per second), the analytic model FLOPs of a
training step (3x the forward's matmul/conv FLOPs, flops.py), MFU against the devices' bf16 peak,
and peak device memory where the backend reports it.
"""

import time

import jax
import numpy as np
from absl import app, flags

from actalker_jax import flops, sharding, train
from actalker_jax.bench.timing import median_ms, print_peak_memory
from actalker_jax.media import Media

_FRAMES = flags.DEFINE_integer("frames", None, "frames per clip (default: config.data.n_frames)")
_IMAGE = flags.DEFINE_integer("image", None, "square image side in pixels (default: config.media.image_size)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after the compiling one")
_INIT = flags.DEFINE_enum(
    "init", "jit", ["jit", "host"],
    "jit: train.py's sharded jitted init; host: random values drawn on the host and put on the devices leaf by leaf "
    "(no init program to compile; single process; the step time does not depend on the values)")


def host_random_state(trainer, seed: int = 0) -> dict:
    """A train state of `trainer.abstract_state`'s structure, shapes and shardings without compiling an init program.

    Floating leaves: N(0, 0.02^2) values for parameters (and EMA), zeros for optimizer moments; integer leaves
    (step, counts) zero; the PRNG key from `seed`. Each leaf is made on the host and `device_put` with its
    sharding. Parameter values are the tail (from a random offset in its first half) of one pool of 2^22 normal
    draws, repeated to the leaf's size: drawing each of SVD-xt's 1.8e9 values took 54 s on the H200 machine's host,
    tiling the pool ~1.3 s on our 2-core CPU.
    """
    if jax.process_count() > 1:
        raise ValueError("--init host: single process only (each process would need its own shard)")
    rng = np.random.default_rng(seed)
    pool = 0.02 * rng.standard_normal(1 << 22, np.float32)

    def leaf(path, spec, sharding):
        if jax.dtypes.issubdtype(spec.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(seed), sharding)  # train.py's state key: the default impl
        top = getattr(path[0], "key", None)
        if top in ("params", "ema") and jax.numpy.issubdtype(spec.dtype, jax.numpy.floating):
            value = np.resize(pool[rng.integers(pool.size // 2):], spec.shape).astype(spec.dtype, copy=False)
        else:
            value = np.zeros(spec.shape, spec.dtype)
        return jax.device_put(value, sharding)

    return jax.tree_util.tree_map_with_path(leaf, trainer.abstract_state, trainer.state_shardings)

def synthetic_batch(config, batch: int, frames: int, image: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random global batch with the shapes of data/pipeline.py for `config` (latents (B, F, h, w, c), ...)."""
    m = config.model
    factor = Media(config).factor
    if image % (8 * factor):
        raise ValueError(f"--image {image} must be a multiple of {8 * factor} (latent factor {factor} x 8)")
    h = image // factor
    channels = m.unet.in_channels // 2
    rng = np.random.default_rng(seed)
    mouth = np.zeros((batch, image, image), np.float32)
    mouth[:, int(0.6 * image):int(0.85 * image), int(0.3 * image):int(0.7 * image)] = 1
    face = np.zeros_like(mouth)
    face[:, int(0.15 * image):int(0.9 * image), int(0.2 * image):int(0.8 * image)] = 1
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return dict(
        latents=normal(batch, frames, h, h, channels), ref_latent=normal(batch, h, h, channels),
        audio=normal(batch, frames, m.audio_seq_len, m.audio_blocks, m.audio_channels),
        motion=normal(batch, frames, m.expression_dim), pose=normal(batch, frames, 6),
        id_embed=normal(batch, m.id_dim), mask_audio=mouth, mask_motion=face - mouth,
        face_box=np.tile(np.float32([0.2, 0.15, 0.8, 0.9]) * image, (batch, 1)),
        added_time_ids=np.tile(np.float32([config.media.fps, 127.0, 127.0]), (batch, 1)))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if train.CONFIG_FLAG.value is None:
        raise app.UsageError("--config is required")
    config = train.CONFIG_FLAG.value  # --config, defined by train.py
    frames = _FRAMES.value or config.data.n_frames
    image = _IMAGE.value or config.media.image_size
    config.unlock()
    config.data.n_frames = frames
    config.model.unet.num_frames = frames
    config.distributed = False
    if "init" in config:  # random weights: the step time does not depend on their values
        config.init = {field: "" for field in config.init}
    config.lock()
    devices = jax.devices() if config.mesh.get("devices", -1) == -1 else jax.devices()[:config.mesh.devices]
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    batch_size = config.data.batch_size * jax.process_count()
    device = devices[0]
    print(f"device: {len(devices)} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"mesh {dict(mesh.shape)}")
    print(f"config: global batch {batch_size}, {frames} frames, {image}x{image} images, compute "
          f"{config.compute_dtype}, remat {dict(config.get('remat') or {})}, scan {config.model.pcm.scan_impl}")

    t0 = time.perf_counter()
    trainer = train.build_trainer(config, mesh)
    state = trainer.init() if _INIT.value == "jit" else host_random_state(trainer, config.seed)
    jax.block_until_ready(state)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state["params"]))
    print(f"init ({_INIT.value}): {n_params:,} parameters in {time.perf_counter() - t0:.1f} s")
    local = synthetic_batch(config, batch_size, frames, image)
    batch = train.global_batch(local, mesh)

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = trainer.step(holder["state"], batch)
        return metrics

    t0 = time.perf_counter()
    jax.block_until_ready(one_step())
    print(f"first step (compile + run): {time.perf_counter() - t0:.1f} s")
    step_ms = median_ms(one_step, (), _WARMUP.value, _STEPS.value)
    step_flops = trainer.flops_per_step(batch)
    util = flops.mfu(step_flops, step_ms / 1e3, device, len(devices))
    tokens = batch_size * frames * (image // Media(config).factor) ** 2
    print(f"step: median {step_ms:.1f} ms over {_STEPS.value} steps; {tokens / step_ms * 1e3:,.0f} latent tokens/s; "
          f"{step_flops / 1e12:.2f} TFLOP per step (analytic, 3x forward); "
          f"MFU {'n/a (unknown peak)' if util is None else f'{100 * util:.1f}%'}")
    print_peak_memory(device)


if __name__ == "__main__":
    app.run(main, flags_parser=train.parse_flags)
