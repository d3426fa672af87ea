"""ACTalkerModel: full-size count, gates and condition drops as the official code applies them, mask modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from actalker_jax.models.actalker import ACTalkerConfig, ACTalkerModel, control_masks
from actalker_jax.models.actalker_unet import PCMConfig
from actalker_jax.models.unet import count_params

CONFIG = ACTalkerConfig.tiny(pcm=PCMConfig(scan_impl="xla"))
B, F, LATENT = 2, 2, (4, 6)
IMAGE = (8 * LATENT[0], 8 * LATENT[1])


def test_svd_xt_model_count_without_allocation():
    model = nnx.eval_shape(lambda: ACTalkerModel(ACTalkerConfig.svd_xt(), rngs=nnx.Rngs(0)))
    assert count_params(model) == 1_524_623_082 + 309_373_694  # SVD-xt + spec §9 additions
    assert count_params(model.audio_proj) == 54_300_672
    assert count_params(model.pose_guider) == 1_086_480


def conditions(seed):
    rng = np.random.default_rng(seed)
    c = CONFIG
    return dict(
        audio=jnp.asarray(rng.standard_normal((B, F, c.audio_seq_len, c.audio_blocks, c.audio_channels)), jnp.float32),
        expression=jnp.asarray(rng.standard_normal((B, F, c.expression_dim)), jnp.float32),
        pose=jnp.asarray(rng.uniform(-20, 20, (B, F, 6)), jnp.float32),
        id_embed=jnp.asarray(rng.standard_normal((B, c.id_dim)), jnp.float32),
        face_image=jnp.asarray(rng.uniform(0, 1, (B,) + IMAGE + (3,)), jnp.float32),
    )


def region_masks():
    mouth = np.zeros((B,) + IMAGE, np.float32)
    mouth[:, 18:30, 12:36] = 1
    face = np.zeros((B,) + IMAGE, np.float32)
    face[:, 2:30, 4:44] = 1
    return dict(mouth=jnp.asarray(mouth), face_minus_mouth=jnp.asarray(face - mouth), face_box=jnp.asarray(face))


@pytest.fixture(scope="module")
def model():
    return ACTalkerModel(CONFIG, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))  # rbg: fast eager init on CPU


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
    def forward(state, sample, t, ids, cond, gates, masks, drops):
        return nnx.merge(graphdef, state)(sample, t, ids, cond, gates, mask_audio=masks[0], mask_motion=masks[1],
                                          **drops)
    return jax.jit(forward)


def run(model, cond, gates, masks, drop_appearance=(False,) * B, drop_audio=(False,) * B, drop_motion=(False,) * B):
    """Jitted high-level call; every drop flag is always passed so that one program serves all cases."""
    drops = dict(drop_appearance=drop_appearance, drop_audio=drop_audio, drop_motion=drop_motion)
    rng = np.random.default_rng(7)
    sample = jnp.asarray(rng.standard_normal((B, F) + LATENT + (8,)), jnp.float32)
    t = jnp.asarray([0.3, -0.5], jnp.float32)
    ids = jnp.asarray([[12.5, 12, 20]] * B, jnp.float32)
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef)(state, sample, t, ids, cond, jnp.asarray(gates, jnp.float32), masks,
                                         {k: jnp.asarray(v) for k, v in drops.items()}))


def test_gates(model):
    """Audio-only ignores motion, motion-only ignores audio, both open use both; gates are per sample."""
    base, other = conditions(0), conditions(1)
    new_audio = dict(base, audio=other["audio"])
    new_motion = dict(base, expression=other["expression"], pose=other["pose"])
    m = region_masks()
    masks = (m["mouth"], m["face_minus_mouth"])
    audio_only, motion_only, both = [[1, 0]] * B, [[0, 1]] * B, [[1, 1]] * B
    np.testing.assert_array_equal(run(model, new_motion, audio_only, masks), run(model, base, audio_only, masks))
    np.testing.assert_array_equal(run(model, new_audio, motion_only, masks), run(model, base, motion_only, masks))
    assert np.abs(run(model, new_audio, audio_only, masks) - run(model, base, audio_only, masks)).max() > 1e-5
    assert np.abs(run(model, new_motion, both, masks) - run(model, base, both, masks)).max() > 1e-5
    mixed = run(model, new_audio, [[1, 0], [0, 1]], masks) - run(model, base, [[1, 0], [0, 1]], masks)
    assert np.abs(mixed[0]).max() > 1e-5 and np.abs(mixed[1]).max() == 0.0


def test_condition_drops_use_the_unconditional_forms(model):
    """Dropped audio/motion equal the projection of zero inputs; dropped appearance zeroes ID and reference."""
    base = conditions(0)
    m = region_masks()
    masks = (m["mouth"], m["face_minus_mouth"])
    gates = [[1, 1]] * B
    zero_audio = dict(base, audio=jnp.zeros_like(base["audio"]))
    np.testing.assert_allclose(run(model, base, gates, masks, drop_audio=[True, True]),
                               run(model, zero_audio, gates, masks), rtol=1e-6, atol=1e-6)
    zero_motion = dict(base, expression=jnp.zeros_like(base["expression"]), pose=jnp.zeros_like(base["pose"]))
    np.testing.assert_allclose(run(model, base, gates, masks, drop_motion=[True, False])[0],
                               run(model, zero_motion, gates, masks)[0], rtol=1e-6, atol=1e-6)
    tokens = model.condition_tokens(base, jnp.ones((B, 2)), drop_appearance=jnp.asarray([True, False]))
    assert float(jnp.abs(tokens["id_tokens"][0]).max()) == 0.0 and float(jnp.abs(tokens["id_tokens"][1]).max()) > 0
    dropped = run(model, base, gates, masks, drop_appearance=[True, True])
    assert np.abs(dropped - run(model, base, gates, masks)).max() > 1e-5


def test_control_masks_official_and_regions():
    m = region_masks()
    gates = jnp.asarray([[1, 0], [1, 1]], jnp.float32)
    audio, motion = control_masks("official", gates, **m)
    np.testing.assert_array_equal(audio[0], m["face_box"][0])
    np.testing.assert_array_equal(motion[0], 0.0)
    np.testing.assert_array_equal(audio[1], 1.0)
    np.testing.assert_array_equal(motion[1], 1.0)
    audio, motion = control_masks("official", jnp.asarray([[0, 1], [0, 0]], jnp.float32), **m)
    np.testing.assert_array_equal(motion[0], m["face_box"][0])
    np.testing.assert_array_equal(audio, 0.0)
    np.testing.assert_array_equal(motion[1], 0.0)
    audio, motion = control_masks("regions", gates, **m)
    np.testing.assert_array_equal(audio, m["mouth"])
    np.testing.assert_array_equal(motion, m["face_minus_mouth"])
    with pytest.raises(ValueError, match="masks mode"):
        control_masks("all", gates, **m)


def test_config_round_trip_and_errors():
    config = ACTalkerConfig.tiny(pcm=PCMConfig(scan_over="video"))
    assert ACTalkerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="inference_masks"):
        ACTalkerConfig.tiny(inference_masks="box")
