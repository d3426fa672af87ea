"""Optimizer from config: AdamW, warm-up + schedule, global-norm clipping, frozen groups, accumulation.

`config.optim` fields:

| field            | meaning                                                                        |
|------------------|--------------------------------------------------------------------------------|
| lr               | peak learning rate                                                             |
| warmup_steps     | linear warm-up from 0 to lr                                                    |
| schedule         | "constant" (official) or "cosine" (decay to lr * final_lr_ratio at total_steps) |
| final_lr_ratio   | end of the cosine decay, as a fraction of lr                                   |
| b1, b2, eps      | Adam moments                                                                   |
| weight_decay     | decoupled weight decay                                                         |
| clip_norm        | global-norm gradient clipping (0: none)                                        |
| grad_accum       | optimizer update every k micro-steps (optax.MultiSteps)                        |
| trainable        | regex: only matching parameter keys train ("" = all)                           |
| frozen           | regex: matching parameter keys are frozen ("" = none)                          |

Parameters are a flat {"dotted.key": array} dict (train.py), so the regexes match diffusers-style keys,
e.g. `trainable="mamba_blocks|processor|audio_proj|id_proj|motion_proj|pose_guider"` trains PCM and adapters.
"""

import re

import optax


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, config.lr, max(int(config.warmup_steps), 1))
    if config.schedule == "constant":
        after = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        decay_steps = max(total_steps - int(config.warmup_steps), 1)
        after = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.final_lr_ratio)
    else:
        raise ValueError(f"config.optim.schedule must be 'constant' or 'cosine', got {config.schedule!r}")
    return optax.join_schedules([warmup, after], [int(config.warmup_steps)])


def trainable_params(params: dict, config) -> tuple[dict, dict]:
    """Splits a flat parameter dict into (trainable, frozen) by the `trainable` / `frozen` regexes.

    Only the trainable part is differentiated and has optimizer state (frozen weights cost no gradient
    or moment memory).
    """
    labels = trainable_labels(params.keys(), config)
    return ({k: v for k, v in params.items() if labels[k] == "train"},
            {k: v for k, v in params.items() if labels[k] == "frozen"})


def trainable_labels(keys, config) -> dict[str, str]:
    """{key: "train" | "frozen"} from the `trainable` / `frozen` regexes."""
    labels = {}
    for key in keys:
        trains = not config.trainable or re.search(config.trainable, key) is not None
        if config.frozen and re.search(config.frozen, key):
            trains = False
        labels[key] = "train" if trains else "frozen"
    if "train" not in labels.values():
        raise ValueError(f"config.optim: no parameter is trainable (trainable={config.trainable!r}, "
                         f"frozen={config.frozen!r})")
    return labels


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of the trainable parameters (a flat dict: `trainable_params` picks them)."""
    chain = []
    if config.clip_norm:
        chain.append(optax.clip_by_global_norm(config.clip_norm))
    chain.append(optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                             eps=config.eps, weight_decay=config.weight_decay))
    optimizer = optax.chain(*chain)
    if int(config.grad_accum) > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=int(config.grad_accum))
    return optimizer
