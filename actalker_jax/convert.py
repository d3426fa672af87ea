"""diffusers SVD checkpoints and official ACTalker checkpoints -> Flax NNX modules, and a cached Orbax copy.

    python -m actalker_jax.convert svd --src SVD_DIR --out OUT_DIR [--dtype float32|bfloat16|float16]
    python -m actalker_jax.convert actalker --svd SVD_DIR --official CKPT_DIR [--step N] --out OUT_DIR [--dtype ...]

`SVD_DIR` is a diffusers folder: a model folder (config.json + *.safetensors) or a full pipeline
folder with `unet/` and `vae/` subfolders. `OUT_DIR` receives `unet/` and `vae/` Orbax checkpoints
and their configs; `load_converted(OUT_DIR, "unet")` reads them back.
`CKPT_DIR` holds the six official ACTalker files (`unet-N.pth`, `adapter_module-N.pth`, `pose_guider-N.pth`,
`audio_linear-N.pth`, `id_proj_model-N.pth`, `vasa_linear-N.pth`, see docs/official_keys.md); the
`actalker` command writes OUT_DIR/actalker (read back with `load_converted(OUT_DIR, "actalker")`) and,
when SVD_DIR has a `vae/`, OUT_DIR/vae. In Python: `load_official_actalker`.

Mapping rule (one rule for every module): the NNX parameter path joined with "." is the diffusers
key, with `kernel` (Linear/Conv) and `scale` (norms) for `weight`. Linear weights (out, in) are
transposed to (in, out); conv weights (out, in, *k) to (*k, in, out). Every expected key must be
present with the expected shape and no key may be left over: errors name the key and both shapes.
No downloads: paths only.
"""

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
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
    """diffusers UNetSpatioTemporalConditionModel folder -> UNetSpatioTemporalConditionModel (config: `.config`).

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

    return build_from_state_dict(make, state, dtype, source=model_dir)


def load_diffusers_vae(path: str, dtype=jnp.float32, *, compute_dtype=None):
    """diffusers AutoencoderKLTemporalDecoder folder -> AutoencoderKLTemporalDecoder (config: `.config`)."""
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

    return build_from_state_dict(make, state, dtype, source=model_dir)


# ----------------------------------------------------------------------------- Orbax cache

SVD_MODELS = ("unet", "vae")
MODELS = SVD_MODELS + ("actalker",)


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
    """Reads back a module written by `save_converted` (its config: `.config`)."""
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
    elif name == "actalker":
        from actalker_jax.models.actalker import ACTalkerConfig, ACTalkerModel
        config = ACTalkerConfig.from_dict(config_dict)

        def make(param_dtype):
            return ACTalkerModel(config, rngs=nnx.Rngs(0), dtype=_dtype(compute_dtype) or param_dtype,
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
    return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest)


# ----------------------------------------------------------------------------- official ACTalker checkpoints

OFFICIAL_FILES = ("unet", "adapter_module", "pose_guider", "audio_linear", "id_proj_model", "vasa_linear")
OFFICIAL_SUBMODULES = {"unet": "unet", "pose_guider": "pose_guider", "audio_linear": "audio_proj",
                       "id_proj_model": "id_proj", "vasa_linear": "motion_proj"}
OFFICIAL_EXTENSIONS = (".safetensors", ".pth")  # the first one found wins
OFFICIAL_AUDIO_WINDOW = (10, 5, 384)  # whisper-tiny: 10 tokens x 5 hidden states x 384 channels
_AUDIO_WINDOW_KEYS = ("audio_seq_len", "audio_blocks", "audio_channels")
_OFFICIAL_NAME = re.compile(rf"^({'|'.join(OFFICIAL_FILES)})-(\d+)({'|'.join(map(re.escape, OFFICIAL_EXTENSIONS))})$")
_TORCH_MISSING = "needs PyTorch to read/write .pth files: pip install torch (the CPU build is enough)"


def official_checkpoint_files(official_dir: str, step: int | None = None) -> tuple[int, dict[str, str]]:
    """(step, {file name: path}) of the six official files `NAME-STEP.pth` (or `.safetensors`) in a folder.

    step None: the largest step for which all six files exist.
    """
    if not os.path.isdir(official_dir):
        raise ConversionError(f"not a directory: {official_dir}")
    if step is None:
        found: dict[int, set[str]] = {}
        for entry in os.listdir(official_dir):
            match = _OFFICIAL_NAME.match(entry)
            if match:
                found.setdefault(int(match.group(2)), set()).add(match.group(1))
        complete = [s for s, names in found.items() if len(names) == len(OFFICIAL_FILES)]
        if not complete:
            if not found:
                names = ", ".join(f"{n}-N.pth" for n in OFFICIAL_FILES)
                raise ConversionError(f"no official ACTalker checkpoint files ({names}) in {official_dir}")
            newest = max(found)
            lacking = [f"{n}-{newest}.pth" for n in OFFICIAL_FILES if n not in found[newest]]
            raise ConversionError(f"no complete official ACTalker checkpoint in {official_dir}: "
                                  f"the newest step {newest} lacks {lacking}")
        step = max(complete)
    paths = {}
    for name in OFFICIAL_FILES:
        candidates = [os.path.join(official_dir, f"{name}-{step}{ext}") for ext in OFFICIAL_EXTENSIONS]
        existing = [p for p in candidates if os.path.isfile(p)]
        if not existing:
            raise ConversionError(f"missing official checkpoint file {candidates[-1]} "
                                  f"(or {os.path.basename(candidates[0])})")
        paths[name] = existing[0]
    return int(step), paths


def _strip_module_prefix(state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Removes DeepSpeed's `module.` key prefix wherever it occurs."""
    out = {}
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name in out:
            raise ConversionError(f"{source}: key {name!r} appears both with and without the 'module.' prefix")
        out[name] = value
    return out


def read_official_file(path: str) -> dict[str, np.ndarray]:
    """One official state dict (PyTorch pickle `.pth` or `.safetensors`) -> {key: numpy array}, `module.` stripped.

    Values keep the PyTorch layout; bfloat16 tensors of a `.pth` come back as float32.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            state = load_file(path)
        except (OSError, SafetensorError) as err:
            raise ConversionError(f"cannot read {path}: {err}") from None
        return _strip_module_prefix(state, path)
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: {_TORCH_MISSING}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from None
    if isinstance(loaded, Mapping) and len(loaded) == 1 and next(iter(loaded)) in ("state_dict", "module"):
        inner = next(iter(loaded.values()))
        loaded = inner if isinstance(inner, Mapping) else loaded
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path}: expected a state dict (names -> tensors), got a {type(loaded).__name__}")
    state = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        state[str(key)] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return _strip_module_prefix(state, path)


def _official_unet_config(unet_config):
    """UNetConfig (temporal_context "frame_mean") from a config.json path, a folder with one, a dict or a UNetConfig."""
    from actalker_jax.models.unet import UNetConfig

    if isinstance(unet_config, UNetConfig):
        return dataclasses.replace(unet_config, temporal_context="frame_mean")
    if isinstance(unet_config, Mapping):
        values, source = dict(unet_config), "unet_config"
    else:
        source = os.fspath(unet_config)
        if os.path.isdir(source):
            source = os.path.join(_model_dir(source, "unet"), "config.json")
        elif not os.path.isfile(source):
            raise ConversionError(f"unet_config: no such file or directory: {source}")
        try:
            with open(source) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ConversionError(f"cannot read {source}: {err}") from None
    try:
        return UNetConfig.from_diffusers(values, temporal_context="frame_mean")
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{source}: {err}") from None


def _official_shape(state: Mapping[str, np.ndarray], key: str, source: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"{source}: missing key {key!r} (needed to read the model sizes)")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ConversionError(f"{source}: key {key!r} has shape {shape}, expected {ndim} dims")
    return shape


def _official_sizes(unet_config, states: dict, paths: dict, overrides: dict) -> dict:
    """ACTalkerConfig encoder sizes read from the checkpoint shapes (PyTorch layout), checked against Dc."""
    dc = unet_config.cross_attention_dim
    if not isinstance(dc, int):
        raise ConversionError(f"unet config: ACTalker needs one cross_attention_dim, got {dc}")
    state, src = states["audio_linear"], paths["audio_linear"]
    hidden, n_in = _official_shape(state, "proj1.weight", src, 2)
    n_out, _ = _official_shape(state, "proj3.weight", src, 2)
    (norm_dim,) = _official_shape(state, "norm.weight", src, 1)
    if norm_dim != dc or n_out % dc:
        raise ConversionError(f"{src}: audio tokens of width {norm_dim} (norm.weight) and proj3.weight "
                              f"out-features {n_out} do not fit the UNet's cross_attention_dim {dc} "
                              f"(need width {dc}, a multiple of it)")
    given = [k for k in _AUDIO_WINDOW_KEYS if k in overrides]
    if given and len(given) != len(_AUDIO_WINDOW_KEYS):
        raise ConversionError(f"pass all of {_AUDIO_WINDOW_KEYS} or none, got only {given}")
    if given:
        window = tuple(overrides[k] for k in _AUDIO_WINDOW_KEYS)
    elif n_in == math.prod(OFFICIAL_AUDIO_WINDOW):
        window = OFFICIAL_AUDIO_WINDOW
    else:
        raise ConversionError(f"{src}: proj1.weight takes {n_in} input features (= audio_seq_len * audio_blocks * "
                              f"audio_channels); only the official {math.prod(OFFICIAL_AUDIO_WINDOW):,} = 10 * 5 * 384 "
                              f"is known, so pass audio_seq_len, audio_blocks and audio_channels (config overrides) "
                              f"whose product is {n_in}")
    if math.prod(window) != n_in:
        raise ConversionError(f"{src}: proj1.weight takes {n_in} input features, but audio_seq_len * audio_blocks * "
                              f"audio_channels = {' * '.join(map(str, window))} = {math.prod(window)}")
    sizes = dict(zip(_AUDIO_WINDOW_KEYS, window), audio_hidden_dim=hidden, audio_tokens=n_out // dc)

    state, src = states["id_proj_model"], paths["id_proj_model"]
    id_hidden, id_dim = _official_shape(state, "proj1.weight", src, 2)
    id_out, _ = _official_shape(state, "proj3.weight", src, 2)
    if id_out != dc:
        raise ConversionError(f"{src}: proj3.weight gives {id_out}-d ID tokens, the UNet's cross_attention_dim is {dc}")
    sizes.update(id_dim=id_dim, id_hidden_dim=id_hidden)

    state, src = states["vasa_linear"], paths["vasa_linear"]
    features, expression_dim = _official_shape(state, "proj1.weight", src, 2)
    if not 0 < features <= dc:
        raise ConversionError(f"{src}: proj1.weight gives {features} features, more than the UNet's "
                              f"cross_attention_dim {dc} (the motion token is [features ; pose], {dc} wide)")
    sizes.update(expression_dim=expression_dim, pose_dim=dc - features)

    state, src = states["pose_guider"], paths["pose_guider"]
    widths = [_official_shape(state, "conv_in.weight", src, 4)[0]]
    blocks = sorted(int(m.group(1)) for m in map(re.compile(r"^blocks\.(\d+)\.weight$").match, state) if m)
    if blocks != list(range(len(blocks))) or len(blocks) % 2:
        raise ConversionError(f"{src}: expected blocks.0 .. blocks.{{2k-1}} (pairs of convs), found blocks {blocks}")
    widths += [_official_shape(state, f"blocks.{2 * i + 1}.weight", src, 4)[0] for i in range(len(blocks) // 2)]
    out_width = _official_shape(state, "conv_out.weight", src, 4)[0]
    if out_width != unet_config.block_out_channels[0]:
        raise ConversionError(f"{src}: conv_out.weight gives {out_width} channels, the UNet's conv_in gives "
                              f"{unet_config.block_out_channels[0]}")
    sizes.update(pose_guider_channels=tuple(widths))
    return sizes


def _official_pcm_config(unet_state: Mapping[str, np.ndarray], source: str):
    """PCMConfig with d_state and expand read from the first PCM layer of the UNet state dict."""
    from actalker_jax.models.actalker_unet import PCMConfig

    in_proj = sorted(k for k in unet_state if k.endswith(".mamba_blocks.0.in_proj1.weight"))
    a_logs = sorted(k for k in unet_state if k.endswith(".mamba_blocks.0.audio_unit.A_logs"))
    if not in_proj or not a_logs:
        raise ConversionError(f"{source}: no PCM keys (*.mamba_blocks.0.in_proj1.weight, *.audio_unit.A_logs); "
                              "not an ACTalker UNet checkpoint")
    d_inner, channels = _official_shape(unet_state, in_proj[0], source, 2)
    d_state = _official_shape(unet_state, a_logs[0], source, 2)[1]
    if d_inner % channels:
        raise ConversionError(f"{source}: {in_proj[0]} has shape {(d_inner, channels)}; d_inner must be a multiple "
                              "of the channels")
    return PCMConfig(d_state=d_state, expand=d_inner // channels)


def ip_processor_keys(unet) -> list[str]:
    """Key prefix of each IP processor of an ACTalkerUNet (real or abstract), index = `adapter_module` index i."""
    names = {}
    for path, node in nnx.iter_graph(unet):
        names.setdefault(id(node), ".".join(str(p) for p in path))
    return [names[id(processor)] for processor in unet.ip_processors()]


def _adapter_pairs(unet) -> dict[str, str]:
    """{adapter_module key `{i}.to_{k,v}_ip.{j}.weight`: its unet key}, in the official order."""
    pairs = {}
    for i, (prefix, processor) in enumerate(zip(ip_processor_keys(unet), unet.ip_processors())):
        for kv in ("k", "v"):
            for j in range(len(processor.to_k_ip)):
                pairs[f"{i}.to_{kv}_ip.{j}.weight"] = f"{prefix}.to_{kv}_ip.{j}.weight"
    return pairs


def _torch_shape(key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(flax_to_torch_layout(key, np.broadcast_to(np.float32(0), flax_shape)).shape)


def _merge_adapter(unet_state: dict, adapter_state: Mapping[str, np.ndarray], pairs: dict[str, str],
                   torch_shapes: dict[str, tuple[int, ...]], unet_source: str, adapter_source: str) -> None:
    """Checks `adapter_module` against the model, then fills the IP keys `unet_state` lacks or checks the copies."""
    missing = [k for k in pairs if k not in adapter_state]
    unexpected = sorted(set(adapter_state) - set(pairs))
    problems = []
    if missing:
        problems.append(f"missing keys in {adapter_source}: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        more = " ..." if len(unexpected) > 20 else ""
        problems.append(f"unexpected keys in {adapter_source}: {unexpected[:20]}{more}")
    for adapter_key, unet_key in pairs.items():
        if adapter_key in adapter_state and tuple(adapter_state[adapter_key].shape) != torch_shapes[unet_key]:
            problems.append(f"shape mismatch for key {adapter_key!r}: checkpoint "
                            f"{tuple(adapter_state[adapter_key].shape)} vs model {torch_shapes[unet_key]} "
                            f"(PyTorch layout, as {unet_key!r}) in {adapter_source}")
    if problems:
        raise ConversionError("; ".join(problems))
    for adapter_key, unet_key in pairs.items():
        value = adapter_state[adapter_key]
        if unet_key not in unet_state:
            unet_state[unet_key] = value
        elif unet_state[unet_key].shape == value.shape and not np.array_equal(unet_state[unet_key], value):
            raise ConversionError(f"IP weight {adapter_key!r} in {adapter_source} differs from its copy {unet_key!r} "
                                  f"in {unet_source}")


def load_official_actalker(official_dir: str, *, unet_config, step: int | None = None, dtype=jnp.float32,
                           compute_dtype=None, pcm=None, **config_overrides):
    """The six official ACTalker files (spec §10, docs/official_keys.md) -> a ready ACTalkerModel.

    unet_config: the diffusers UNet config.json (path, a folder holding it or a pipeline folder with unet/,
    a dict or a UNetConfig); its temporal_context becomes "frame_mean". step None: the newest complete step.
    Encoder sizes come from the checkpoint shapes; pcm (default: PCMConfig with d_state/expand read from the
    checkpoint) and config_overrides (other ACTalkerConfig fields) set the rest. dtype is the parameter
    dtype, compute_dtype (default dtype) the activation dtype. Every file is checked key by key.
    """
    from actalker_jax.models.actalker import ACTalkerConfig, ACTalkerModel

    reserved = sorted({"unet", "pcm"} & set(config_overrides))
    if reserved:
        raise ConversionError(f"config overrides {reserved} are not allowed: use unet_config= and pcm=")
    unet_cfg = _official_unet_config(unet_config)
    step, paths = official_checkpoint_files(official_dir, step)
    states = {name: read_official_file(path) for name, path in paths.items()}
    sizes = _official_sizes(unet_cfg, states, paths, config_overrides)
    if pcm is None:
        pcm = _official_pcm_config(states["unet"], paths["unet"])
    try:
        config = ACTalkerConfig(unet=unet_cfg, pcm=pcm, **{**sizes, **config_overrides})
    except (TypeError, ValueError) as err:
        raise ConversionError(f"ACTalkerConfig for {official_dir} (step {step}): {err}") from None
    dtype = _dtype(dtype) or jnp.dtype(jnp.float32)

    def make():
        return ACTalkerModel(config, rngs=nnx.Rngs(0), dtype=_dtype(compute_dtype) or dtype, param_dtype=dtype)

    try:
        abstract = nnx.eval_shape(make)
    except ValueError as err:
        raise ConversionError(f"cannot build ACTalkerModel for {official_dir} (step {step}): {err}") from None
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = nnx.to_flat_state(abstract_params)
    unet_shapes = {key: _torch_shape(key, shape) for key, (_, shape) in
                   expected_keys(nnx.state(abstract.unet, nnx.Param)).items()}
    _merge_adapter(states["unet"], states["adapter_module"], _adapter_pairs(abstract.unet), unet_shapes,
                   paths["unet"], paths["adapter_module"])
    uncovered = sorted({str(path[0]) for path, _ in flat} - set(OFFICIAL_SUBMODULES.values()))
    if uncovered:
        raise ConversionError(f"ACTalkerModel parameters under {uncovered} have no official checkpoint file")
    leaves, problems = [], []
    for name, attr in OFFICIAL_SUBMODULES.items():
        part = nnx.from_flat_state([(path[1:], var) for path, var in flat if path[0] == attr])
        try:
            filled = state_dict_to_params(part, states.pop(name), dtype, source=paths[name])
        except ConversionError as err:
            problems.append(str(err))
            continue
        leaves += [((attr,) + tuple(path), var) for path, var in nnx.to_flat_state(filled)]
    if problems:
        raise ConversionError("; ".join(problems))
    rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest)


def official_state_dicts(model) -> dict[str, dict[str, np.ndarray]]:
    """ACTalkerModel -> {official file name: state dict in PyTorch layout}, the inverse of the import.

    `adapter_module` repeats the UNet's IP weights as `{i}.to_{k,v}_ip.{j}.weight` (official order).
    """
    files: dict[str, dict[str, np.ndarray]] = {name: {} for name in OFFICIAL_FILES}
    file_of = {attr: name for name, attr in OFFICIAL_SUBMODULES.items()}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = path_to_key(path)
        attr, rest = key.split(".", 1)
        files[file_of[attr]][rest] = np.ascontiguousarray(flax_to_torch_layout(key, np.asarray(_raw(var))))
    for adapter_key, unet_key in _adapter_pairs(model.unet).items():
        files["adapter_module"][adapter_key] = files["unet"][unet_key]
    return files


def write_official_file(state: Mapping[str, np.ndarray], path: str) -> str:
    """Writes one state dict as `.safetensors` or as a PyTorch pickle (`.pth`, any other suffix)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
        return path
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: {_TORCH_MISSING}") from None

    def tensor(value: np.ndarray):
        value = np.ascontiguousarray(value)
        value = value if value.flags.writeable else value.copy()
        if value.dtype == jnp.bfloat16:
            return torch.from_numpy(value.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(value)

    torch.save({k: tensor(v) for k, v in state.items()}, path)
    return path


def export_official_actalker(model, out_dir: str, step: int, *, fmt: str = "pth") -> dict[str, str]:
    """Writes an ACTalkerModel as the six official files `NAME-STEP.{fmt}` -> {file name: path}."""
    if fmt not in ("pth", "safetensors"):
        raise ConversionError(f"export format must be 'pth' or 'safetensors', got {fmt!r}")
    os.makedirs(out_dir, exist_ok=True)
    return {name: write_official_file(state, os.path.join(out_dir, f"{name}-{step}.{fmt}"))
            for name, state in official_state_dicts(model).items()}


def _convert_official(args) -> None:
    """The `actalker` command: official checkpoint -> OUT/actalker (+ OUT/vae from the SVD folder if it has one)."""
    if not os.path.isdir(args.svd):
        raise ConversionError(f"not a directory: {args.svd}")
    step, _ = official_checkpoint_files(args.official, args.step)
    model = load_official_actalker(args.official, unet_config=args.svd, step=step, dtype=args.dtype)
    target = save_converted(args.out, "actalker", model, model.config)
    n = sum(int(np.prod(_raw(v).shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    print(f"actalker: {n:,} parameters ({args.dtype}, step {step}) -> {target}")
    if os.path.isdir(os.path.join(args.svd, "vae")):
        vae = load_diffusers_vae(os.path.join(args.svd, "vae"), args.dtype)
        target = save_converted(args.out, "vae", vae, vae.config)
        n = sum(int(np.prod(_raw(v).shape)) for _, v in nnx.to_flat_state(nnx.state(vae, nnx.Param)))
        print(f"vae: {n:,} parameters ({args.dtype}) -> {target}")


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actalker_jax.convert",
                                     description="Convert diffusers SVD and official ACTalker checkpoints to Flax "
                                                 "(Orbax) for actalker_jax.")
    sub = parser.add_subparsers(dest="command", required=True)
    svd = sub.add_parser("svd", help="SVD img2vid(-xt) pipeline folder (unet/ and vae/) -> Orbax checkpoints",
                         description="Reads SRC (a diffusers pipeline folder with unet/ and vae/, or a single "
                                     "model folder) and writes OUT/unet, OUT/vae Orbax checkpoints plus configs.")
    svd.add_argument("--src", required=True, help="diffusers folder (local path; nothing is downloaded)")
    svd.add_argument("--out", required=True, help="output folder")
    svd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="parameter dtype of the written checkpoint")
    svd.add_argument("--models", default="unet,vae", help="comma-separated subset of: unet,vae")
    act = sub.add_parser("actalker", help="official ACTalker checkpoint (unet-N.pth, adapter_module-N.pth, ...) "
                                          "-> Orbax checkpoint",
                         description="Reads the six official ACTalker files of step N from OFFICIAL and the UNet "
                                     "config.json from SVD, and writes OUT/actalker (Orbax) plus "
                                     "OUT/actalker_config.json; converts SVD's vae/ to OUT/vae when present.")
    act.add_argument("--svd", required=True, help="SVD-xt diffusers folder (pipeline with unet/ [and vae/], or the "
                                                  "unet folder): its config.json defines the UNet")
    act.add_argument("--official", required=True, help="folder with unet-N.pth, adapter_module-N.pth, "
                                                       "pose_guider-N.pth, audio_linear-N.pth, id_proj_model-N.pth, "
                                                       "vasa_linear-N.pth (.safetensors also accepted)")
    act.add_argument("--step", type=int, default=None, help="checkpoint step N (default: the newest complete step)")
    act.add_argument("--out", required=True, help="output folder")
    act.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="parameter dtype of the written checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.command == "actalker":
            _convert_official(args)
            return 0
        models = [m for m in args.models.split(",") if m]
        for name in models:
            if name not in SVD_MODELS:
                raise ConversionError(f"--models: unknown model {name!r}; expected a subset of {SVD_MODELS}")
        for name in models:
            loader = load_diffusers_unet if name == "unet" else load_diffusers_vae
            module = loader(args.src, args.dtype)
            target = save_converted(args.out, name, module, module.config)
            n = sum(int(np.prod(_raw(v).shape)) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
            print(f"{name}: {n:,} parameters ({args.dtype}) -> {target}")
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
