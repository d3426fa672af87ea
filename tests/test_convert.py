"""diffusers -> Flax conversion: folder loading, loud key errors, Orbax round trip, CLI."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from actalker_jax import convert
from actalker_jax.models.unet import UNetConfig
from torch_utils import randomize_

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """A pipeline-style folder with a tiny random diffusers UNet in unet/."""
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    root = tmp_path_factory.mktemp("svd")
    randomize_(TorchUNet(**UNetConfig.tiny().to_diffusers()), seed=0).save_pretrained(root / "unet")
    return root


def params_by_key(module):
    return {convert.path_to_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_load_unet_from_pipeline_and_model_folder(unet_folder):
    from_pipeline = convert.load_diffusers_unet(str(unet_folder))
    from_model = convert.load_diffusers_unet(str(unet_folder / "unet"))
    assert from_pipeline.config == UNetConfig.tiny()
    state = load_file(str(unet_folder / "unet" / WEIGHTS))
    got = params_by_key(from_pipeline)
    assert set(got) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(convert.flax_to_torch_layout(key, got[key]), value)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(from_pipeline), nnx.state(from_model))


def test_load_in_bfloat16(unet_folder):
    unet = convert.load_diffusers_unet(str(unet_folder), jnp.bfloat16)
    assert {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(unet, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


def _edited_copy(src, dst, edit):
    os.makedirs(dst / "unet")
    (dst / "unet" / "config.json").write_text((src / "unet" / "config.json").read_text())
    state = load_file(str(src / "unet" / WEIGHTS))
    edit(state)
    save_file(state, str(dst / "unet" / WEIGHTS))
    return dst


def test_missing_key_is_named(unet_folder, tmp_path):
    key = "down_blocks.0.attentions.0.proj_in.weight"
    folder = _edited_copy(unet_folder, tmp_path, lambda s: s.pop(key))
    with pytest.raises(convert.ConversionError, match=f"missing keys.*{key}"):
        convert.load_diffusers_unet(str(folder))


def test_unexpected_key_is_named(unet_folder, tmp_path):
    folder = _edited_copy(unet_folder, tmp_path, lambda s: s.update({"mid_block.bogus.weight": np.zeros(3, np.float32)}))
    with pytest.raises(convert.ConversionError, match="unexpected keys.*mid_block.bogus.weight"):
        convert.load_diffusers_unet(str(folder))


def test_wrong_shape_names_key_and_both_shapes(unet_folder, tmp_path):
    key = "conv_in.weight"

    def edit(state):
        state[key] = np.zeros((32, 7, 3, 3), np.float32)

    folder = _edited_copy(unet_folder, tmp_path, edit)
    with pytest.raises(convert.ConversionError, match=r"conv_in.weight.*\(3, 3, 7, 32\).*\(3, 3, 8, 32\)"):
        convert.load_diffusers_unet(str(folder))


def test_bad_paths(tmp_path):
    with pytest.raises(convert.ConversionError, match="not a directory"):
        convert.load_diffusers_unet(str(tmp_path / "nowhere"))
    with pytest.raises(convert.ConversionError, match="no config.json"):
        convert.load_diffusers_unet(str(tmp_path))
    os.makedirs(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(convert.ConversionError, match="no safetensors weights"):
        convert.load_diffusers_unet(str(tmp_path))


def test_cli_orbax_round_trip(unet_folder, tmp_path):
    out = tmp_path / "converted"
    assert convert.main(["svd", "--src", str(unet_folder), "--out", str(out), "--models", "unet"]) == 0
    loaded = convert.load_converted(str(out), "unet")
    original = convert.load_diffusers_unet(str(unet_folder))
    assert loaded.config == UNetConfig.tiny()
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded, nnx.Param), nnx.state(original, nnx.Param))


def test_cli_usage_and_one_line_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "actalker_jax.convert", *args], capture_output=True, text=True,
                              timeout=120)

    help_run = run("--help")
    assert help_run.returncode == 0 and "usage:" in help_run.stdout
    bad = run("svd", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "not a directory" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_converts_pipeline_with_vae(unet_folder, tmp_path):
    """A full pipeline folder (unet/ and vae/) -> Orbax -> identical parameters for both models."""
    from diffusers import AutoencoderKLTemporalDecoder as TorchVAE

    from actalker_jax.models.vae import VAEConfig

    pipeline = tmp_path / "svd"
    shutil.copytree(unet_folder / "unet", pipeline / "unet")
    randomize_(TorchVAE(**VAEConfig.tiny().to_diffusers()), seed=1).save_pretrained(pipeline / "vae")
    out = tmp_path / "converted"
    assert convert.main(["svd", "--src", str(pipeline), "--out", str(out)]) == 0
    for name, loader in (("unet", convert.load_diffusers_unet), ("vae", convert.load_diffusers_vae)):
        loaded = convert.load_converted(str(out), name)
        original = loader(str(pipeline))
        assert loaded.config == original.config
        jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded, nnx.Param), nnx.state(original, nnx.Param))
    vae = convert.load_converted(str(out), "vae", jnp.bfloat16)
    assert vae.decoder.conv_out.kernel.get_value().dtype == jnp.bfloat16
