"""Helpers for parity tests against diffusers (PyTorch CPU): randomised models and tensor conversion."""

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    """Overwrites every parameter (zero-initialised ones included) with seeded random values.

    Norm weights stay near 1 and mix factors near 0, so activations keep a sane scale and a wrong
    parameter mapping still changes the output.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim <= 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(scale * noise / np.sqrt(fan_in))
    return module


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
