"""The paper's ablations on the CPU demo (configs/demo.py), each one config override.

    python -m actalker_jax.train --config configs/demo_ablations.py:no_pcm --workdir runs/ablation_no_pcm
    python -m actalker_jax.evaluate control --workdir runs/ablation_no_pcm

| arg           | change from the demo                                                               |
|---------------|------------------------------------------------------------------------------------|
| no_pcm        | no PCM layers: audio and motion reach the UNet through IP-adapter cross-attention only |
| no_mask_drop  | both PCM branches scan every token (all-ones masks) instead of their own region     |
| scan_video    | each PCM scan runs over the whole clip (F x h x w tokens) instead of per frame      |
| fixed_gates   | both signals every step (gate_probs (1, 0, 0)) instead of sampled per sample        |
| both_ends     | research variant, not an ablation: PCM condition tokens at both ends of each scan   |

What they reach at 500 steps: the ablation table in docs/benchmarks.md ("Control vs training steps"), with its
commands. That table was measured on the demo of its date, with SVD's EDM prior; the demo now trains around the
reference (docs/benchmarks.md, "A data prior around the reference"). To rerun an ablation on that base, add
`--config.diffusion.center=zero --config.diffusion.sigma_data=1.0 --config.diffusion.guidance_audio=7.5`.
"""

import importlib.util
import os

ABLATIONS = {
    "no_pcm": {"model.pcm.enabled": False},
    "no_mask_drop": {"train.mask_drop": False},
    "scan_video": {"model.pcm.scan_over": "video"},
    "fixed_gates": {"train.gate_probs": (1.0, 0.0, 0.0)},
    "both_ends": {"model.pcm.condition_placement": "both_ends"},
}


def _demo_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str | None = None):
    if arg not in ABLATIONS:
        raise ValueError(f"configs/demo_ablations.py needs one of {sorted(ABLATIONS)} after ':', got {arg!r}")
    config = _demo_config()
    for key, value in ABLATIONS[arg].items():
        target = config
        *parents, leaf = key.split(".")
        for name in parents:
            target = target[name]
        target[leaf] = value
    return config
