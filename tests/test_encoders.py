"""Condition encoders: parity with PyTorch modules written from the spec (§4) with the official keys (§10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from actalker_jax.convert import ConversionError, build_from_state_dict
from actalker_jax.models.encoders import AudioProjModel, IDProjModel, MotionProjModel, PoseGuider, VasaProjModel
from torch_utils import randomize_, rel_err, state_dict_numpy


# ----------------------------------------------------------------------------- PyTorch oracles (spec §4)

class TorchAudioProj(nn.Module):
    def __init__(self, seq_len, blocks, channels, intermediate_dim, output_dim, context_tokens):
        super().__init__()
        self.context_tokens, self.output_dim = context_tokens, output_dim
        self.proj1 = nn.Linear(seq_len * blocks * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, audio_embeds):  # (bz, f, w, b, c)
        frames = audio_embeds.shape[1]
        x = audio_embeds.flatten(0, 1)
        x = x.reshape(x.shape[0], -1)
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        tokens = self.norm(self.proj3(x).reshape(x.shape[0], self.context_tokens, self.output_dim))
        return tokens.reshape(-1, frames, self.context_tokens, self.output_dim)


class TorchIDProj(nn.Module):
    def __init__(self, in_dim, hidden_dim, out_dim):
        super().__init__()
        self.proj1 = nn.Linear(in_dim, hidden_dim)
        self.proj2 = nn.Linear(hidden_dim, hidden_dim)
        self.proj3 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        return self.proj3(torch.relu(self.proj2(torch.relu(self.proj1(x))))).unsqueeze(1)


class TorchVasaProj(nn.Module):
    def __init__(self, expression_dim, out_dim, pose_dim=6):
        super().__init__()
        self.proj1 = nn.Linear(expression_dim, out_dim - pose_dim)
        self.norm = nn.LayerNorm(out_dim - pose_dim)

    def forward(self, expression, pose):
        return torch.cat([self.norm(self.proj1(expression)), pose], dim=-1).unsqueeze(-2)


class TorchPoseGuider(nn.Module):
    def __init__(self, conditioning_embedding_channels, block_out_channels=(16, 32, 96, 256), conditioning_channels=3):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(block_out_channels[-1], conditioning_embedding_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x):
        x = nn.functional.silu(self.conv_in(x))
        for block in self.blocks:
            x = nn.functional.silu(block(x))
        return self.conv_out(x)


# ----------------------------------------------------------------------------- helpers

def load(make, torch_module, seed):
    randomize_(torch_module, seed)
    return build_from_state_dict(make, state_dict_numpy(torch_module), jnp.float32)


def count(make) -> int:
    return sum(int(v.size) for v in jax.tree.leaves(nnx.state(nnx.eval_shape(make), nnx.Param)))


def torch_out(module, *arrays):
    with torch.no_grad():
        return module(*(torch.from_numpy(a) for a in arrays)).numpy()


# ----------------------------------------------------------------------------- parity

def test_audio_proj_matches_torch():
    sizes = dict(seq_len=10, blocks=5, channels=8, intermediate_dim=32, output_dim=64, context_tokens=4)
    oracle = TorchAudioProj(**sizes)
    ours = load(lambda: AudioProjModel(**sizes, rngs=nnx.Rngs(0)), oracle, seed=1)
    x = np.random.default_rng(2).standard_normal((2, 3, 10, 5, 8)).astype(np.float32)
    out = np.asarray(ours(jnp.asarray(x)))
    assert out.shape == (2, 3, 4, 64)
    assert rel_err(out, torch_out(oracle, x)) <= 1e-5


def test_id_proj_matches_torch():
    oracle = TorchIDProj(128, 64, 48)
    ours = load(lambda: IDProjModel(128, 64, 48, rngs=nnx.Rngs(0)), oracle, seed=3)
    x = np.random.default_rng(4).standard_normal((5, 128)).astype(np.float32)
    out = np.asarray(ours(jnp.asarray(x)))
    assert out.shape == (5, 1, 48)
    assert rel_err(out, torch_out(oracle, x)) <= 1e-5


def test_motion_proj_matches_torch_and_unconditional_form():
    oracle = TorchVasaProj(40, 64)
    ours = load(lambda: MotionProjModel(40, 64, rngs=nnx.Rngs(0)), oracle, seed=5)
    rng = np.random.default_rng(6)
    expression = rng.standard_normal((2, 3, 40)).astype(np.float32)
    pose = rng.uniform(-30, 30, (2, 3, 6)).astype(np.float32)
    out = np.asarray(ours(jnp.asarray(expression), jnp.asarray(pose)))
    assert out.shape == (2, 3, 1, 64)
    assert rel_err(out, torch_out(oracle, expression, pose)) <= 1e-5
    np.testing.assert_array_equal(out[..., 58:], pose[:, :, None, :])
    # unconditional = [LN(bias of proj1) ; zeros(6)] = the projection of zero expression and pose
    uncond = np.asarray(ours.unconditional())
    assert uncond.shape == (1, 64)
    with torch.no_grad():
        expected = torch.cat([oracle.norm(oracle.proj1.bias), torch.zeros(6)]).numpy()
    assert rel_err(uncond[0], expected) <= 1e-6
    np.testing.assert_array_equal(uncond[0, 58:], 0.0)
    zeros = np.asarray(ours(jnp.zeros((40,)), jnp.zeros((6,))))
    np.testing.assert_allclose(uncond, zeros, rtol=0, atol=1e-6)
    assert VasaProjModel is MotionProjModel


@pytest.mark.parametrize("hw", [(32, 48), (20, 28)])
def test_pose_guider_matches_torch(hw):
    oracle = TorchPoseGuider(320)
    ours = load(lambda: PoseGuider(rngs=nnx.Rngs(0)), oracle, seed=7)
    x = np.random.default_rng(8).uniform(0, 1, (2,) + hw + (3,)).astype(np.float32)
    out = np.asarray(ours(jnp.asarray(x)))
    expected = torch_out(oracle, x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    assert out.shape == expected.shape == (2, -(-hw[0] // 8), -(-hw[1] // 8), 320)
    assert rel_err(out, expected) <= 1e-5


def test_audio_proj_unconditional_is_projection_of_zeros():
    sizes = dict(seq_len=10, blocks=5, channels=8, intermediate_dim=32, output_dim=64, context_tokens=4)
    oracle = TorchAudioProj(**sizes)
    model = load(lambda: AudioProjModel(**sizes, rngs=nnx.Rngs(0)), oracle, seed=9)
    uncond = np.asarray(model.unconditional())
    assert uncond.shape == (4, 64)
    np.testing.assert_array_equal(uncond, np.asarray(model(jnp.zeros((1, 1, 10, 5, 8))))[0, 0])
    assert rel_err(uncond, torch_out(oracle, np.zeros((1, 1, 10, 5, 8), np.float32))[0, 0]) <= 1e-5
    assert np.abs(uncond).max() > 0.1  # a learned constant, not zeros


# ----------------------------------------------------------------------------- init, counts, metadata

def test_pose_guider_zero_init_output():
    # initialised under jit with an rbg key: one fast compile instead of one threefry compile per shape
    model = nnx.jit(lambda: PoseGuider(rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))()
    x = jax.random.uniform(jax.random.key(1), (2, 3, 32, 24, 3))  # (batch, frames, H, W, 3)
    out = nnx.jit(lambda m, v: m(v))(model, x)
    assert out.shape == (2, 3, 4, 3, 320)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert np.abs(np.asarray(model.blocks[5].kernel[...])).max() > 0  # only conv_out is zero


OFFICIAL = [
    ("AudioProjModel", lambda: AudioProjModel(rngs=nnx.Rngs(0)), 54_300_672),
    ("IDProjModel", lambda: IDProjModel(rngs=nnx.Rngs(0)), 2_624_512),
    ("VasaProjModel", lambda: MotionProjModel(rngs=nnx.Rngs(0)), 524_270),
    ("PoseGuider", lambda: PoseGuider(rngs=nnx.Rngs(0)), 1_086_480),
]


@pytest.mark.parametrize("name,make,expected", OFFICIAL, ids=[o[0] for o in OFFICIAL])
def test_official_param_counts(name, make, expected):
    assert count(make) == expected


@pytest.mark.parametrize("name,make,expected", OFFICIAL, ids=[o[0] for o in OFFICIAL])
def test_logical_axes_on_every_param(name, make, expected):
    for path, var in nnx.to_flat_state(nnx.state(nnx.eval_shape(make), nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(var.get_value().shape), (name, path)


def test_official_key_names():
    from actalker_jax.convert import expected_keys

    def keys(make):
        return set(expected_keys(nnx.state(nnx.eval_shape(make), nnx.Param)))

    assert keys(OFFICIAL[0][1]) == {f"{m}.{p}" for m in ("proj1", "proj2", "proj3", "norm") for p in ("weight", "bias")}
    assert keys(OFFICIAL[1][1]) == {f"{m}.{p}" for m in ("proj1", "proj2", "proj3") for p in ("weight", "bias")}
    assert keys(OFFICIAL[2][1]) == {"proj1.weight", "proj1.bias", "norm.weight", "norm.bias"}
    assert keys(OFFICIAL[3][1]) == {f"{m}.{p}" for m in ["conv_in", "conv_out"] + [f"blocks.{i}" for i in range(6)]
                                    for p in ("weight", "bias")}


def test_wrong_key_is_rejected():
    oracle = TorchIDProj(16, 8, 8)
    state = state_dict_numpy(oracle)
    state["proj_1.weight"] = state.pop("proj1.weight")
    with pytest.raises(ConversionError, match="proj1.weight"):
        build_from_state_dict(lambda: IDProjModel(16, 8, 8, rngs=nnx.Rngs(0)), state)


def test_bfloat16_compute():
    oracle = randomize_(TorchIDProj(128, 64, 48), 10)
    model = build_from_state_dict(lambda: IDProjModel(128, 64, 48, rngs=nnx.Rngs(0), dtype=jnp.bfloat16),
                                  state_dict_numpy(oracle), jnp.float32)
    x = np.random.default_rng(11).standard_normal((3, 128)).astype(np.float32)
    out = model(jnp.asarray(x))
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out, np.float32), torch_out(oracle, x)) < 2e-2


def abstract(make):
    """The module under nnx.eval_shape: input validation runs before any computation, nothing is allocated."""
    return nnx.eval_shape(make)


@pytest.mark.parametrize("call,match", [
    (lambda: abstract(lambda: AudioProjModel(channels=8, rngs=nnx.Rngs(0)))(jnp.zeros((2, 10, 5, 9))),
     r"\(10, 5, 8\).*\(2, 10, 5, 9\)"),
    (lambda: abstract(lambda: IDProjModel(16, 8, 8, rngs=nnx.Rngs(0)))(jnp.zeros((2, 12))), r"\(16,\).*\(2, 12\)"),
    (lambda: abstract(lambda: MotionProjModel(8, 16, rngs=nnx.Rngs(0)))(jnp.zeros((2, 8)), jnp.zeros((2, 5))),
     r"pose.*\(6,\)"),
    (lambda: abstract(lambda: MotionProjModel(8, 16, rngs=nnx.Rngs(0)))(jnp.zeros((2, 8)), jnp.zeros((3, 6))),
     r"leading dims"),
    (lambda: abstract(lambda: PoseGuider(8, (4, 8), rngs=nnx.Rngs(0)))(jnp.zeros((1, 16, 16, 4))),
     r"\(1, 16, 16, 4\)"),
    (lambda: abstract(lambda: MotionProjModel(8, 6, rngs=nnx.Rngs(0))), r"pose_dim"),
    (lambda: abstract(lambda: PoseGuider(8, (), rngs=nnx.Rngs(0))), r"block_out_channels"),
    (lambda: abstract(lambda: PoseGuider(8, (4, 0), rngs=nnx.Rngs(0))), r"block_out_channels\[1\].*0"),
    (lambda: abstract(lambda: AudioProjModel(context_tokens=0, rngs=nnx.Rngs(0))), r"context_tokens.*0"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
