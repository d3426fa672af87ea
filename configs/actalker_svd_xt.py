"""ACTalker at the paper's scale: SVD-xt UNet + PCM + IP-adapters, the released code's training recipe.

    python -m actalker_jax.convert svd --diffusers /path/to/stable-video-diffusion-img2vid-xt --out checkpoints/svd_xt
    python -m actalker_jax.train --config configs/actalker_svd_xt.py --workdir runs/actalker \\
        --config.data.records=/data/actalker/records --config.init.unet=checkpoints/svd_xt/unet

Recipe (ACTALKER_SPEC.md §5): 25-frame clips of stored SVD-VAE latents (records made by
`python -m actalker_jax.data.preprocess`), 512x512 crops, EDM v-prediction (ln sigma ~ N(0.7, 1.6^2),
offset noise 0.05, latent scale 0.18215), condition dropout 0.1, whole UNet + encoders trainable,
AdamW lr 1e-5 constant after 10 warm-up steps, clip 1.0, 1 clip per GPU with gradient accumulation 4,
bf16 compute with fp32 master weights (the official run is fp16 mixed), gradient checkpointing of every
UNet block, no EMA, 250k steps max (the released checkpoint is step 136,000).
Mesh: FSDP over every device (parameters, gradients and AdamW moments sharded), batch over (data, fsdp).
`data.batch_size` is per process: 8 = one host of 8 GPUs, 1 clip each.

What it reaches: the released model (official checkpoint step 136k) after ~136k steps on 7-8 GPUs; we
have not trained it (no cluster). Step time, MFU and memory on one GPU: not measured yet; the one attempt (H200,
2026-12-04) did not finish compiling the step in 6 minutes (docs/benchmarks.md, "Training step on one GPU"):
`python -m actalker_jax.bench.train --config configs/actalker_svd_xt.py --frames 14 --config.data.batch_size=1
--config.mesh.devices=1 --init host`.
"""

import ml_collections

from actalker_jax.data.pipeline import default_data_config
from actalker_jax.models.actalker import ACTalkerConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 250_000
    c.compute_dtype = "bfloat16"
    c.distributed = True  # jax.distributed.initialize() from SLURM / TPU / JAX_COORDINATOR_ADDRESS env
    c.synthetic_clips = 0
    c.remat = ml_collections.ConfigDict({"default": "full"})  # per block: models/remat.py

    c.init = ml_collections.ConfigDict(dict(
        unet="checkpoints/svd_xt/unet",  # converted SVD-xt UNet (python -m actalker_jax.convert svd)
        actalker="",                     # or a converted official ACTalker (python -m actalker_jax.convert actalker)
    ))

    c.media = ml_collections.ConfigDict(dict(
        autoencoder="vae", vae_path="checkpoints/svd_xt/vae", audio_features="whisper",
        whisper_path="checkpoints/whisper-tiny", face_finder="dlib", image_size=512, fps=12.5))

    c.data = default_data_config()
    c.data.n_frames = 25
    c.data.max_stride = 2
    c.data.buckets = ((512, 512),)
    c.data.batch_size = 8
    c.data.workers = 4

    c.model = ml_collections.ConfigDict(ACTalkerConfig.svd_xt().to_dict())
    c.model.unet.sample_size = 64  # informational (diffusers config key); the model takes any latent size

    # SVD's preconditioning (diffusion.py); sampling windows of consecutive 12.5-fps frames, the spacing of 25-fps
    # training clips at stride 2.
    c.diffusion = ml_collections.ConfigDict(dict(latent_scale=0.18215, noise_offset=0.05, p_mean=0.7, p_std=1.6,
                                                 center="zero", sigma_data=1.0, window_stride=1))

    c.train = ml_collections.ConfigDict(dict(
        gate_probs=(0.5, 0.25, 0.25),   # both / audio only / motion only (unpublished officially: ours)
        cond_dropout=0.1,
        mask_drop=True,                 # each PCM branch scans only its region's tokens (False: every token)
        face_box_scale=1.2,
        on_nonfinite="stop",
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-5, warmup_steps=10, schedule="constant", final_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=1e-2, clip_norm=1.0, grad_accum=4, trainable="", frozen="", ema_decay=0.0))

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2000, every_minutes=30.0, keep=3))
    return c
