"""diffusers SVD checkpoints -> Flax NNX modules, and a cached Orbax copy.

    python -m actalker_jax.convert svd --src SVD_DIR --out OUT_DIR [--dtype float32|bfloat16|float16]

`SVD_DIR` is a diffusers folder: a model folder (config.json + *.safetensors) or a full pipeline
folder with `unet/` and `vae/` subfolders. `OUT_DIR` receives `unet/` and `vae/` Orbax checkpoints
and their configs; `load_converted(OUT_DIR, "unet")` reads them back.

Mapping rule (one rule for every module): the NNX parameter path joined with "." is the diffusers
key, with `kernel` (Linear/Conv) and `scale` (norms) for `weight`. Linear weights (out, in) are
transposed to (in, out); conv weights (out, in, *k) to (*k, in, out). Every expected key must be
present with the expected shape and no key may be left over: errors name the key and both shapes.
No downloads: paths only.
"""

import argparse
import json
import os
import sys
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors.index.json")


class ConversionError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped keys, or a bad path."""


# ----------------------------------------------------------------------------- key and layout mapping

def _raw(var: nnx.Variable):
    """A Variable's value (an array, or a ShapeDtypeStruct under nnx.eval_shape)."""
    return var.get_value() if hasattr(var, "get_value") else var.value


def path_to_key(path: tuple) -> str:
    """NNX parameter path -> diffusers state-dict key."""
    names = [str(p) for p in path]
    if names[-1] in ("kernel", "scale"):
        names[-1] = "weight"
    return ".".join(names)


def torch_to_flax_layout(key: str, value: np.ndarray, expected_shape: tuple[int, ...]) -> np.ndarray:
    """Transposes a PyTorch tensor into the Flax layout of the parameter at `key`."""
    if key.endswith(".weight") and value.ndim >= 2:
        value = np.transpose(value, tuple(range(2, value.ndim)) + (1, 0))
    if tuple(value.shape) != tuple(expected_shape):
        raise ConversionError(f"shape mismatch for key {key!r}: checkpoint {tuple(value.shape)} "
                              f"(as Flax layout) vs model {tuple(expected_shape)}")
    return value


def flax_to_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
    """Inverse of `torch_to_flax_layout` (used to export and in tests)."""
    if key.endswith(".weight") and value.ndim >= 2:
        value = np.transpose(value, (value.ndim - 1, value.ndim - 2) + tuple(range(value.ndim - 2)))
    return value


def expected_keys(abstract_state) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """{diffusers key: (nnx path, flax shape)} for every parameter of an (abstract) module state."""
    out = {}
    for path, var in nnx.to_flat_state(abstract_state):
        out[path_to_key(path)] = (path, tuple(_raw(var).shape))
    return out


def state_dict_to_params(abstract_state, state_dict: Mapping[str, np.ndarray], dtype, source: str = "checkpoint"):
    """Fills an abstract nnx.State (from nnx.eval_shape) with arrays from a diffusers state dict.

    Raises ConversionError naming every missing, unexpected or mis-shaped key.
    """
    expected = expected_keys(abstract_state)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys in {source}: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys in {source}: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    converted = {}
    for key, (path, shape) in expected.items():
        if key in state_dict:
            try:
                converted[path] = torch_to_flax_layout(key, np.asarray(state_dict[key]), shape)
            except ConversionError as err:
                problems.append(f"{err} in {source}")
    if problems:
        raise ConversionError("; ".join(problems))
    flat = nnx.to_flat_state(abstract_state)
    leaves = []
    for path, var in flat:
        leaves.append((path, var.replace(jnp.asarray(converted[path], dtype=dtype or _raw(var).dtype))))
    return nnx.from_flat_state(leaves)


def build_from_state_dict(make_module: Callable[[], nnx.Module], state_dict: Mapping[str, np.ndarray], dtype=None,
                          source: str = "checkpoint") -> nnx.Module:
    """Builds `make_module()` without allocating its random init and loads `state_dict` into it."""
    abstract = nnx.eval_shape(make_module)
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    params = state_dict_to_params(abstract_params, state_dict, dtype, source)
    rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)
    return nnx.merge(graphdef, params, rest)


# ----------------------------------------------------------------------------- reading diffusers folders

def _model_dir(path: str, subfolder: str) -> str:
    if not os.path.isdir(path):
        raise ConversionError(f"not a directory: {path}")
    if os.path.isfile(os.path.join(path, subfolder, "config.json")):
        return os.path.join(path, subfolder)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    raise ConversionError(f"no config.json in {path} or {os.path.join(path, subfolder)}")


def read_diffusers_folder(path: str, subfolder: str) -> tuple[dict, dict[str, np.ndarray], str]:
    """(config dict, state dict as numpy, model dir) of a diffusers model folder or pipeline subfolder."""
    from safetensors.numpy import load_file

    model_dir = _model_dir(path, subfolder)
    config_path = os.path.join(model_dir, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {config_path}: {err}") from None
    for name in INDEX_NAMES:
        index_path = os.path.join(model_dir, name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(os.path.join(model_dir, shard)))
            return config, state, model_dir
    for name in WEIGHT_NAMES:
        weights = os.path.join(model_dir, name)
        if os.path.isfile(weights):
            return config, load_file(weights), model_dir
    raise ConversionError(f"no safetensors weights ({' or '.join(WEIGHT_NAMES)}) in {model_dir}")


def _dtype(dtype):
    return jnp.dtype(dtype) if dtype is not None else None


def load_diffusers_unet(path: str, dtype=jnp.float32, *, hooks=None, compute_dtype=None, **config_overrides):
    """diffusers UNetSpatioTemporalConditionModel folder -> (UNetSpatioTemporalConditionModel, UNetConfig).

    `dtype` is the parameter dtype; `compute_dtype` (default: dtype) the activation dtype.
    """
    from actalker_jax.models.transformer import TransformerHooks
    from actalker_jax.models.unet import UNetConfig, UNetSpatioTemporalConditionModel

    config_dict, state, model_dir = read_diffusers_folder(path, "unet")
    try:
        config = UNetConfig.from_diffusers(config_dict, **config_overrides)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{os.path.join(model_dir, 'config.json')}: {err}") from None
    dtype = _dtype(dtype)

    def make():
        return UNetSpatioTemporalConditionModel(config, rngs=nnx.Rngs(0), hooks=hooks or TransformerHooks(),
                                                dtype=_dtype(compute_dtype) or dtype, param_dtype=dtype)

    return build_from_state_dict(make, state, dtype, source=model_dir), config


def load_diffusers_vae(path: str, dtype=jnp.float32, *, compute_dtype=None):
    """diffusers AutoencoderKLTemporalDecoder folder -> (AutoencoderKLTemporalDecoder, VAEConfig)."""
    from actalker_jax.models.vae import AutoencoderKLTemporalDecoder, VAEConfig

    config_dict, state, model_dir = read_diffusers_folder(path, "vae")
    try:
        config = VAEConfig.from_diffusers(config_dict)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{os.path.join(model_dir, 'config.json')}: {err}") from None
    dtype = _dtype(dtype)

    def make():
        return AutoencoderKLTemporalDecoder(config, rngs=nnx.Rngs(0), dtype=_dtype(compute_dtype) or dtype,
                                            param_dtype=dtype)

    return build_from_state_dict(make, state, dtype, source=model_dir), config


# ----------------------------------------------------------------------------- Orbax cache

MODELS = ("unet", "vae")


def _params_to_tree(params) -> dict:
    """nnx.State of parameters -> nested dict with string keys (Orbax-friendly)."""
    return {".".join(str(p) for p in path): np.asarray(_raw(var)) for path, var in nnx.to_flat_state(params)}


def save_converted(out_dir: str, name: str, module: nnx.Module, config) -> str:
    """Writes `module`'s parameters as an Orbax checkpoint in OUT_DIR/name and its config as JSON."""
    import dataclasses

    import orbax.checkpoint as ocp

    target = os.path.abspath(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}_config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(target, "params"), _params_to_tree(nnx.state(module, nnx.Param)), force=True)
    checkpointer.wait_until_finished()
    return target


def load_converted(out_dir: str, name: str, dtype=None, *, hooks=None, compute_dtype=None):
    """Reads back a module written by `save_converted` -> (module, config)."""
    import orbax.checkpoint as ocp

    if name not in MODELS:
        raise ConversionError(f"unknown model {name!r}; expected one of {MODELS}")
    config_path = os.path.join(out_dir, f"{name}_config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"no converted {name} in {out_dir} (missing {config_path})")
    with open(config_path) as f:
        config_dict = json.load(f)
    if name == "unet":
        from actalker_jax.models.transformer import TransformerHooks
        from actalker_jax.models.unet import UNetConfig, UNetSpatioTemporalConditionModel
        config = UNetConfig(**config_dict)

        def make(param_dtype):
            return UNetSpatioTemporalConditionModel(config, rngs=nnx.Rngs(0), hooks=hooks or TransformerHooks(),
                                                    dtype=_dtype(compute_dtype) or param_dtype,
                                                    param_dtype=param_dtype)
    else:
        from actalker_jax.models.vae import AutoencoderKLTemporalDecoder, VAEConfig
        config = VAEConfig(**config_dict)

        def make(param_dtype):
            return AutoencoderKLTemporalDecoder(config, rngs=nnx.Rngs(0), dtype=_dtype(compute_dtype) or param_dtype,
                                                param_dtype=param_dtype)

    restored = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(out_dir, name, "params")))
    stored_dtype = jnp.dtype(next(iter(restored.values())).dtype)
    dtype = _dtype(dtype) or stored_dtype
    abstract = nnx.eval_shape(lambda: make(dtype))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    leaves = []
    for path, var in nnx.to_flat_state(abstract_params):
        key = ".".join(str(p) for p in path)
        if key not in restored or tuple(restored[key].shape) != tuple(_raw(var).shape):
            raise ConversionError(f"{out_dir}/{name}: parameter {key} missing or mis-shaped in the checkpoint")
        leaves.append((path, var.replace(jnp.asarray(restored[key], dtype))))
    rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest), config


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actalker_jax.convert",
                                     description="Convert diffusers checkpoints to Flax (Orbax) for actalker_jax.")
    sub = parser.add_subparsers(dest="command", required=True)
    svd = sub.add_parser("svd", help="SVD img2vid(-xt) pipeline folder (unet/ and vae/) -> Orbax checkpoints",
                         description="Reads SRC (a diffusers pipeline folder with unet/ and vae/, or a single "
                                     "model folder) and writes OUT/unet, OUT/vae Orbax checkpoints plus configs.")
    svd.add_argument("--src", required=True, help="diffusers folder (local path; nothing is downloaded)")
    svd.add_argument("--out", required=True, help="output folder")
    svd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="parameter dtype of the written checkpoint")
    svd.add_argument("--models", default="unet,vae", help="comma-separated subset of: unet,vae")
    args = parser.parse_args(argv)
    try:
        models = [m for m in args.models.split(",") if m]
        for name in models:
            if name not in MODELS:
                raise ConversionError(f"--models: unknown model {name!r}; expected a subset of {MODELS}")
        for name in models:
            loader = load_diffusers_unet if name == "unet" else load_diffusers_vae
            module, config = loader(args.src, args.dtype)
            target = save_converted(args.out, name, module, config)
            n = sum(int(np.prod(_raw(v).shape)) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
            print(f"{name}: {n:,} parameters ({args.dtype}) -> {target}")
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
