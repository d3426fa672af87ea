"""Official ACTalker checkpoint import (spec §10): export a tiny model to the six official files, import it back.

The tiny model keeps the official audio window (10, 5, 384), so no size override is needed and the CLI
(which takes none) can convert it; every parameter gets its own seeded random values, so swapped or
mis-transposed tensors (e.g. the IP copies, which the model initialises as equal) cannot go unnoticed.
"""

import functools
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from actalker_jax import convert
from actalker_jax.models.actalker import ACTalkerConfig, ACTalkerModel
from actalker_jax.models.actalker_unet import PCMConfig

CONFIG = ACTalkerConfig.tiny(pcm=PCMConfig(scan_impl="reference"), audio_seq_len=10, audio_blocks=5,
                             audio_channels=384)
STEP = 3
B, F, LATENT = 1, 2, (4, 4)
IMAGE = (8 * LATENT[0], 8 * LATENT[1])


def random_module(make, seed: int) -> nnx.Module:
    """`make()` built without its random init, every parameter filled from one seeded generator."""
    abstract = nnx.eval_shape(make)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, var in nnx.to_flat_state(params):
        shape = var.get_value().shape
        fan_in = int(np.prod(shape[:-1])) if len(shape) >= 2 else 16
        value = rng.standard_normal(shape).astype(np.float32) / np.sqrt(fan_in)
        leaves.append((path, var.replace(jnp.asarray(1.0 + value if path[-1] == "scale" else value))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest)


def random_model(seed: int) -> ACTalkerModel:
    return random_module(lambda: ACTalkerModel(CONFIG, rngs=nnx.Rngs(0)), seed)


def params_by_key(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {convert.path_to_key(path): np.asarray(var.get_value()) for path, var in flat}


def assert_same_params(got, want):
    got, want = params_by_key(got), params_by_key(want)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.fixture(scope="module")
def model():
    return random_model(0)


@pytest.fixture(scope="module")
def svd_dir(tmp_path_factory):
    """A diffusers-style pipeline folder holding only unet/config.json."""
    root = tmp_path_factory.mktemp("svd")
    os.makedirs(root / "unet")
    (root / "unet" / "config.json").write_text(json.dumps(CONFIG.unet.to_diffusers()))
    return root


@pytest.fixture(scope="module")
def official(tmp_path_factory, model):
    """The six official files of step STEP: DeepSpeed `module.` prefix on half the UNet keys, adapter as safetensors."""
    root = tmp_path_factory.mktemp("official")
    paths = convert.export_official_actalker(model, str(root), STEP)
    unet = convert.read_official_file(paths["unet"])
    convert.write_official_file({("module." + k if i % 2 else k): unet[k] for i, k in enumerate(sorted(unet))},
                                paths["unet"])
    adapter = convert.read_official_file(paths["adapter_module"])
    convert.write_official_file(adapter, str(root / f"adapter_module-{STEP}.safetensors"))
    os.remove(paths["adapter_module"])
    return root


def load(folder, **kw):
    return convert.load_official_actalker(str(folder), unet_config=CONFIG.unet.to_diffusers(), pcm=CONFIG.pcm, **kw)


def edited_copy(src, dst, name, edit):
    """Copies the official folder and applies `edit(state)` to file `name`."""
    shutil.copytree(src, dst)
    _, paths = convert.official_checkpoint_files(str(dst), STEP)
    state = convert.read_official_file(paths[name])
    edit(state)
    convert.write_official_file(state, paths[name])
    return dst


@functools.lru_cache(maxsize=None)
def _jitted_call(graphdef):
    """One compiled call per model structure (equal graphdefs share it)."""

    @jax.jit
    def run(state, sample, conditions, mask):
        return nnx.merge(graphdef, state)(sample, jnp.asarray([0.3]), jnp.asarray([[12.5, 12.0, 20.0]]), conditions,
                                          jnp.ones((B, 2)), mask_audio=mask, mask_motion=1.0 - mask)

    return run


def forward(model):
    """The high-level call (all encoders and the UNet) on fixed seeded inputs -> (B, F, h, w, 4)."""
    rng = np.random.default_rng(7)
    c = model.config
    conditions = dict(
        audio=jnp.asarray(rng.standard_normal((B, F, c.audio_seq_len, c.audio_blocks, c.audio_channels)), jnp.float32),
        expression=jnp.asarray(rng.standard_normal((B, F, c.expression_dim)), jnp.float32),
        pose=jnp.asarray(rng.uniform(-20, 20, (B, F, c.pose_dim)), jnp.float32),
        id_embed=jnp.asarray(rng.standard_normal((B, c.id_dim)), jnp.float32),
        face_image=jnp.asarray(rng.uniform(0, 1, (B,) + IMAGE + (3,)), jnp.float32))
    sample = jnp.asarray(rng.standard_normal((B, F) + LATENT + (8,)), jnp.float32)
    mask = np.zeros((B,) + IMAGE, np.float32)
    mask[:, 8:24, 4:28] = 1
    graphdef, state = nnx.split(model)
    return np.asarray(_jitted_call(graphdef)(state, sample, conditions, jnp.asarray(mask)))


def test_export_follows_official_layout(model, official):
    """PyTorch layouts of spec §10 and the adapter order: down, up, mid; spatial attn2 before temporal."""
    unet = convert.read_official_file(str(official / f"unet-{STEP}.pth"))
    adapter = convert.read_official_file(str(official / f"adapter_module-{STEP}.safetensors"))
    assert not any(k.startswith("module.") for k in unet)
    pcm = "down_blocks.0.attentions.0.mamba_blocks.0."
    c, d, r, n, dc = 32, 64, 2, 16, CONFIG.cond_dim
    assert unet[pcm + "in_proj1.weight"].shape == (d, c)
    assert unet[pcm + "out_proj.weight"].shape == (c, d)
    assert unet[pcm + "audio_proj.weight"].shape == (d, dc)
    assert unet[pcm + "audio_unit.x_proj_weight"].shape == (2, r + 2 * n, d)
    assert unet[pcm + "audio_unit.dt_projs_weight"].shape == (2, d, r)
    assert unet[pcm + "exp_unit.A_logs"].shape == (2 * d, n)
    a_logs = model.unet.down_blocks[0].attentions[0].mamba_blocks[0].exp_unit.A_logs
    np.testing.assert_array_equal(unet[pcm + "exp_unit.A_logs"], np.asarray(a_logs.get_value()))
    transformers = ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
                    "mid_block.attentions.0"]
    kinds = ("transformer_blocks", "temporal_transformer_blocks")  # spatial attn2 before temporal attn2
    order = [f"{t}.{kind}.0" for t in transformers for kind in kinds]
    assert set(adapter) == {f"{i}.to_{kv}_ip.{j}.weight" for i in range(len(order)) for kv in "kv" for j in (0, 1)}
    for i, block in enumerate(order):
        for kv in "kv":
            for j in (0, 1):
                np.testing.assert_array_equal(adapter[f"{i}.to_{kv}_ip.{j}.weight"],
                                              unet[f"{block}.attn2.processor.to_{kv}_ip.{j}.weight"])
    pose_guider = convert.read_official_file(str(official / f"pose_guider-{STEP}.pth"))
    assert pose_guider["blocks.3.weight"].shape == (16, 8, 3, 3)
    vasa = convert.read_official_file(str(official / f"vasa_linear-{STEP}.pth"))
    assert vasa["proj1.weight"].shape == (dc - 6, CONFIG.expression_dim)


def test_round_trip_params_and_forward(model, official, svd_dir):
    """module.-prefixed .pth + .safetensors files, config.json from a pipeline folder: same params, same output."""
    loaded = convert.load_official_actalker(str(official), unet_config=str(svd_dir), step=STEP, pcm=CONFIG.pcm)
    assert loaded.config == CONFIG
    assert_same_params(loaded, model)
    out = forward(loaded)
    assert out.shape == (B, F) + LATENT + (4,) and np.isfinite(out).all() and np.abs(out).mean() > 1e-3
    np.testing.assert_array_equal(out, forward(model))


def test_sizes_and_pcm_config_come_from_the_checkpoint(model, official, svd_dir):
    loaded = convert.load_official_actalker(str(official), unet_config=str(svd_dir / "unet" / "config.json"),
                                            dtype=jnp.bfloat16)
    assert loaded.config == ACTalkerConfig(**{**CONFIG.to_dict(), "pcm": PCMConfig()})
    assert {v.dtype for v in params_by_key(loaded).values()} == {jnp.dtype(jnp.bfloat16)}


def test_sizes_of_the_released_checkpoint():
    """The released shapes (spec §4, §10) give exactly ACTalkerConfig.svd_xt() (shapes only, nothing allocated)."""
    from actalker_jax.models.unet import UNetConfig

    def fake(**shapes):
        return {k.replace("__", "."): np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}

    conv = (3, 3)
    states = dict(
        audio_linear=fake(proj1__weight=(1024, 19200), proj3__weight=(32 * 1024, 1024), norm__weight=(1024,)),
        id_proj_model=fake(proj1__weight=(1024, 512), proj3__weight=(1024, 1024)),
        vasa_linear=fake(proj1__weight=(1018, 512)),
        pose_guider=fake(conv_in__weight=(16, 3) + conv, blocks__0__weight=(16, 16) + conv,
                         blocks__1__weight=(32, 16) + conv, blocks__2__weight=(32, 32) + conv,
                         blocks__3__weight=(96, 32) + conv, blocks__4__weight=(96, 96) + conv,
                         blocks__5__weight=(256, 96) + conv, conv_out__weight=(320, 256) + conv),
        unet=fake(down_blocks__0__attentions__0__mamba_blocks__0__in_proj1__weight=(640, 320),
                  down_blocks__0__attentions__0__mamba_blocks__0__audio_unit__A_logs=(1280, 16)))
    paths = {name: f"{name}-136000.pth" for name in states}
    unet = UNetConfig.svd_xt(temporal_context="frame_mean")
    sizes = convert._official_sizes(unet, states, paths, {})
    pcm = convert._official_pcm_config(states["unet"], paths["unet"])
    assert ACTalkerConfig(unet=unet, pcm=pcm, **sizes) == ACTalkerConfig.svd_xt()
    states["vasa_linear"] = fake(proj1__weight=(1030, 512))
    with pytest.raises(convert.ConversionError, match="vasa_linear-136000.pth: proj1.weight gives 1030 features"):
        convert._official_sizes(unet, states, paths, {})


def test_unet_without_ip_keys_takes_the_adapter_copies(model, official, tmp_path):
    def drop_ip(state):
        for key in [k for k in state if "_ip." in k]:
            del state[key]

    folder = edited_copy(official, tmp_path / "o", "unet", drop_ip)
    assert_same_params(load(folder), model)


ERRORS = {
    "missing_key": ("id_proj_model", lambda s: s.pop("proj2.bias"),
                    r"missing keys in \S*id_proj_model-3.pth: \['proj2.bias'\]"),
    "extra_key": ("pose_guider", lambda s: s.update({"conv_mid.weight": np.zeros(4, np.float32)}),
                  r"unexpected keys in \S*pose_guider-3.pth: \['conv_mid.weight'\]"),
    "wrong_shape": ("unet", lambda s: s.update({"down_blocks.0.attentions.0.mamba_blocks.0.out_proj.weight":
                                                np.zeros((32, 63), np.float32)}),
                    r"'down_blocks.0.attentions.0.mamba_blocks.0.out_proj.weight'.*\(63, 32\).*\(64, 32\) "
                    r"in \S*unet-3.pth"),
    "ip_mismatch": ("adapter_module", lambda s: s.update({"5.to_v_ip.1.weight": s["5.to_v_ip.1.weight"] + 1}),
                    r"'5.to_v_ip.1.weight' in \S*adapter_module-3.safetensors differs from its copy "
                    r"'up_blocks.1.attentions.1.temporal_transformer_blocks.0.attn2.processor.to_v_ip.1.weight' "
                    r"in \S*unet-3.pth"),
    "bad_adapter_shape": ("adapter_module",
                          lambda s: s.update({"0.to_k_ip.0.weight": np.zeros((32, 31), np.float32)}),
                          r"'0.to_k_ip.0.weight'.*\(32, 31\).*\(32, 32\).*adapter_module-3.safetensors"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_file_and_key(official, tmp_path, case):
    name, edit, pattern = ERRORS[case]
    folder = edited_copy(official, tmp_path / "o", name, edit)
    with pytest.raises(convert.ConversionError, match=pattern):
        load(folder, step=STEP)


def test_missing_file_is_named(official, tmp_path):
    folder = tmp_path / "o"
    shutil.copytree(official, folder)
    os.remove(folder / f"vasa_linear-{STEP}.pth")
    with pytest.raises(convert.ConversionError, match=r"missing official checkpoint file \S*vasa_linear-3.pth"):
        load(folder, step=STEP)
    with pytest.raises(convert.ConversionError, match=r"step 3 lacks \['vasa_linear-3.pth'\]"):
        load(folder)


def test_step_none_picks_the_newest_complete_step(model, official, tmp_path):
    """Steps 3 (model), 10 (another model) complete, 12 incomplete: step None loads step 10."""
    folder = tmp_path / "o"
    shutil.copytree(official, folder)
    newer = random_model(1)
    convert.export_official_actalker(newer, str(folder), 10)
    shutil.copy(folder / "unet-10.pth", folder / "unet-12.pth")
    assert convert.official_checkpoint_files(str(folder))[0] == 10
    assert_same_params(load(folder), newer)
    assert_same_params(load(folder, step=STEP), model)


def test_audio_window_other_than_official_needs_overrides(official, tmp_path):
    """proj1 in-features 64 != 19,200: the error asks for the factorisation; with it the model loads."""
    folder = edited_copy(official, tmp_path / "o", "audio_linear",
                         lambda s: s.update({"proj1.weight": s["proj1.weight"][:, :64]}))
    with pytest.raises(convert.ConversionError, match="audio_linear-3.pth: proj1.weight takes 64 input features.*"
                                                      "pass audio_seq_len, audio_blocks and audio_channels"):
        load(folder)
    with pytest.raises(convert.ConversionError, match=r"2 \* 2 \* 8 = 32"):
        load(folder, audio_seq_len=2, audio_blocks=2, audio_channels=8)
    loaded = load(folder, audio_seq_len=2, audio_blocks=2, audio_channels=16)
    assert (loaded.config.audio_seq_len, loaded.config.audio_blocks, loaded.config.audio_channels) == (2, 2, 16)
    assert loaded.audio_proj.proj1.kernel.get_value().shape == (64, CONFIG.audio_hidden_dim)


def test_pth_without_torch_says_what_to_install(official, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(convert.ConversionError, match=r"unet-3.pth: needs PyTorch.*pip install torch"):
        convert.read_official_file(str(official / f"unet-{STEP}.pth"))
    assert "0.to_k_ip.0.weight" in convert.read_official_file(str(official / f"adapter_module-{STEP}.safetensors"))


def test_cli_round_trip_through_orbax(model, official, svd_dir, tmp_path, capsys):
    """`actalker` command -> OUT/actalker (+ OUT/vae from the pipeline's vae/) -> load_converted: same parameters."""
    from safetensors.numpy import save_file

    from actalker_jax.models.vae import AutoencoderKLTemporalDecoder, VAEConfig

    pipeline = tmp_path / "svd"
    shutil.copytree(svd_dir, pipeline)
    os.makedirs(pipeline / "vae")
    (pipeline / "vae" / "config.json").write_text(json.dumps(VAEConfig.tiny().to_diffusers()))
    vae = random_module(lambda: AutoencoderKLTemporalDecoder(VAEConfig.tiny(), rngs=nnx.Rngs(0)), 2)
    save_file({k: np.ascontiguousarray(convert.flax_to_torch_layout(k, v)) for k, v in params_by_key(vae).items()},
              str(pipeline / "vae" / convert.WEIGHT_NAMES[0]))
    out = tmp_path / "converted"
    assert convert.main(["actalker", "--svd", str(pipeline), "--official", str(official), "--out", str(out)]) == 0
    assert f"step {STEP}" in capsys.readouterr().out
    loaded = convert.load_converted(str(out), "actalker")
    config = loaded.config
    assert config == ACTalkerConfig(**{**CONFIG.to_dict(), "pcm": PCMConfig()})
    assert json.loads((out / "actalker_config.json").read_text()) == json.loads(json.dumps(config.to_dict()))
    assert_same_params(loaded, model)
    loaded_vae = convert.load_converted(str(out), "vae")
    vae_config = loaded_vae.config
    assert vae_config == VAEConfig.tiny()
    assert_same_params(loaded_vae, vae)


def test_cli_usage_and_one_line_errors(official, svd_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["actalker", "--help"])
    assert exit_info.value.code == 0 and "--official" in capsys.readouterr().out
    for args, message in ((["--svd", str(svd_dir), "--official", str(tmp_path / "nowhere")], "not a directory"),
                          (["--svd", str(tmp_path / "nowhere"), "--official", str(official)], "not a directory"),
                          (["--svd", str(svd_dir), "--official", str(official), "--step", "4"],
                           "missing official checkpoint file")):
        assert convert.main(["actalker", *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err
