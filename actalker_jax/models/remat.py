"""Activation rematerialisation (gradient checkpointing) by UNet block name.

    remat = {"default": "dots_saveable", "down_blocks.0": "full", "up_blocks.3": "full"}
    model = ACTalkerModel(config, rngs=..., remat=remat)

Block names are the UNet's module paths: `down_blocks.i`, `mid_block`, `up_blocks.i`; `down_blocks` and
`up_blocks` name every block of that kind and `default` every block not named otherwise (the most
specific entry wins). Policies:

| policy                            | saved for the backward pass                                     |
|-----------------------------------|-----------------------------------------------------------------|
| none                              | everything (no recomputation)                                  |
| full                              | only the block's inputs: the whole block is recomputed          |
| dots_saveable                     | matmul outputs (dot_general); the rest is recomputed            |
| dots_with_no_batch_dims_saveable  | matmul outputs without batch dimensions (the projections)       |
"""

from collections.abc import Mapping

import jax

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def normalize(remat: Mapping[str, str] | None, block_names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Validated, hashable (name, policy) pairs; raises naming the bad key or value."""
    if not remat:
        return ()
    groups = {name.split(".")[0] for name in block_names}
    known = set(block_names) | groups | {"default"}
    pairs = []
    for name, policy in dict(remat).items():
        if name not in known:
            raise ValueError(f"remat: unknown block {name!r}; known: default, {', '.join(sorted(known - {'default'}))}")
        if policy not in POLICIES:
            raise ValueError(f"remat[{name!r}]: unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        pairs.append((name, policy))
    return tuple(sorted(pairs))


def policy_name(pairs: tuple[tuple[str, str], ...], block: str) -> str:
    """The policy of `block` ("down_blocks.1"): exact name, then its kind, then "default", then "none"."""
    table = dict(pairs)
    for key in (block, block.split(".")[0], "default"):
        if key in table:
            return table[key]
    return "none"


def call(pairs: tuple[tuple[str, str], ...], block_name: str, fn, module, *args):
    """fn(module, *args), rematerialised with `block_name`'s policy (jax.checkpoint through nnx.remat)."""
    name = policy_name(pairs, block_name)
    if name == "none":
        return fn(module, *args)
    from flax import nnx

    return nnx.remat(fn, policy=POLICIES[name], prevent_cse=True)(module, *args)
