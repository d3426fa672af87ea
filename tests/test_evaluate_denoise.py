"""The denoising probe (eval/denoise.py) with stand-in models whose answers are known."""

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

from actalker_jax import diffusion, evaluate
from actalker_jax.eval import denoise
from actalker_jax.media import Media
from demo_config import probe_config


@pytest.fixture(scope="module", params=["zero", "reference"])
def config(request, tmp_path_factory):
    """The probe's config with SVD's prior and with the reference prior (diffusion.data_prior)."""
    config = probe_config(tmp_path_factory.mktemp("records"), num_clips=3)
    config.diffusion.center = request.param
    config.diffusion.sigma_data = 1.0 if request.param == "zero" else 0.15
    return config


def _stand_in(config, use_audio: bool, use_pose: bool = False):
    """A 'model' whose x0 is the reference latent, plus (use_audio) the mean of its audio windows everywhere and
    (use_pose) 1e-2 x the mean of its pose everywhere."""

    edm = diffusion.EDMConfig(**config.diffusion.to_dict())

    def model(sample, timestep, added_time_ids, conditions, gates, *, mask_audio, mask_motion):
        sigma = jnp.exp(4.0 * timestep)[:, None, None, None, None]
        half = sample.shape[-1] // 2
        ref = sample[..., half:]
        prior = diffusion.data_prior(ref, edm)
        c = diffusion.preconditioning(sigma, prior.std)
        x, target = sample[..., :half] / c.c_in + prior.mean, ref * edm.latent_scale
        if use_audio:
            target = target + jnp.mean(conditions["audio"], axis=(2, 3, 4))[:, :, None, None, None]
        if use_pose:
            target = target + 1e-2 * jnp.mean(conditions["pose"], axis=2)[:, :, None, None, None]
        return (target - prior.mean - c.c_skip * (x - prior.mean)) / c.c_out

    return types.SimpleNamespace(config=config, step=7, media=Media(config), model=model)


def test_copying_the_reference_scores_like_the_reference(config, tmp_path):
    result = denoise.run_denoise(_stand_in(config, False), sigmas=(0.5, 2.0), batch_size=3, split="train",
                                 out=str(tmp_path))
    assert json.loads((tmp_path / "denoise.json").read_text()) == json.loads(json.dumps(result))
    assert result["checkpoint_step"] == 7 and list(result["sigmas"]) == ["0.5", "2"]
    for row in result["sigmas"].values():
        assert set(row) == set(denoise.KEYS)
        assert row["all"] == pytest.approx(row["copy_reference"], rel=1e-4)
        assert row["mouth"] == pytest.approx(row["mouth_other_audio"], rel=1e-6)   # conditions unused
        assert row["face"] == pytest.approx(row["face_other_motion"], rel=1e-6)
        assert row["mouth_change_audio"] == row["face_change_expression"] == row["face_change_pose"] == 0.0
        assert row["face_motion"] > 0
    assert "| 2 | " in denoise.markdown_table(result)


def test_a_model_that_uses_the_audio_is_told_apart(config, tmp_path):
    row = denoise.run_denoise(_stand_in(config, True), sigmas=(1.0,), batch_size=3, split="train",
                              out=str(tmp_path))["sigmas"]["1"]
    assert row["mouth_other_audio"] != pytest.approx(row["mouth"], rel=1e-3)
    assert row["face"] == pytest.approx(row["face_other_motion"], rel=1e-6)
    assert row["mouth_change_audio"] > 1e-6 and row["face_change_expression"] == row["face_change_pose"] == 0.0


def test_the_pose_and_expression_sensitivities_are_told_apart(config, tmp_path):
    row = denoise.run_denoise(_stand_in(config, False, use_pose=True), sigmas=(1.0,), batch_size=3, split="train",
                              out=str(tmp_path))["sigmas"]["1"]
    assert row["face_change_pose"] > 1e-8
    assert row["face_change_expression"] == row["mouth_change_audio"] == 0.0


def test_bad_arguments_are_named(config, tmp_path):
    loaded = _stand_in(config, False)
    with pytest.raises(ValueError, match="--batch must be >= 2"):
        denoise.run_denoise(loaded, batch_size=1, split="train", out=str(tmp_path))
    with pytest.raises(ValueError, match="split 'eval' is empty"):    # eval_fraction 0
        denoise.run_denoise(loaded, batch_size=2, split="eval", out=str(tmp_path))
    with pytest.raises(ValueError, match="--sigmas must be positive"):
        denoise.run_denoise(loaded, sigmas=(0.0,), split="train", out=str(tmp_path))
    with pytest.raises(ValueError, match="comma-separated numbers, got 'a,1'"):
        denoise.parse_sigmas("a,1")
    with pytest.raises(SystemExit, match="evaluate denoise: --sigmas must be comma-separated"):
        evaluate.main(["denoise", "--workdir", str(tmp_path), "--sigmas", "x"])
    np.testing.assert_array_equal(denoise.parse_sigmas("0.2,1,5"), (0.2, 1.0, 5.0))
