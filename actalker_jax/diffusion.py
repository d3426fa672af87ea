"""EDM math shared by training and sampling (spec §5, §6): SVD's v-prediction preconditioning, the training
noise and loss, the Karras/Euler sampler of diffusers' `EulerDiscreteScheduler` (SVD-xt config) and the
nested 4-branch guidance. Pure jax.numpy, jit-friendly; no model code.

Latent scale. Records hold *unscaled* VAE means z. The diffusion runs on x = latent_scale·z:
    training: x0 = scale_latents(z); x_noisy = x0 + σ·ε (`add_noise`);
    model:    sample = [x_noisy·c_in ; z_ref] (`model_inputs`), the reference latent z_ref stays UNscaled (spec §4);
    sampling: x_T = latent_scale·z_ref + σ_max·ε (`init_latents`), Euler steps on x, decode unscale_latents(x_0).

Preconditioning (σ broadcasts over the non-batch axes of x):
    c_in = 1/√(σ²+1), c_noise = ¼·ln σ, c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1), x̂0 = c_skip·x + c_out·F.
With x = x0 + σ·ε the exact network target is F* = (ε − σ·x0)/√(σ²+1) (`v_target`), and the EDM-weighted
x̂0 loss (σ²+1)/σ²·(x̂0 − x0)² equals the plain v-space loss (F − F*)².

Data prior (`DataPrior`, from `EDMConfig.center` and `EDMConfig.sigma_data`). SVD's preconditioning is EDM's (Karras
et al. 2022, Table 1) for data of mean 0 and standard deviation σ_data = 1 (`SPEC_PRIOR`, the default). In general,
for data of mean μ and standard deviation σ_d, with x = x0 + σ·ε:
    c_in = 1/√(σ²+σ_d²), c_skip = σ_d²/(σ²+σ_d²), c_out = −σ·σ_d/√(σ²+σ_d²),
    network input c_in·(x − μ), x̂0 = μ + c_skip·(x − μ) + c_out·F, loss weight (σ²+σ_d²)/(σ·σ_d)²,
and the weighted x̂0 loss is still the plain v-space loss (F − F*)². center "reference" (ours, for models trained
from scratch) takes μ = latent_scale·z_ref repeated over frames and σ_d = the standard deviation of the frames around
it: an untrained network (F ≈ 0) then predicts the reference at every σ >> σ_d, and training spends its steps on how
the frames differ from the reference (mouth, eyes, pose) instead of on passing the noise through. The noise, the
sampler's start (latent_scale·z_ref + σ_max·ε, as in the spec) and the Euler steps are the same for every prior.

Sampling loop (one window; `model` is the ACTalker model, guidance over 4 stacked branches):
    sigmas = karras_sigmas(config)                                    # (26,) 700 ... 0.002, 0
    x = init_latents(key, latent_scale·z_ref repeated over F, shape, config)
    prior = data_prior(z_ref, config)
    for i in range(config.num_steps):
        sample, t = model_inputs(x, z_ref, sigmas[i], prior)
        out = model(repeat_branches(sample), repeat_branches(t), ..., **guidance_batch(B))   # (4B,F,h,w,c)
        F = guided_denoised(split_branches(out), config.guidance_scales)   # + mouth: region guidance
        x = euler_step(x, denoised(F, x, sigmas[i], prior), sigmas[i], sigmas[i + 1])
Long videos (`actalker_jax.sample`): the buffer of N = `sampling_buffer_length(T, F, s)` frames is covered at step
i by `circular_windows(N, F, window_shift(i, F), s)` (s = `EDMConfig.window_stride`: a window's frames are s apart);
every window steps from the same pre-step buffer, and frames covered twice are averaged.
"""

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_BRANCHES = 4
CENTERS = ("zero", "reference")


@dataclasses.dataclass(frozen=True)
class EDMConfig:
    """Training noise (spec §5), sampler (spec §6) and guidance scales (appearance, audio, motion).

    offset_per_channel: False (default, the official `noise_util.random_noise` on (B,F,C,H,W) latents) draws one
    offset per (sample, frame), shape (B,F,1,1,1), shared by h, w and the channels; True draws (B,F,1,1,c).
    center, sigma_data: the data mean ("zero": SVD, or "reference") and standard deviation the preconditioning
    assumes (module doc, `data_prior`).
    window_stride: output frames between consecutive frames of a sampling window (`circular_windows`); the fps id
    is then fps / window_stride. 1 (the released sampler) matches a model trained on clips at twice the output fps
    at stride 2 (spec §5); a model trained on clips at the output fps at stride s samples with s (the demo: 3).
    guidance_regions: False (the released sampler) applies every guidance term to the whole frame; True (ours)
    splits the frame by the mouth region: the audio term acts inside it and the motion term outside it
    (`guided_denoised`'s `mouth`).
    """

    p_mean: float = 0.7
    p_std: float = 1.6
    noise_offset: float = 0.05
    offset_per_channel: bool = False
    latent_scale: float = 0.18215
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    rho: float = 7.0
    num_steps: int = 25
    guidance_appearance: float = 2.0
    guidance_audio: float = 7.5
    guidance_motion: float = 3.0
    center: str = "zero"
    sigma_data: float = 1.0
    window_stride: int = 1
    guidance_regions: bool = False

    def __post_init__(self):
        if self.center not in CENTERS:
            raise ValueError(f"center must be one of {CENTERS}, got {self.center!r}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data!r}")
        stride = self.window_stride
        if isinstance(stride, bool) or not isinstance(stride, numbers.Integral) or stride < 1:
            raise ValueError(f"window_stride must be an integer >= 1, got {stride!r}")
        if not isinstance(self.guidance_regions, (bool, np.bool_)):
            raise ValueError(f"guidance_regions must be True or False, got {self.guidance_regions!r}")

    @property
    def guidance_scales(self) -> tuple[float, float, float]:
        """(s1, s2, s3) = (appearance, audio, motion) for `guided_denoised`."""
        return (self.guidance_appearance, self.guidance_audio, self.guidance_motion)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EDMConfig":
        return cls(**values)


class DataPrior(NamedTuple):
    """The data distribution the preconditioning assumes (module doc): mean μ, () or broadcastable to the
    (B,F,h,w,c) latents, and standard deviation σ_data. A pytree: pass it through jit like an array."""

    mean: Any = 0.0
    std: Any = 1.0


SPEC_PRIOR = DataPrior()  # SVD: mean 0, σ_data 1


class Preconditioning(NamedTuple):
    """SVD v-prediction coefficients, each shaped like the σ they were computed from."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def scale_latents(latents: jax.Array, config: EDMConfig) -> jax.Array:
    """Unscaled VAE latents (records, reference) -> diffusion space: latent_scale·z."""
    return latents * config.latent_scale


def unscale_latents(latents: jax.Array, config: EDMConfig) -> jax.Array:
    """Diffusion-space latents -> VAE decoder input: x / latent_scale."""
    return latents / config.latent_scale


def data_prior(ref_latent: jax.Array, config: EDMConfig) -> DataPrior:
    """The preconditioning's prior of `config`: mean () zero, or latent_scale·z_ref for center "reference";
    std config.sigma_data.

    ref_latent: the UNscaled reference latent (B,h,w,c) -> mean (B,1,h,w,c), or already repeated (B,F,h,w,c) ->
    mean (B,F,h,w,c); the mean broadcasts against (B,F,h,w,c) diffusion-space latents.
    """
    std = jnp.float32(config.sigma_data)
    if config.center == "zero":
        return DataPrior(jnp.zeros((), jnp.float32), std)
    mean = scale_latents(jnp.asarray(ref_latent, jnp.float32), config)
    return DataPrior(mean[:, None] if mean.ndim == 4 else mean, std)


def expand_sigma(sigma: jax.Array, ndim: int) -> jax.Array:
    """σ () or (B,) -> () or (B, 1, ..., 1) with `ndim` axes, to broadcast against a (B, ...) array."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma if sigma.ndim == 0 else sigma.reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


def preconditioning(sigma: jax.Array, sigma_data: jax.Array = 1.0) -> Preconditioning:
    """σ (any shape), σ_data (scalar; 1 = SVD) -> (c_skip, c_out, c_in, c_noise), float32, shaped like σ."""
    sigma = jnp.asarray(sigma, jnp.float32)
    std = jnp.asarray(sigma_data, jnp.float32)
    norm = jnp.sqrt(sigma**2 + std**2)
    return Preconditioning(c_skip=std**2 / norm**2, c_out=-sigma * std / norm, c_in=1.0 / norm,
                           c_noise=0.25 * jnp.log(sigma))


def denoised(model_output: jax.Array, x: jax.Array, sigma: jax.Array, prior: DataPrior = SPEC_PRIOR) -> jax.Array:
    """x̂0 = μ + c_skip·(x − μ) + c_out·F. model_output F, x (B, ...); σ () or (B,); prior (μ, σ_data).
    Returns float32 (B, ...)."""
    c = preconditioning(expand_sigma(sigma, x.ndim), prior.std)
    return prior.mean + c.c_skip * (x.astype(jnp.float32) - prior.mean) + c.c_out * model_output.astype(jnp.float32)


def v_target(x0: jax.Array, noise: jax.Array, sigma: jax.Array, prior: DataPrior = SPEC_PRIOR) -> jax.Array:
    """The network output F* with denoised(F*, x0 + σ·noise, σ, prior) = x0:
    (σ_d·noise − σ·(x0 − μ)/σ_d)/√(σ²+σ_d²) ((noise − σ·x0)/√(σ²+1) for the spec). Shapes (B, ...)."""
    sigma = expand_sigma(sigma, x0.ndim)
    std = jnp.asarray(prior.std, jnp.float32)
    residual = x0.astype(jnp.float32) - prior.mean
    return (std * noise.astype(jnp.float32) - sigma * residual / std) / jnp.sqrt(sigma**2 + std**2)


def sample_sigmas(key: jax.Array, batch: int, config: EDMConfig) -> jax.Array:
    """Training noise levels (B,) float32: ln σ ~ N(p_mean, p_std²)."""
    return jnp.exp(config.p_mean + config.p_std * jax.random.normal(key, (batch,), jnp.float32))


def offset_noise(key: jax.Array, shape: tuple[int, ...], config: EDMConfig) -> jax.Array:
    """Training noise (B,F,h,w,c) float32: ε + noise_offset·ε_offset.

    ε ~ N(0, I) of `shape`; ε_offset ~ N(0, I) of shape (B,F,1,1,1) (or (B,F,1,1,c) with offset_per_channel),
    broadcast over h, w (and c). key is split into (ε key, ε_offset key) in that order.
    """
    key_noise, key_offset = jax.random.split(key)
    noise = jax.random.normal(key_noise, shape, jnp.float32)
    if config.noise_offset == 0.0:
        return noise
    offset_shape = tuple(shape[:2]) + (1,) * (len(shape) - 3) + ((shape[-1],) if config.offset_per_channel else (1,))
    return noise + config.noise_offset * jax.random.normal(key_offset, offset_shape, jnp.float32)


def add_noise(key: jax.Array, x0: jax.Array, sigma: jax.Array, config: EDMConfig) -> tuple[jax.Array, jax.Array]:
    """x0 (B,F,h,w,c) scaled latents, σ (B,) -> (x_noisy = x0 + σ·ε, ε), both float32 (B,F,h,w,c).

    ε is `offset_noise(key, x0.shape, config)`; the returned ε is what `v_target` needs.
    """
    noise = offset_noise(key, x0.shape, config)
    return x0.astype(jnp.float32) + expand_sigma(sigma, x0.ndim) * noise, noise


def loss_weight(sigma: jax.Array, sigma_data: jax.Array = 1.0) -> jax.Array:
    """EDM x̂0-loss weight (σ²+σ_d²)/(σ·σ_d)² ((σ²+1)/σ² for SVD), shaped like σ."""
    sigma = jnp.asarray(sigma, jnp.float32)
    std = jnp.asarray(sigma_data, jnp.float32)
    return (sigma**2 + std**2) / (sigma * std) ** 2


def denoising_loss(model_output: jax.Array, x_noisy: jax.Array, x0: jax.Array, sigma: jax.Array,
                   prior: DataPrior = SPEC_PRIOR) -> tuple[jax.Array, jax.Array]:
    """Weighted x̂0 MSE. model_output F, x_noisy, x0 (B, ...); σ (B,); prior (μ, σ_data) ->
    (per-sample loss (B,), batch mean ())."""
    error = (denoised(model_output, x_noisy, sigma, prior) - x0.astype(jnp.float32)) ** 2
    per_sample = loss_weight(sigma, prior.std) * jnp.mean(error, axis=tuple(range(1, error.ndim)))
    return per_sample, jnp.mean(per_sample)


def model_inputs(x_noisy: jax.Array, ref_latent: jax.Array, sigma: jax.Array,
                 prior: DataPrior = SPEC_PRIOR) -> tuple[jax.Array, jax.Array]:
    """Model `sample` and `timestep`: ([(x_noisy − μ)·c_in ; ref] (B,F,h,w,2c), c_noise (B,)).

    x_noisy (B,F,h,w,c) in diffusion space; ref_latent the UNscaled reference latent, (B,h,w,c) (repeated over F
    here) or already (B,F,h,w,c); σ () or (B,); prior (μ, σ_data). The sample has x_noisy's dtype.
    """
    batch, frames = x_noisy.shape[:2]
    c = preconditioning(expand_sigma(sigma, x_noisy.ndim), prior.std)
    if ref_latent.ndim == x_noisy.ndim - 1:
        ref_latent = jnp.broadcast_to(ref_latent[:, None], (batch, frames) + ref_latent.shape[1:])
    scaled = ((x_noisy.astype(jnp.float32) - prior.mean) * c.c_in).astype(x_noisy.dtype)
    sample = jnp.concatenate([scaled, ref_latent.astype(x_noisy.dtype)], axis=-1)
    timestep = jnp.broadcast_to(preconditioning(sigma).c_noise, (batch,))
    return sample, timestep


def karras_sigmas(config: EDMConfig) -> jax.Array:
    """(num_steps + 1,) float32: Karras ρ-schedule from σ_max down to σ_min, then 0.

    Computed in float64 numpy from the static config and cast to float32, as diffusers'
    `EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min, sigma_max)` does after `set_timesteps(num_steps)`.
    """
    ramp = np.linspace(0.0, 1.0, config.num_steps)
    max_inv_rho = config.sigma_max ** (1.0 / config.rho)
    min_inv_rho = config.sigma_min ** (1.0 / config.rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** config.rho
    return jnp.asarray(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def euler_step(x: jax.Array, x0_pred: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """Deterministic Euler (s_churn = 0): x + (x − x̂0)/σ·(σ_next − σ). x, x̂0 (B, ...); σ () or (B,). float32."""
    sigma = expand_sigma(sigma, x.ndim)
    sigma_next = expand_sigma(sigma_next, x.ndim)
    x = x.astype(jnp.float32)
    return x + (x - x0_pred.astype(jnp.float32)) / sigma * (sigma_next - sigma)


def init_latents(key: jax.Array, ref_latent_scaled: jax.Array, shape: tuple[int, ...],
                 config: EDMConfig) -> jax.Array:
    """Sampling start (spec §6): latent_scale·E(ref) + σ_0·ε, float32 `shape` (B,F,h,w,c).

    ref_latent_scaled: the scaled reference latent, broadcastable to `shape` (repeated over frames by the caller).
    σ_0 = karras_sigmas(config)[0] (= σ_max in float32), as diffusers' `add_noise` at timesteps[0].
    """
    sigma_0 = karras_sigmas(config)[0]
    noise = jax.random.normal(key, shape, jnp.float32)
    return jnp.broadcast_to(ref_latent_scaled.astype(jnp.float32), shape) + sigma_0 * noise


def guided_denoised(branches: jax.Array, scales: tuple[float, float, float], mouth: jax.Array | None = None
                    ) -> jax.Array:
    """Nested guidance ε0 + s1(ε1−ε0) + s2(ε2−ε1) + s3(ε3−ε2). branches (4, B, ...) -> (B, ...).

    The sampler combines the network outputs F of the 4 branches (as the official pipeline combines its
    `noise_pred`) and then computes x̂0 once. The weights sum to 1 and x̂0 = c_skip·x + c_out·F is affine in F
    with branch-independent c_skip·x, so combining the 4 x̂0 instead gives the same result.

    mouth: the mouth region's share of each latent cell in [0, 1], broadcastable to (B, ...) (`guidance_region`),
    for region guidance (`EDMConfig.guidance_regions`): the audio term weighs s2·mouth and the motion term
    s3·(1 − mouth), so in the mouth region the prediction is the one without the motion condition and elsewhere
    the one without the audio condition, each guided at its scale. Guidance amplifies whatever a condition changes
    anywhere in the frame; the PCM masks keep each condition to its region inside the network, and this keeps the
    sampler to the same split (without it the demo's motion guidance opens the mouth as the head turns,
    docs/benchmarks.md "Region guidance").
    """
    s1, s2, s3 = scales
    if mouth is not None:
        s2, s3 = s2 * mouth, s3 * (1.0 - mouth)
    e0, e1, e2, e3 = branches[0], branches[1], branches[2], branches[3]
    return e0 + s1 * (e1 - e0) + s2 * (e2 - e1) + s3 * (e3 - e2)


def guidance_region(mouth_mask: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Mouth mask (B, H, W) in {0, 1} -> its share of each latent cell (B, 1, h, w, 1) float32 (area average).

    grid (h, w) must divide (H, W): the latent factor of the autoencoder.
    """
    mouth_mask = jnp.asarray(mouth_mask, jnp.float32)
    b, height, width = mouth_mask.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"guidance_region: latent grid {h}x{w} does not divide the mask's {height}x{width}")
    cells = mouth_mask.reshape(b, h, height // h, w, width // w).mean(axis=(2, 4))
    return cells[:, None, :, :, None]


def guidance_batch(batch: int) -> dict[str, jax.Array]:
    """The model's drop flags for the 4 branches stacked branch-major: each (4B,) bool.

    ε0: drop appearance, audio and motion; ε1: real appearance, uncond audio and motion; ε2: + cond audio;
    ε3: + cond motion. Pair with `repeat_branches` on the inputs and `split_branches` on the output.
    """
    def flags(per_branch):
        return jnp.repeat(jnp.asarray(per_branch, jnp.bool_), batch)

    return dict(drop_appearance=flags([True, False, False, False]),
                drop_audio=flags([True, True, False, False]),
                drop_motion=flags([True, True, True, False]))


def repeat_branches(tree: Any) -> Any:
    """Every (B, ...) array of a pytree -> (4B, ...), branch-major (the 4 copies of the batch in a row)."""
    return jax.tree.map(lambda a: jnp.concatenate([jnp.asarray(a)] * NUM_BRANCHES, axis=0), tree)


def split_branches(output: jax.Array) -> jax.Array:
    """Model output (4B, ...) -> (4, B, ...) for `guided_denoised`."""
    return output.reshape((NUM_BRANCHES, output.shape[0] // NUM_BRANCHES) + output.shape[1:])


WINDOW_SHIFT = 7


def circular_windows(num_latents: int, window: int, shift: int, stride: int = 1) -> np.ndarray:
    """Frame indices (num_windows, window) int64 of one sampling step's circular windows (spec §6).

    stride 1 (the spec): window j covers frames (j·window − shift + k) mod num_latents, k < window,
    j < ceil(num_latents / window): every frame at least once; when window does not divide num_latents the last
    window wraps around and its frames covered twice are averaged by the caller. Needs num_latents >= window.
    stride s > 1: the frames split into s interleaved sequences r, r + s, r + 2s, ... (r < s; num_latents a
    multiple of s), each covered as above, so a window's frames are s apart (window r·count + j of sequence r).
    """
    if stride < 1 or num_latents % stride:
        raise ValueError(f"circular windows need stride ({stride}) >= 1 dividing num_latents ({num_latents})")
    length = num_latents // stride
    if window < 1 or length < window:
        raise ValueError(f"circular windows need 1 <= window ({window}) <= num_latents / stride ({length})")
    count = -(-length // window)
    starts = np.arange(count) * window - shift
    local = (starts[:, None] + np.arange(window)[None, :]) % length
    return (local[None] * stride + np.arange(stride)[:, None, None]).reshape(stride * count, window)


def sampling_buffer_length(num_frames: int, window: int, stride: int = 1) -> int:
    """Latent frames of the sampler's buffer for `num_frames` output frames: at least num_frames + window (the
    padding frames get unconditional features), a multiple of `stride` with >= window frames per interleaved
    sequence (`circular_windows`). stride 1: num_frames + window."""
    return stride * max(window, -(-(num_frames + window) // stride))


def window_shift(step: int, window: int) -> int:
    """The circular windows' shift at sampler step `step`: shift_{i+1} = (shift_i + 7) mod window, shift_0 = 0."""
    return (step * WINDOW_SHIFT) % window
