"""Parity of the Flax temporal VAE with diffusers `AutoencoderKLTemporalDecoder` (PyTorch CPU, fp32)."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder as TorchVAE
from flax import nnx

from actalker_jax.models.vae import AutoencoderKLTemporalDecoder, VAEConfig, decode_chunked

D = "DownEncoderBlock2D"
CONFIGS = {
    "c32-64_l1": VAEConfig.tiny(),  # block_out_channels (32, 64), layers_per_block 1
    "c32-32-64_l2": VAEConfig(down_block_types=(D,) * 3, block_out_channels=(32, 32, 64), layers_per_block=2),
}
IMAGE_HW = (16, 24)  # non-square; divisible by every test config's downsample factor
DECODE_CLIPS = ((2, 5), (1, 3))  # (batch, num_frames); (2, 5) is reused by the chunked-decode tests
TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float32)).permute(0, 3, 1, 2).contiguous()


def nnx_key(torch_key: str, ndim: int) -> str:
    """diffusers state-dict key -> NNX parameter path joined with "." (weight -> kernel / scale)."""
    prefix, leaf = torch_key.rsplit(".", 1)
    if leaf == "weight":
        leaf = "kernel" if ndim >= 2 else "scale"
    return f"{prefix}.{leaf}"


def to_flax_layout(a: np.ndarray) -> np.ndarray:
    """Linear (out, in) -> (in, out); Conv (out, in, *k) -> (*k, in, out); 1-D unchanged."""
    if a.ndim == 2:
        return a.T
    if a.ndim > 2:
        return np.transpose(a, tuple(range(2, a.ndim)) + (1, 0))
    return a


def flax_params(module: nnx.Module) -> dict[str, nnx.Param]:
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Param)}


def load_diffusers_state(module: nnx.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copies a diffusers state dict into `module` in place; every key must match one parameter exactly."""
    params = flax_params(module)
    mapped = {nnx_key(k, v.ndim): to_flax_layout(v.detach().float().numpy()) for k, v in state_dict.items()}
    missing, unexpected = sorted(set(params) - set(mapped)), sorted(set(mapped) - set(params))
    if missing or unexpected:
        raise KeyError(f"missing in diffusers: {missing}; not in the Flax model: {unexpected}")
    for key, value in mapped.items():
        param = params[key]
        if tuple(param.shape) != value.shape:
            raise ValueError(f"{key}: Flax shape {tuple(param.shape)} != diffusers shape {value.shape}")
        param.set_value(jnp.asarray(value, param.dtype))


def randomized_torch_vae(config: VAEConfig, seed: int = 0) -> TorchVAE:
    """A diffusers VAE whose every parameter is random: the default-init weights, plus noise on every
    1-D parameter (GroupNorm scales and biases, conv / linear biases) and mix_factor ~ N(0, 1)."""
    torch.manual_seed(seed)
    model = TorchVAE(**config.to_diffusers()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn_like(p))
            elif p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def flax_vae(config: VAEConfig, torch_model: TorchVAE, dtype=jnp.float32) -> AutoencoderKLTemporalDecoder:
    """The Flax VAE with the torch model's weights (built abstractly: no random init is run)."""
    vae = nnx.eval_shape(lambda: AutoencoderKLTemporalDecoder(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                              param_dtype=dtype))
    load_diffusers_state(vae, torch_model.state_dict())
    return vae


class Jitted:
    """A Flax VAE split once, with jitted encode(state, x) / decode(state, z, num_frames) that log their traces.

    Tests share these (cached per config and dtype) so that each shape is compiled once per session.
    """

    def __init__(self, vae: AutoencoderKLTemporalDecoder):
        self.vae = vae
        self.graphdef, self.state = nnx.split(vae)
        self.traces = []

        def encode(state, x):
            self.traces.append(("encode", x.shape))
            return nnx.merge(self.graphdef, state).encode(x)

        def decode(state, z, num_frames):
            self.traces.append(("decode", z.shape, num_frames))
            return nnx.merge(self.graphdef, state).decode(z, num_frames)

        self.encode_fn = jax.jit(encode)
        self.decode_fn = jax.jit(decode, static_argnums=2)

    def encode(self, x, state=None):
        return self.encode_fn(self.state if state is None else state, jnp.asarray(x))

    def decode(self, z, num_frames: int):
        return self.decode_fn(self.state, jnp.asarray(z), num_frames)


@functools.cache
def torch_model(name: str, dtype: str = "float32") -> TorchVAE:
    """The randomized reference model of a test config (fp32), or a bfloat16 copy of it."""
    if dtype == "float32":
        return randomized_torch_vae(CONFIGS[name], seed=sorted(CONFIGS).index(name))
    return copy.deepcopy(torch_model(name)).to(getattr(torch, dtype))


@functools.cache
def jax_model(name: str, dtype: str = "float32") -> Jitted:
    return Jitted(flax_vae(CONFIGS[name], torch_model(name), jnp.dtype(dtype)))


TINY = next(iter(CONFIGS))


def latent_hw(config: VAEConfig) -> tuple[int, int]:
    return IMAGE_HW[0] // config.downsample_factor, IMAGE_HW[1] // config.downsample_factor


def make_images(n: int = 6) -> np.ndarray:
    """(n, 3, H, W) uniform images in [-1, 1] (NCHW, as diffusers takes them)."""
    return np.random.default_rng(1).uniform(-1, 1, (n, 3) + IMAGE_HW).astype(np.float32)


def make_latents(config: VAEConfig, n: int, seed: int = 2) -> np.ndarray:
    """(n, h, w, latent_channels) standard-normal latents (NHWC)."""
    return np.random.default_rng(seed).standard_normal((n, *latent_hw(config), config.latent_channels)).astype(
        np.float32)


# ----------------------------------------------------------------------------------------------- config


def test_config_from_diffusers_and_presets():
    svd_json = {"_class_name": "AutoencoderKLTemporalDecoder", "_diffusers_version": "0.24.0.dev0",
                "block_out_channels": [128, 256, 512, 512], "down_block_types": [D] * 4, "force_upcast": True,
                "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "out_channels": 3,
                "sample_size": 768, "scaling_factor": 0.18215}
    assert VAEConfig.from_diffusers(svd_json) == VAEConfig.svd()
    assert VAEConfig.svd().downsample_factor == 8
    assert VAEConfig.from_diffusers(VAEConfig.tiny().to_diffusers()) == VAEConfig.tiny()
    with pytest.raises(ValueError, match="unknown diffusers config keys.*'norm_num_groups'"):
        VAEConfig.from_diffusers({**svd_json, "norm_num_groups": 32})
    with pytest.raises(ValueError, match="2 down_block_types for 3 block_out_channels"):
        VAEConfig(down_block_types=(D,) * 2, block_out_channels=(32, 32, 64))
    with pytest.raises(ValueError, match="unsupported block 'AttnDownEncoderBlock2D'"):
        VAEConfig(down_block_types=("AttnDownEncoderBlock2D",), block_out_channels=(32,))
    with pytest.raises(ValueError, match="48 is not a positive multiple of 32"):
        VAEConfig(down_block_types=(D,), block_out_channels=(48,))
    with pytest.raises(ValueError, match="latent_channels must be a positive int, got 0"):
        VAEConfig(latent_channels=0)


def test_svd_preset_parameter_count_and_shapes():
    """Abstract Flax SVD VAE (nnx.eval_shape) vs diffusers' on the meta device: same keys, shapes, count."""
    config = VAEConfig.svd()
    with torch.device("meta"):
        reference = TorchVAE(**config.to_diffusers())
    expected = {nnx_key(k, v.ndim): to_flax_layout(np.empty(v.shape, np.int8)).shape
                for k, v in reference.state_dict().items()}
    abstract = nnx.eval_shape(lambda: AutoencoderKLTemporalDecoder(config, rngs=nnx.Rngs(0)))
    params = flax_params(abstract)
    assert {k: tuple(p.shape) for k, p in params.items()} == expected
    n_flax = sum(int(np.prod(p.shape)) for p in params.values())
    assert n_flax == sum(p.numel() for p in reference.parameters()) == 97_742_847  # diffusers SVD(-xt) VAE
    for key, p in params.items():
        axes = p.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(p.shape), key


# ---------------------------------------------------------------------------------------------- parity


def test_torch_parameters_are_all_randomized():
    for name in CONFIGS:
        for key, p in torch_model(name).named_parameters():
            p = p.detach()
            assert p.numel() == 1 or float(p.std()) > 0, key
            assert not torch.all(p == 0) and not torch.all(p == 1), key


def torch_outputs(name: str, dtype: str, images: np.ndarray, latents: dict) -> dict[str, np.ndarray]:
    """diffusers encode mean / logvar and decode outputs (NHWC, float32) of the model in `dtype`."""
    model, cast = torch_model(name, dtype), getattr(torch, dtype)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images).to(cast)).latent_dist
        out = {"mean": nhwc(posterior.mean.float()), "logvar": nhwc(posterior.logvar.float())}
        for (batch, frames), z in latents.items():
            out[f"decode_b{batch}f{frames}"] = nhwc(model.decode(nchw(z).to(cast), num_frames=frames).sample.float())
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name, dtype, record_property):
    """Encode (mean, logvar) and decode (several batch x frames) vs diffusers fp32, relative L2 error.

    bfloat16: <= 2e-2, or (deep configs, where bf16 rounding alone costs more) <= 1.25x the error of
    diffusers' own model cast to bfloat16, measured on the same inputs.
    """
    config, model = CONFIGS[name], jax_model(name, dtype)
    images = make_images()
    clips = DECODE_CLIPS if dtype == "float32" else DECODE_CLIPS[:1]  # frame layouts are dtype-independent
    latents = {(b, f): make_latents(config, b * f, seed=10 * b + f) for b, f in clips}
    expected = torch_outputs(name, "float32", images, latents)

    mean, logvar = model.encode(images.transpose(0, 2, 3, 1))
    assert mean.shape == logvar.shape == (6, *latent_hw(config), config.latent_channels)
    actual = {"mean": mean, "logvar": logvar}
    for (batch, frames), z in latents.items():
        out = model.decode(z, frames)
        assert out.shape == (batch * frames, *IMAGE_HW, config.out_channels) and out.dtype == jnp.dtype(dtype)
        actual[f"decode_b{batch}f{frames}"] = out

    errors = {k: rel_err(actual[k], expected[k]) for k in expected}
    bound = {k: TOL[dtype] for k in expected}
    if dtype != "float32":
        torch_low = torch_outputs(name, dtype, images, latents)
        bound = {k: max(TOL[dtype], 1.25 * rel_err(torch_low[k], expected[k])) for k in expected}
    record_property("rel_errors", errors)
    print(f"\n{name} {dtype}: " + ", ".join(f"{k} {errors[k]:.2e} (bound {bound[k]:.2e})" for k in errors))
    assert all(errors[k] <= bound[k] for k in errors), (errors, bound)


def test_logvar_is_clamped_like_diffusers():
    reference, model = torch_model(TINY), jax_model(TINY)
    latent = reference.config.latent_channels
    bias = np.concatenate([np.zeros(latent), np.array([-100.0, 100.0] * (latent // 2))]).astype(np.float32)
    images = make_images()
    with torch.no_grad():
        shifted = copy.deepcopy(reference)
        shifted.quant_conv.bias.add_(torch.from_numpy(bias))
        expected = nhwc(shifted.encode(torch.from_numpy(images)).latent_dist.logvar)
    state = jax.tree.map(lambda x: x, model.state)
    state["quant_conv"]["bias"].set_value(model.state["quant_conv"]["bias"].get_value() + bias)
    _, logvar = model.encode(images.transpose(0, 2, 3, 1), state=state)
    np.testing.assert_array_equal(np.asarray(logvar), expected)
    assert set(np.unique(np.asarray(logvar))) == {-30.0, 20.0}


# --------------------------------------------------------------------------------------- chunked decode


def torch_chunked_decode(reference: TorchVAE, z: np.ndarray, chunk: int) -> np.ndarray:
    """The SVD pipeline's `decode_latents` loop (without the 1/scaling_factor), NHWC in and out."""
    frames = []
    with torch.no_grad():
        for i in range(0, z.shape[0], chunk):
            part = nchw(z[i:i + chunk])
            frames.append(nhwc(reference.decode(part, num_frames=part.shape[0]).sample))
    return np.concatenate(frames)


def test_decode_chunked():
    reference, model = torch_model(TINY), jax_model(TINY)
    batch, frames = DECODE_CLIPS[0]
    z = make_latents(CONFIGS[TINY], batch * frames)

    @functools.partial(jax.jit, static_argnums=(2, 3, 4))
    def chunked(state, z, num_frames, chunk, per_clip):
        return nnx.merge(model.graphdef, state).decode_chunked(z, num_frames, chunk, per_clip=per_clip)

    full = np.asarray(model.decode(z, frames))
    # Chunk == clip (2 chunks through lax.map): the same as the unchunked decode.
    np.testing.assert_allclose(np.asarray(chunked(model.state, z, frames, frames, False)), full,
                               rtol=1e-5, atol=1e-5)
    # Pipeline-style: 5 chunks of 2 frames, each decoded as one clip; chunk 3 straddles the two clips.
    pipeline = np.asarray(chunked(model.state, z, frames, 2, False))
    assert rel_err(pipeline, torch_chunked_decode(reference, z, 2)) <= 1e-4
    assert rel_err(pipeline, full) > 1e-2  # the temporal decoder really does see the chunking
    # Per clip: each clip cut into 3 + 2 frames (a direct chunk and a remainder), no chunk mixes clips.
    per_clip = np.asarray(chunked(model.state, z, frames, 3, True))
    expected = np.concatenate([torch_chunked_decode(reference, z[b * frames:(b + 1) * frames], 3)
                               for b in range(batch)])
    assert rel_err(per_clip, expected) <= 1e-4
    # decode_chunk_size None is the plain decode: the same program.
    plain = jax.make_jaxpr(lambda s, z: nnx.merge(model.graphdef, s).decode(z, frames))(model.state, z)
    none = jax.make_jaxpr(lambda s, z: decode_chunked(nnx.merge(model.graphdef, s), z, frames, None))(model.state, z)
    assert str(none) == str(plain)


def test_decode_jit_compiles_once_per_shape():
    model, (batch, frames) = jax_model(TINY), DECODE_CLIPS[0]
    shape = (batch * frames, *latent_hw(CONFIGS[TINY]), 4)
    for seed in range(3):
        model.decode(make_latents(CONFIGS[TINY], batch * frames, seed=seed), frames).block_until_ready()
    assert model.traces.count(("decode", shape, frames)) == 1


def test_bad_inputs_are_rejected():
    vae = jax_model(TINY).vae
    with pytest.raises(ValueError, match="5 latent frames are not a whole number of clips of num_frames=2"):
        vae.decode(jnp.zeros((5, 8, 12, 4)), 2)
    with pytest.raises(ValueError, match=r"decode expects latents \(N, h, w, 4\), got shape \(2, 8, 12, 3\)"):
        vae.decode(jnp.zeros((2, 8, 12, 3)), 1)
    with pytest.raises(ValueError, match=r"encode expects images \(N, H, W, 3\), got shape \(2, 3, 16, 24\)"):
        vae.encode(jnp.zeros((2, 3, 16, 24)))
    with pytest.raises(ValueError, match="decode_chunk_size must be a positive int or None, got 0"):
        decode_chunked(vae, jnp.zeros((2, 8, 12, 4)), 1, 0)
    with pytest.raises(ValueError, match="num_frames must be a positive int, got 0"):
        vae.decode(jnp.zeros((2, 8, 12, 4)), 0)
