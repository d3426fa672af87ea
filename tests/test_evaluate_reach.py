"""The PCM condition-reach probe (eval/reach.py): exact per-token derivative norms, zero outside the regions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from actalker_jax.eval import reach
from actalker_jax.models.pcm import PCMLayer
from actalker_jax.sample import LoadedModel
from demo_config import probe_config


def test_token_reach_is_the_frobenius_norm_of_the_jacobian():
    """Against jax.jacrev of the layer (reference scan): per token, over output channels and the condition entries
    of the token's own frame; with all-ones masks every token is reached."""
    batch, frames, grid, channels, dc = 2, 2, (4, 4), 8, 8
    layer = PCMLayer(channels, dc, rngs=nnx.Rngs(0), scan_impl="sequential")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch * frames, 16, channels)), jnp.float32)
    mouth = np.zeros((batch, 16, 16), np.float32)
    mouth[:, 8:14, 4:12] = 1
    conditions = dict(audio_tokens=jnp.asarray(rng.standard_normal((batch, frames, 3, dc)), jnp.float32),
                      motion_tokens=jnp.asarray(rng.standard_normal((batch, frames, 1, dc)), jnp.float32),
                      mask_audio=jnp.asarray(mouth), mask_motion=jnp.ones((batch, 16, 16)))
    call = dict(encoder_hidden_states=jnp.asarray(rng.standard_normal((batch * frames, 1, dc)), jnp.float32),
                conditions=conditions, num_frames=frames, grid=grid)
    for key in ("audio_tokens", "motion_tokens"):
        got = reach.token_reach(layer, x, call, key)
        layer.audio_unit.scan_impl = layer.exp_unit.scan_impl = "reference"
        jac = jax.jacrev(lambda c: layer(x, **{**call, "conditions": {**conditions, key: c}}))(conditions[key])
        layer.audio_unit.scan_impl = layer.exp_unit.scan_impl = "sequential"
        jac = np.asarray(jac).reshape(batch, frames, 16, channels, batch, frames, -1)
        own = np.stack([np.stack([jac[b, f, :, :, b, f] for f in range(frames)]) for b in range(batch)])
        np.testing.assert_allclose(got, np.sqrt((own ** 2).sum((-1, -2))), rtol=1e-5, atol=1e-8)
        assert got.shape == (batch, frames, 16)
    audio = reach.token_reach(layer, x, call, "audio_tokens")
    keep = np.broadcast_to(np.asarray(mouth[:, 2::4, 2::4] > 0).reshape(batch, 1, 16), audio.shape)
    assert np.all(audio[~keep] == 0) and np.all(audio[keep] > 0)
    assert np.all(reach.token_reach(layer, x, call, "motion_tokens") > 0)


@pytest.fixture(scope="module")
def initial_model(tmp_path_factory):
    config = probe_config(tmp_path_factory.mktemp("records"), num_clips=2)
    config.model.unet.num_frames = 4
    return LoadedModel.from_params(config, reach.initial_params(config), 0, config.data.records)


def test_every_pcm_layer_is_measured_and_masks_hold(initial_model, tmp_path):
    result = reach.run_reach(initial_model, batch_size=2, split="train", out=str(tmp_path))
    assert json.loads((tmp_path / "reach.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "reach.png").stat().st_size > 0
    names = [row["name"] for row in result["layers"]]
    assert names == ["unet.down_blocks.0.attentions.0.mamba_blocks.0", "unet.up_blocks.0.attentions.0.mamba_blocks.0",
                     "unet.up_blocks.0.attentions.1.mamba_blocks.0"]
    for row in result["layers"]:
        assert row["grid"] == [8, 8]
        assert row["audio_outside"] == row["motion_outside"] == 0.0      # mask-drop: nothing leaks out of a region
        assert row["audio_region"] > 0 and min(row["motion_thirds"]) > 0
        # The reverse scan enters the motion region at its last token: the bottom third is reached most.
        assert row["motion_thirds"][2] > row["motion_thirds"][0]
    assert "| unet.down_blocks.0.attentions.0.mamba_blocks.0 | 8x8 |" in reach.markdown_table(result)


def test_a_model_without_pcm_is_named(initial_model, tmp_path):
    config = initial_model.config.copy_and_resolve_references()
    config.model.pcm.enabled = False
    loaded = LoadedModel.from_params(config, reach.initial_params(config), 0, initial_model.path)
    with pytest.raises(ValueError, match="no PCM layers"):
        reach.run_reach(loaded, batch_size=2, split="train", out=str(tmp_path))
    with pytest.raises(ValueError, match="--sigma must be positive"):
        reach.run_reach(initial_model, sigma=0.0, out=str(tmp_path))
