"""configs/demo.py for the tests (loaded by path: configs/ is not a package), the tests' small geometry and configs."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "configs_demo", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"))
configs_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(configs_demo)


# 32x32 frames as 8x8x48 latents (pixel-unshuffle factor 4): a quarter of the demo's 16x16 latent tokens, so trainer
# and sampler tests compile and run 4x less. Records for it: synthetic `--size 32` (default factor 4).
SMALL_GEOMETRY = {"synthetic_size": 32, "media.image_size": 32, "media.latent_factor": 4, "model.unet.in_channels": 96,
                  "model.unet.out_channels": 48, "model.pose_guider_channels": (8, 16, 16)}


def set_keys(config, values: dict):
    """Sets dotted keys ("model.unet.in_channels") of a config in place; returns it for chaining."""
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def small_geometry(config):
    """The demo config switched to SMALL_GEOMETRY (in place; returned for chaining)."""
    return set_keys(config, SMALL_GEOMETRY)


def one_level(config):
    """The demo UNet cut to its first level (in place; returned for chaining): a cross-attention down block (PCM,
    IP-adapters), the mid block and a cross-attention up block, all 32 channels wide. For the tests of the machinery
    around the model (trainer, sampler, evaluation): its step compiles in ~0.7x the two-level UNet's time. The
    model's own layers, both levels included, have their parity tests."""
    unet = config.model.unet
    unet.block_out_channels, unet.num_attention_heads = (32,), (2,)
    unet.down_block_types = ("CrossAttnDownBlockSpatioTemporal",)
    unet.up_block_types = ("CrossAttnUpBlockSpatioTemporal",)
    return config


def small_demo_config():
    """The demo config at the small geometry with its UNet cut to one level: the tests' base config."""
    return one_level(small_geometry(configs_demo.get_config()))


def on_records(records: str):
    """`small_demo_config` reading `records`, 4-frame windows, every clip in the train split."""
    config = small_demo_config()
    config.data.records = records
    config.data.n_frames = 4
    config.data.eval_fraction = 0.0
    return config


def tiny_config(records, **overrides):
    """The trainer tests' config: `on_records(records)` ("": the trainer's own synthetic clips), 4-frame
    UNet windows, 2 steps, a checkpoint every step, one device, no previews; then the dotted-key `overrides`."""
    config = on_records(records)
    config.synthetic_clips = 0
    config.model.unet.num_frames = 4
    config.total_steps = 2
    config.checkpoint.every_steps = 1
    config.checkpoint.every_minutes = 0.0
    config.mesh.devices = 1
    config.synthetic_frames = 6
    config.log.sample_every_steps = 0
    # Adam with eps 1 and lr 0.05: Adam divides by sqrt(v), so for a near-zero gradient it turns the
    # summation-order noise of sharded vs single-device reductions into a full-size step (seen: one element
    # in 27k off by 1e-6 after two steps). With eps >> sqrt(v) the update is ~lr * momentum, linear in the
    # gradients, so comparing sharded and single-device parameters at rtol 1e-5 tests the gradients.
    config.optim.eps = 1.0
    config.optim.lr = 0.05
    return set_keys(config, overrides)


def probe_config(out, num_clips: int):
    """`on_records` of `num_clips` fresh synthetic 6-frame clips written to `out` (for the probes of eval/)."""
    from actalker_jax.data import synthetic

    synthetic.main(["--out", str(out), "--num-clips", str(num_clips), "--frames", "6", "--size", "32"])
    return on_records(str(out / "records"))
