"""Fine-tuning ACTalker on one 80 GB GPU: SVD-xt weights frozen, PCM + IP-adapters + encoders trained.

    python -m actalker_jax.train --config configs/actalker_finetune_1gpu.py --workdir runs/finetune \\
        --config.data.records=/data/actalker/records --config.init.unet=checkpoints/svd_xt/unet

The paper's model (configs/actalker_svd_xt.py) with `pcm.residual="zero_init_residual"` (the PCM and
IP-adapter outputs start at zero, so step 0 is exactly the pretrained SVD-xt) and only the new parts
trainable (`optim.trainable`): the optimizer holds moments for ~0.33B of the 1.83B parameters. 14-frame
clips at 512x512, 1 clip per step with gradient accumulation 4, bf16, per-block remat, one device.

What it reaches: fits one H100 80 GB; step time, MFU and memory in docs/benchmarks.md
(`python -m actalker_jax.bench.train --config configs/actalker_finetune_1gpu.py`). Not trained to
convergence by us (no speech-video dataset on our machines).
"""

import importlib.util
import os

import ml_collections


def _paper_config() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "actalker_svd_xt.py")
    spec = importlib.util.spec_from_file_location("actalker_svd_xt_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = _paper_config()
    c.distributed = False
    c.total_steps = 20_000
    c.model.pcm.residual = "zero_init_residual"
    c.optim.trainable = "mamba_blocks|processor|audio_proj|id_proj|motion_proj|pose_guider"
    c.optim.lr = 3e-5
    c.data.n_frames = 14
    c.model.unet.num_frames = 14
    c.data.batch_size = 1
    c.remat = ml_collections.ConfigDict({"default": "dots_saveable"})
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, devices=1))
    c.checkpoint.every_steps = 1000
    return c
