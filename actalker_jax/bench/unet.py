"""UNet step-time benchmark.

    python -m actalker_jax.bench.unet --config tiny                       # CPU: fwd and fwd+bwd of the tiny UNet
    python -m actalker_jax.bench.unet --config svd_xt --frames 14 --latent 64x64 --dtype bfloat16 --mode forward

Prints the median wall time over `--steps` timed calls after one warm-up/compile call, and on GPU the
peak device memory. Parameters are random (timing does not depend on their values). Results belong in
docs/benchmarks.md with date, device and command.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actalker_jax.bench.timing import first_call_s, median_ms, print_peak_memory
from actalker_jax.models.unet import UNetConfig, UNetSpatioTemporalConditionModel, count_params

CONFIGS = {"tiny": UNetConfig.tiny, "svd_xt": UNetConfig.svd_xt}


def make_inputs(config: UNetConfig, batch: int, frames: int, height: int, width: int, dtype):
    rng = np.random.default_rng(0)
    cross = config.cross_attention_dims[0]
    return (jnp.asarray(rng.standard_normal((batch, frames, height, width, config.in_channels)), dtype),
            jnp.asarray(rng.uniform(-2, 2, (batch,)), jnp.float32),
            jnp.asarray(rng.standard_normal((batch, 1, cross)), dtype),
            jnp.asarray([[6.0, 127.0, 0.02]] * batch, jnp.float32))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m actalker_jax.bench.unet", description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--latent", default="16x16", help="HxW of the latent")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (parameters stay float32)")
    parser.add_argument("--mode", choices=["forward", "train", "both"], default="both",
                        help="train = forward + backward (value_and_grad of a mean-square loss)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        height, width = (int(v) for v in args.latent.lower().split("x"))
    except ValueError:
        parser.error(f"--latent must look like 64x64, got {args.latent!r}")

    config = CONFIGS[args.config]()
    dtype = jnp.dtype(args.dtype)
    unet = UNetSpatioTemporalConditionModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    graphdef, params = nnx.split(unet)
    inputs = make_inputs(config, args.batch, args.frames, height, width, dtype)

    @jax.jit
    def forward(params, *inputs):
        return nnx.merge(graphdef, params)(*inputs)

    @jax.jit
    def train(params, *inputs):
        def loss(params):
            return jnp.mean(jnp.square(nnx.merge(graphdef, params)(*inputs).astype(jnp.float32)))
        return jax.value_and_grad(loss)(params)

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"config: {args.config} ({count_params(unet):,} params), batch {args.batch}, frames {args.frames}, "
          f"latent {height}x{width}, compute {args.dtype}")
    modes = ["forward", "train"] if args.mode == "both" else [args.mode]
    for mode in modes:
        fn = forward if mode == "forward" else train
        first = first_call_s(fn, (params, *inputs))
        median = median_ms(fn, (params, *inputs), 0, args.steps)
        print(f"{mode:8s} median {median:9.1f} ms over {args.steps} calls (first call incl. compile {first:.1f} s)")
    print_peak_memory(device)


if __name__ == "__main__":
    main()
