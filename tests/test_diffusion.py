"""EDM math: diffusers `EulerDiscreteScheduler` (SVD-xt config) as the sampling oracle, preconditioning identities,
training noise and loss, nested guidance, jit."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from actalker_jax import diffusion as edm

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers

CONFIG = edm.EDMConfig()
SHAPE = (2, 3, 4, 5, 4)  # (B, F, h, w, c)


def svd_scheduler(num_steps: int = 25) -> EulerDiscreteScheduler:
    """SVD-xt's scheduler_config.json, after set_timesteps(num_steps)."""
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002,
        sigma_max=700.0, steps_offset=1, timestep_spacing="leading", timestep_type="continuous")
    scheduler.set_timesteps(num_steps)
    return scheduler


def fake_model(x_in, t, pattern, xp):
    """A fixed fake v-prediction network F(c_in·x, c_noise): depends on both inputs, same in numpy/torch and jax."""
    return 0.5 * xp.tanh(x_in) + 0.1 * t + 0.2 * pattern


def test_config_defaults():
    assert (CONFIG.p_mean, CONFIG.p_std, CONFIG.noise_offset, CONFIG.latent_scale) == (0.7, 1.6, 0.05, 0.18215)
    assert (CONFIG.sigma_min, CONFIG.sigma_max, CONFIG.rho, CONFIG.num_steps) == (0.002, 700.0, 7.0, 25)
    assert CONFIG.guidance_scales == (2.0, 7.5, 3.0)
    assert edm.EDMConfig.from_dict(CONFIG.to_dict()) == CONFIG
    hash(CONFIG)


@pytest.mark.parametrize("num_steps", [25, 7])
def test_karras_sigmas_and_timesteps_match_diffusers(num_steps):
    config = dataclasses.replace(CONFIG, num_steps=num_steps)
    scheduler = svd_scheduler(num_steps)
    sigmas = np.asarray(edm.karras_sigmas(config))
    assert sigmas.shape == (num_steps + 1,) and sigmas.dtype == np.float32
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    assert sigmas[-1] == 0.0 and sigmas[0] == np.float32(700.0)
    np.testing.assert_allclose(sigmas[-2], 0.002, rtol=1e-6)
    assert np.all(np.diff(sigmas) < 0)
    np.testing.assert_allclose(np.asarray(edm.preconditioning(sigmas[:-1]).c_noise), scheduler.timesteps.numpy(),
                               rtol=1e-6, atol=1e-6)


def test_euler_trajectory_matches_diffusers():
    """25 steps of scale_model_input + step (v_prediction, s_churn 0) with a fixed fake model, step by step."""
    rng = np.random.default_rng(0)
    pattern = rng.standard_normal(SHAPE).astype(np.float32)
    ref_scaled = 0.3 * rng.standard_normal((SHAPE[0], 1) + SHAPE[2:]).astype(np.float32)
    key = jax.random.key(1)

    scheduler = svd_scheduler()
    noise = torch.from_numpy(np.array(jax.random.normal(key, SHAPE, jnp.float32)))
    x = scheduler.add_noise(torch.from_numpy(np.broadcast_to(ref_scaled, SHAPE).copy()), noise,
                            scheduler.timesteps[:1])
    expected = [x.numpy()]
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = fake_model(x_in, t, torch.from_numpy(pattern), torch)
        x = scheduler.step(out, t, x).prev_sample
        expected.append(x.numpy())

    @functools.partial(jax.jit, static_argnums=0)
    def sample(config, key, ref_scaled, ref_latent):
        sigmas = edm.karras_sigmas(config)
        x = edm.init_latents(key, ref_scaled, SHAPE, config)

        def body(x, sigma_pair):
            sigma, sigma_next = sigma_pair
            model_in, t = edm.model_inputs(x, ref_latent, sigma)
            out = fake_model(model_in[..., :SHAPE[-1]], t[:, None, None, None, None], pattern, jnp)
            x = edm.euler_step(x, edm.denoised(out, x, sigma), sigma, sigma_next)
            return x, x

        _, xs = jax.lax.scan(body, x, (sigmas[:-1], sigmas[1:]))
        return jnp.concatenate([x[None], xs])

    ref_latent = jnp.asarray(ref_scaled[:, 0] / CONFIG.latent_scale)
    got = np.asarray(sample(CONFIG, key, jnp.asarray(ref_scaled), ref_latent))
    assert got.shape == (26,) + SHAPE
    for step, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * np.abs(e).max(), err_msg=f"step {step}")
    assert np.abs(got[-1]).max() < 10.0


def test_preconditioning_matches_svd_formulas():
    sigma = np.array([0.002, 0.1, 1.0, 7.3, 700.0], np.float32)
    c = edm.preconditioning(sigma)
    s = sigma.astype(np.float64)
    np.testing.assert_allclose(c.c_in, 1 / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c.c_skip, 1 / (s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c.c_out, -s / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c.c_noise, 0.25 * np.log(s), rtol=1e-6)
    np.testing.assert_allclose(edm.loss_weight(sigma), (s**2 + 1) / s**2, rtol=1e-6)


def test_v_target_is_exact_and_loss_is_v_mse():
    keys = jax.random.split(jax.random.key(0), 4)
    x0 = jax.random.normal(keys[0], SHAPE)
    sigma = jnp.array([0.05, 30.0])
    x_noisy, noise = edm.add_noise(keys[1], x0, sigma, CONFIG)
    target = edm.v_target(x0, noise, sigma)
    np.testing.assert_allclose(edm.denoised(target, x_noisy, sigma), x0, atol=2e-5)
    per_sample, mean = edm.denoising_loss(target, x_noisy, x0, sigma)
    assert per_sample.shape == (2,) and mean.shape == ()
    assert float(jnp.max(per_sample)) < 1e-7

    output = jax.random.normal(keys[2], SHAPE)
    per_sample, mean = edm.denoising_loss(output, x_noisy, x0, sigma)
    v_mse = jnp.mean((output - target) ** 2, axis=(1, 2, 3, 4))
    np.testing.assert_allclose(per_sample, v_mse, rtol=1e-4)
    np.testing.assert_allclose(mean, jnp.mean(v_mse), rtol=1e-4)
    x_hat = edm.denoised(output, x_noisy, sigma)
    weighted = edm.loss_weight(sigma) * jnp.mean((x_hat - x0) ** 2, axis=(1, 2, 3, 4))
    np.testing.assert_allclose(per_sample, weighted, rtol=1e-6)


def test_sample_sigmas_statistics():
    log_sigma = np.log(np.asarray(edm.sample_sigmas(jax.random.key(3), 1_000_000, CONFIG), np.float64))
    assert abs(log_sigma.mean() - CONFIG.p_mean) < 0.01 * CONFIG.p_mean
    assert abs(log_sigma.std() - CONFIG.p_std) < 0.01 * CONFIG.p_std
    assert edm.sample_sigmas(jax.random.key(0), 7, CONFIG).shape == (7,)


@pytest.mark.parametrize("per_channel", [False, True])
def test_offset_noise_shape_and_broadcast(per_channel):
    shape = (2, 3, 16, 16, 4)
    config = dataclasses.replace(CONFIG, noise_offset=50.0, offset_per_channel=per_channel)
    noise = np.asarray(edm.offset_noise(jax.random.key(5), shape, config))
    assert noise.shape == shape
    pooled = (2, 3) if per_channel else (2, 3, 4)
    means = noise.mean(axis=pooled, keepdims=True)
    assert means.shape == ((2, 3, 1, 1, 4) if per_channel else (2, 3, 1, 1, 1))
    assert means.std() > 10.0
    residual = noise - means
    assert 0.9 < residual.std() < 1.1
    if not per_channel:
        channel_means = noise.mean(axis=(2, 3))
        assert np.abs(channel_means - channel_means.mean(-1, keepdims=True)).max() < 0.5

    plain = np.asarray(edm.offset_noise(jax.random.key(5), shape, dataclasses.replace(CONFIG, noise_offset=0.0)))
    np.testing.assert_array_equal(plain, np.asarray(jax.random.normal(jax.random.split(jax.random.key(5))[0], shape)))

    x0 = jnp.ones(shape)
    sigma = jnp.array([0.5, 3.0])
    x_noisy, eps = edm.add_noise(jax.random.key(5), x0, sigma, config)
    np.testing.assert_array_equal(eps, noise)
    np.testing.assert_allclose(x_noisy, 1.0 + sigma[:, None, None, None, None] * noise, rtol=1e-6)


def test_model_inputs():
    keys = jax.random.split(jax.random.key(2), 2)
    x = jax.random.normal(keys[0], SHAPE) * 10.0
    ref = jax.random.normal(keys[1], (SHAPE[0],) + SHAPE[2:])
    sigma = jnp.array([0.5, 80.0])
    sample, t = edm.model_inputs(x, ref, sigma)
    assert sample.shape == SHAPE[:-1] + (2 * SHAPE[-1],) and t.shape == (2,)
    c = edm.preconditioning(sigma)
    np.testing.assert_allclose(sample[..., :4], x * c.c_in[:, None, None, None, None], rtol=1e-6)
    np.testing.assert_array_equal(sample[..., 4:], jnp.broadcast_to(ref[:, None], SHAPE))
    np.testing.assert_allclose(t, 0.25 * jnp.log(sigma), rtol=1e-6)
    sample_scalar, t_scalar = edm.model_inputs(x, jnp.broadcast_to(ref[:, None], SHAPE), jnp.float32(80.0))
    np.testing.assert_allclose(sample_scalar[1], sample[1], rtol=1e-6)
    np.testing.assert_allclose(t_scalar, [t[1], t[1]], rtol=1e-6)
    assert edm.model_inputs(x.astype(jnp.bfloat16), ref, sigma)[0].dtype == jnp.bfloat16


def test_latent_scale_and_init():
    z = jnp.arange(6.0).reshape(1, 1, 1, 2, 3)
    np.testing.assert_allclose(edm.unscale_latents(edm.scale_latents(z, CONFIG), CONFIG), z, rtol=1e-6)
    np.testing.assert_allclose(edm.scale_latents(z, CONFIG), 0.18215 * z, rtol=1e-7)
    key = jax.random.key(9)
    shape = (1, 4, 1, 2, 3)
    x = edm.init_latents(key, edm.scale_latents(z, CONFIG), shape, CONFIG)
    np.testing.assert_allclose(x - 0.18215 * z, 700.0 * jax.random.normal(key, shape), rtol=1e-5, atol=1e-4)


def test_guidance_combination():
    keys = jax.random.split(jax.random.key(4), 4)
    branches = jnp.stack([jax.random.normal(k, SHAPE) for k in keys])
    np.testing.assert_allclose(edm.guided_denoised(branches, (1.0, 1.0, 1.0)), branches[3], atol=1e-5)
    s1, s2, s3 = CONFIG.guidance_scales
    e0, e1, e2, e3 = branches
    expected = e0 + s1 * (e1 - e0) + s2 * (e2 - e1) + s3 * (e3 - e2)
    np.testing.assert_allclose(edm.guided_denoised(branches, CONFIG.guidance_scales), expected, rtol=1e-6)

    closed_audio = branches.at[2].set(branches[1])
    no_audio_term = branches[0] + s1 * (branches[1] - branches[0]) + s3 * (branches[3] - branches[1])
    for audio_scale in (0.0, 7.5, 100.0):
        np.testing.assert_allclose(edm.guided_denoised(closed_audio, (s1, audio_scale, s3)), no_audio_term,
                                   rtol=1e-5, atol=1e-5)

    x = jax.random.normal(jax.random.key(8), SHAPE) * 5.0
    sigma = jnp.array([0.3, 12.0])
    combine_f = edm.denoised(edm.guided_denoised(branches, CONFIG.guidance_scales), x, sigma)
    combine_x0 = edm.guided_denoised(jnp.stack([edm.denoised(b, x, sigma) for b in branches]), CONFIG.guidance_scales)
    np.testing.assert_allclose(combine_f, combine_x0, rtol=1e-4, atol=1e-4)


def test_region_guidance():
    """mouth 1: the audio term at s2 and no motion term; mouth 0: the motion term at s3 and no audio term; a cell
    half in the mouth: both at half their scale. None: the whole-frame guidance."""
    branches = jax.random.normal(jax.random.key(3), (4, 2, 3, 4, 4, 2))
    s1, s2, s3 = CONFIG.guidance_scales
    mouth = jnp.zeros((2, 1, 4, 4, 1)).at[:, :, 2:, 1:3].set(1.0).at[:, :, 1, 1].set(0.5)
    got = edm.guided_denoised(branches, CONFIG.guidance_scales, mouth)
    np.testing.assert_array_equal(edm.guided_denoised(branches, CONFIG.guidance_scales, None),
                                  edm.guided_denoised(branches, CONFIG.guidance_scales))
    for scales, where in [((s1, s2, 0.0), mouth == 1.0), ((s1, 0.0, s3), mouth == 0.0),
                          ((s1, s2 / 2, s3 / 2), mouth == 0.5)]:
        expected = edm.guided_denoised(branches, scales)
        where = np.broadcast_to(where, got.shape)
        assert where.any()
        np.testing.assert_allclose(np.asarray(got)[where], np.asarray(expected)[where], rtol=1e-6, atol=1e-6)


def test_guidance_region():
    mask = np.zeros((1, 8, 12), np.float32)
    mask[0, 4:8, 3:9] = 1.0
    cells = np.asarray(edm.guidance_region(mask, (4, 6)))
    expected = np.zeros((4, 6))
    expected[2:, 2:4], expected[2:, 1], expected[2:, 4] = 1.0, 0.5, 0.5
    assert cells.shape == (1, 1, 4, 6, 1)
    np.testing.assert_array_equal(cells[0, 0, :, :, 0], expected)
    with pytest.raises(ValueError, match="latent grid 3x6 does not divide the mask's 8x12"):
        edm.guidance_region(mask, (3, 6))


def test_guidance_batch_layout():
    drops = edm.guidance_batch(2)
    assert sorted(drops) == ["drop_appearance", "drop_audio", "drop_motion"]
    assert all(v.dtype == jnp.bool_ and v.shape == (8,) for v in drops.values())
    np.testing.assert_array_equal(drops["drop_appearance"], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(drops["drop_audio"], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(drops["drop_motion"], [1, 1, 1, 1, 1, 1, 0, 0])
    tree = dict(x=jnp.arange(2 * 3).reshape(2, 3), t=jnp.array([0.1, 0.2]))
    stacked = edm.repeat_branches(tree)
    assert stacked["x"].shape == (8, 3) and stacked["t"].shape == (8,)
    split = edm.split_branches(stacked["x"])
    assert split.shape == (4, 2, 3)
    for k in range(4):
        np.testing.assert_array_equal(split[k], tree["x"])


def test_everything_jits():
    key = jax.random.key(0)
    x0 = jnp.ones(SHAPE)
    sigma = jnp.array([0.5, 2.0])
    jit_cfg = functools.partial(jax.jit, static_argnums=(-1,))
    assert jit_cfg(lambda k, c: edm.sample_sigmas(k, 2, c))(key, CONFIG).shape == (2,)
    x_noisy, noise = jit_cfg(edm.add_noise)(key, x0, sigma, CONFIG)
    assert jax.jit(edm.denoising_loss)(noise, x_noisy, x0, sigma)[0].shape == (2,)
    assert jax.jit(edm.model_inputs)(x_noisy, x0[:, 0], sigma)[0].shape == SHAPE[:-1] + (8,)
    assert jax.jit(edm.karras_sigmas, static_argnums=0)(CONFIG).shape == (26,)
    assert jax.jit(edm.euler_step)(x_noisy, x0, 2.0, 1.0).shape == SHAPE
    assert jax.jit(edm.init_latents, static_argnums=(2, 3))(key, x0, SHAPE, CONFIG).shape == SHAPE
    assert jax.jit(edm.guided_denoised, static_argnums=1)(jnp.stack([x0] * 4), (2.0, 7.5, 3.0)).shape == SHAPE
    assert jax.jit(edm.guidance_batch, static_argnums=0)(3)["drop_motion"].shape == (12,)
    assert jax.jit(lambda a: edm.split_branches(edm.repeat_branches(a)))(x0).shape == (4,) + SHAPE
    grad = jax.grad(lambda f: edm.denoising_loss(f, x_noisy, x0, sigma)[1])(noise)
    assert grad.shape == SHAPE and bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("sigma_data", [1.0, 0.15])
def test_reference_prior_is_edm_around_the_reference(sigma_data):
    """center "reference", σ_data: x̂0 = μ + c_skip·(x − μ) + c_out·F with μ = latent_scale·z_ref and EDM's
    σ_data coefficients; v_target stays exact, the weighted loss stays the v-space MSE, the network sees
    c_in·(x − μ), and an all-zero network predicts μ at high σ."""
    config = dataclasses.replace(CONFIG, center="reference", sigma_data=sigma_data)
    keys = jax.random.split(jax.random.key(3), 4)
    x0 = jax.random.normal(keys[0], SHAPE)
    ref_latent = jax.random.normal(keys[1], (SHAPE[0],) + SHAPE[2:])
    prior = edm.data_prior(ref_latent, config)
    assert prior.mean.shape == (SHAPE[0], 1) + SHAPE[2:] and float(prior.std) == np.float32(sigma_data)
    np.testing.assert_allclose(prior.mean[:, 0], ref_latent * CONFIG.latent_scale, rtol=1e-6)
    np.testing.assert_array_equal(edm.data_prior(jnp.broadcast_to(ref_latent[:, None], SHAPE), config).mean,
                                  jnp.broadcast_to(prior.mean, SHAPE))
    spec = edm.data_prior(ref_latent, CONFIG)
    assert float(spec.mean) == 0.0 and float(spec.std) == 1.0

    sigma = jnp.array([0.05, 30.0])
    c = edm.preconditioning(sigma, sigma_data)
    s, d = np.array([0.05, 30.0]), sigma_data  # Karras et al. 2022, Table 1 (v-prediction sign, as SVD)
    np.testing.assert_allclose(c.c_skip, d**2 / (s**2 + d**2), rtol=1e-5)
    np.testing.assert_allclose(c.c_out, -s * d / np.sqrt(s**2 + d**2), rtol=1e-5)
    np.testing.assert_allclose(c.c_in, 1 / np.sqrt(s**2 + d**2), rtol=1e-5)
    np.testing.assert_allclose(edm.loss_weight(sigma, sigma_data), (s**2 + d**2) / (s * d) ** 2, rtol=1e-5)

    x_noisy, noise = edm.add_noise(keys[2], x0, sigma, config)
    target = edm.v_target(x0, noise, sigma, prior)
    np.testing.assert_allclose(edm.denoised(target, x_noisy, sigma, prior), x0, atol=5e-5)
    assert float(jnp.max(edm.denoising_loss(target, x_noisy, x0, sigma, prior)[0])) < 1e-6
    output = jax.random.normal(keys[3], SHAPE)
    np.testing.assert_allclose(edm.denoising_loss(output, x_noisy, x0, sigma, prior)[0],
                               jnp.mean((output - target) ** 2, axis=(1, 2, 3, 4)), rtol=1e-4)
    # the formulas of σ_data on the translated problem x − μ
    np.testing.assert_allclose(edm.denoised(output, x_noisy, sigma, prior),
                               prior.mean + edm.denoised(output, x_noisy - prior.mean, sigma,
                                                         edm.DataPrior(0.0, sigma_data)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(edm.denoised(output, x_noisy, sigma, prior), edm.denoised(output, x_noisy, sigma))

    sample, _ = edm.model_inputs(x_noisy, ref_latent, sigma, prior)
    np.testing.assert_allclose(sample[..., :SHAPE[-1]], (x_noisy - prior.mean) * c.c_in[:, None, None, None, None],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sample[..., SHAPE[-1]:], jnp.broadcast_to(ref_latent[:, None], SHAPE))

    far = jnp.full((SHAPE[0],), 700.0)
    start = edm.init_latents(keys[2], prior.mean, SHAPE, config)
    np.testing.assert_allclose(edm.denoised(jnp.zeros(SHAPE), start, far, prior),
                               jnp.broadcast_to(prior.mean, SHAPE), atol=1e-2)  # c_skip·σ·ε <= ε/700


@pytest.mark.parametrize("field,value", [("center", "middle"), ("sigma_data", 0.0), ("window_stride", 0),
                                         ("window_stride", 2.0), ("window_stride", True),
                                         ("guidance_regions", "yes")])
def test_bad_config_value_is_named(field, value):
    with pytest.raises(ValueError, match=f"{field} must be .*got {value!r}"):
        edm.EDMConfig(**{field: value})

