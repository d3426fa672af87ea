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

What they reach on the demo with a 1000-step schedule (add `--config.total_steps=1000`; the first place where the demo
with its earlier gates had learned the yaw): docs/benchmarks.md, "The ablations on the current demo, 1000 steps".
Without PCM the yaw follows the motion less (0.66 / 0.74 motion-only / both, against the demo's 0.87 / 0.88); scanning
the whole clip brings it to 0.97 / 0.97 at a higher step cost; without mask-drop the mouth follows the audio a little
less (0.87 / 0.86 against 0.94 / 0.92) and the yaw less (0.76 / 0.68). With fixed gates (both signals in every sample)
the motion comes fastest (eyes 0.53 / 0.41, yaw 0.97 / 0.98) and audio-only control still works (0.93). These rows
were measured when the demo sampled the gates with (0.5, 0.25, 0.25), trained at stride 2 and sampled with motion
guidance 3 over consecutive frames on the whole frame (add `'--config.train.gate_probs=(0.5,0.25,0.25)'
--config.data.max_stride=2 --config.diffusion.guidance_motion=3.0 --config.diffusion.window_stride=1
--config.diffusion.guidance_regions=False` to reproduce them); the demo now samples (0.8, 0.1, 0.1), trains at stride
3 for 1600 steps and samples with motion guidance 6, window stride 3 and region guidance (docs/benchmarks.md, "Gate
probabilities", "Training window stride", "Sampling at the training frame spacing", "Region guidance"). The older
table at 500 steps ("Control vs training steps") was measured on the demo with SVD's EDM prior (rerun that base with
the overrides above and `--config.diffusion.center=zero --config.diffusion.sigma_data=1.0
--config.diffusion.guidance_audio=7.5`).
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
