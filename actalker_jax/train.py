"""Training: `python -m actalker_jax.train --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]`.

One flat loop, banner-sectioned (big_vision style): distributed set-up, mesh, data, model + optimizer
created sharded, checkpoint restore, jitted train step, loop with checkpoints, logging and a final summary.
Re-running the same command resumes from the newest complete checkpoint in `--workdir`.
"""

import dataclasses
import json
import os
import re
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from actalker_jax import diffusion, flops, optim, sharding
from actalker_jax.data import pipeline
from actalker_jax.media import Media
from actalker_jax.run_model import TrainError, flatten, make_model_fn, model_config, unflatten  # noqa: F401
from actalker_jax.models.actalker import ACTalkerModel, record_conditions

CONFIG_FLAG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and data of the run go.")


@dataclasses.dataclass
class TrainResult:
    """What `train` leaves: the final train state (params, opt_state, step, key[, ema]), a summary (step, seconds,
    loss_first, loss_last, losses: this call's per-step losses, the same on every process) and the data iterator
    positioned after the last consumed batch."""

    state: dict
    summary: dict
    data_iter: object
    workdir: str


# ----------------------------------------------------------------------------- config -> objects

def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def global_batch(local: dict, mesh) -> dict:
    """Per-process numpy batch -> global jax arrays sharded over (data, fsdp) on the batch axis."""
    s = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v)) for k, v in local.items()}


# ----------------------------------------------------------------------------- the loss

def sample_controls(key, batch_size: int, config):
    """Per-sample gates (B, 2) and condition drops (each (B,) bool) for one step."""
    k_gate, k_app, k_audio, k_motion = jax.random.split(key, 4)
    choice = jax.random.choice(k_gate, 3, (batch_size,), p=jnp.asarray(config.train.gate_probs, jnp.float32))
    gates = jnp.stack([choice != 2, choice != 1], axis=1).astype(jnp.float32)  # 0 both, 1 audio, 2 motion
    p = config.train.cond_dropout
    drops = dict(drop_appearance=jax.random.bernoulli(k_app, p, (batch_size,)),
                 drop_audio=jax.random.bernoulli(k_audio, p, (batch_size,)),
                 drop_motion=jax.random.bernoulli(k_motion, p, (batch_size,)))
    return gates, drops


def loss_fn(model: ACTalkerModel, batch: dict, key, config, edm: diffusion.EDMConfig):
    """EDM v-prediction loss of one batch (spec §5) -> (mean loss, per-sample losses)."""
    k_sigma, k_noise, k_control = jax.random.split(key, 3)
    x0 = batch["latents"] * edm.latent_scale
    batch_size = x0.shape[0]
    sigma = diffusion.sample_sigmas(k_sigma, batch_size, edm)
    noisy, _ = diffusion.add_noise(k_noise, x0, sigma, edm)
    prior = diffusion.data_prior(batch["ref_latent"], edm)
    sample, timestep = diffusion.model_inputs(noisy, batch["ref_latent"], sigma, prior)
    gates, drops = sample_controls(k_control, batch_size, config)
    conditions = record_conditions(batch, config.train.face_box_scale)
    masks = dict(mask_audio=batch["mask_audio"], mask_motion=batch["mask_motion"])
    if not config.train.get("mask_drop", True):  # ablation: both branches see every token
        masks = {k: jnp.ones_like(v) for k, v in masks.items()}
    out = model(sample, timestep, batch["added_time_ids"], conditions, gates, **masks, **drops)
    per_sample, mean = diffusion.denoising_loss(out.astype(jnp.float32), noisy, x0, sigma, prior)
    return mean, per_sample


# ----------------------------------------------------------------------------- model, state and step

@dataclasses.dataclass
class Trainer:
    """The sharded training program of a config on a mesh (shared by train() and bench.train).

    init(): the initial train state, created sharded (never materialised on one device).
    step(state, batch) -> (state, metrics): the jitted, state-donating train step.
    """

    graphdef: object
    model_state: nnx.State          # abstract model state (shapes, logical axes)
    abstract_state: dict            # abstract train state: params, opt_state, step, key[, ema]
    state_shardings: dict
    init: object
    step: object
    mesh: object
    config: object

    def flops_per_step(self, batch: dict) -> int:
        """Analytic FLOPs of one training step on `batch` (arrays or ShapeDtypeStructs): 3x the forward's
        matmul/conv FLOPs (backward = 2x forward; remat recomputation is not counted, as MFU convention)."""
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.abstract_state["params"])
        edm = diffusion.EDMConfig(**self.config.diffusion.to_dict())

        def forward(params, batch):
            model = nnx.merge(self.graphdef, unflatten(self.model_state, params))
            return loss_fn(model, batch, jax.random.key(0), self.config, edm)

        return 3 * flops.matmul_flops(forward, params, spec)


PRETRAINED = {"unet": "unet.", "actalker": ""}  # config.init field -> prefix of its keys in the model


def _pretrained_specs(config, model_state, param_shardings) -> dict:
    """{config.init field: (params dir, {model key: sharded ShapeDtypeStruct})} of the converted checkpoints.

    config.init.unet: a converted SVD UNet (`python -m actalker_jax.convert svd --out DIR` -> DIR/unet);
    config.init.actalker: a converted official ACTalker (`convert actalker` -> DIR/actalker). Keys the
    model lacks, and model keys of the checkpoint's part missing from it, are errors naming the key.
    """
    import orbax.checkpoint as ocp

    init = config.get("init") or {}
    shapes = {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(model_state)}
    specs = {}
    for field, prefix in PRETRAINED.items():
        path = init.get(field, "")
        if not path:
            continue
        params_dir = os.path.abspath(os.path.join(path, "params"))
        if not os.path.isdir(params_dir):
            raise TrainError(f"config.init.{field}: no converted checkpoint at {path!r} (expected {params_dir}; "
                             f"make it with `python -m actalker_jax.convert`)")
        stored = ocp.StandardCheckpointer().metadata(params_dir)
        stored = getattr(stored, "item_metadata", stored)
        wanted = {}
        for key, meta in stored.items():
            name = prefix + key
            if name not in shapes:
                raise TrainError(f"config.init.{field}: {path} holds {key!r}, which the model (config.model) lacks")
            if tuple(meta.shape) != tuple(shapes[name].shape):
                raise TrainError(f"config.init.{field}: {key!r} is {tuple(meta.shape)} in {path}, the model's "
                                 f"{name} is {tuple(shapes[name].shape)}")
            wanted[name] = jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=param_shardings[name])
        if prefix:
            missing = [k for k in shapes if k.startswith(prefix) and k not in wanted and _pretrained_part(k)]
            if missing:
                raise TrainError(f"config.init.{field}: {path} lacks {len(missing)} UNet parameters, e.g. "
                                 f"{missing[0][len(prefix):]!r}")
        specs[field] = (params_dir, wanted)
    return specs


def _pretrained_part(key: str) -> bool:
    """Whether a model key is part of the SVD UNet proper (not PCM / IP-adapter weights that ACTalker adds)."""
    return ".mamba_blocks." not in key and ".processor." not in key


def _restore_pretrained(specs: dict) -> dict:
    """{model key: sharded array} read from the converted checkpoints described by `specs`."""
    import orbax.checkpoint as ocp

    out = {}
    for field, (params_dir, wanted) in specs.items():
        prefix = PRETRAINED[field]
        restored = ocp.StandardCheckpointer().restore(
            params_dir, {name[len(prefix):]: spec for name, spec in wanted.items()})
        out.update({prefix + key: value for key, value in restored.items()})
    return out


def build_trainer(config, mesh) -> Trainer:
    """Model, optimizer, sharded init and the jitted train step for `config` on `mesh`."""
    make_model = make_model_fn(config)
    graphdef, model_state = nnx.split(nnx.eval_shape(make_model))
    param_shardings = {".".join(str(p) for p in path): NamedSharding(mesh, sharding.variable_spec(var, mesh=mesh))
                       for path, var in nnx.to_flat_state(model_state)}
    optimizer = optim.make_optimizer(config.optim, int(config.total_steps))
    try:
        trainable, _ = optim.trainable_params(flatten(model_state), config.optim)
    except ValueError as err:
        raise TrainError(str(err)) from None
    trainable_keys = frozenset(trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    edm = diffusion.EDMConfig(**config.diffusion.to_dict())

    def init_state(pretrained):
        model = make_model()
        if pretrained:
            _, model_params = nnx.split(model)
            params = flatten(model_params)
            params.update({k: v.astype(params[k].dtype) for k, v in pretrained.items()})
            model = nnx.merge(graphdef, unflatten(model_params, params))
            # The IP-adapter K/V start from the (now pretrained) attn2 K/V, as in the official code.
            model.unet.init_ip_adapters()
        params = flatten(nnx.split(model)[1])
        train_params = {k: v for k, v in params.items() if k in trainable_keys}
        state = dict(params=params, opt_state=optimizer.init(train_params), step=jnp.zeros((), jnp.int32),
                     key=jax.random.key(config.seed))
        if config.optim.ema_decay:
            state["ema"] = params
        return state

    pretrained_specs = _pretrained_specs(config, model_state, param_shardings)
    abstract_state = jax.eval_shape(init_state, {name: spec for _, wanted in pretrained_specs.values()
                                                 for name, spec in wanted.items()})
    state_shardings = _state_shardings(abstract_state, param_shardings, replicated)

    def train_step(state, batch):
        key, step_key = jax.random.split(state["key"])
        step_key = jax.random.fold_in(step_key, state["step"])

        train_params = {k: v for k, v in state["params"].items() if k in trainable_keys}

        def loss_of(train_params):
            model = nnx.merge(graphdef, unflatten(model_state, {**state["params"], **train_params}))
            return loss_fn(model, batch, step_key, config, edm)

        (loss, per_sample), grads = jax.value_and_grad(loss_of, has_aux=True)(train_params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.all(jnp.isfinite(per_sample)) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state["opt_state"], train_params)
        params = {**state["params"], **jax.tree.map(lambda p, u: p + u, train_params, updates)}
        new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1, key=key)
        if "ema" in state:
            decay = config.optim.ema_decay
            new_state["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
        # A non-finite step leaves parameters, optimizer state and EMA as they were (only step and key move).
        keep = dict(state, step=new_state["step"], key=key)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, keep)
        return new_state, dict(loss=loss, grad_norm=grad_norm, finite=finite)

    sharded_init = jax.jit(init_state, out_shardings=state_shardings, donate_argnums=(0,))

    def jit_init():
        """The initial state: random init from config.seed, then the checkpoints of config.init, sharded."""
        return sharded_init(_restore_pretrained(pretrained_specs))
    with sharding.axis_rules(mesh):
        jit_step = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                           out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    def step(state, batch):
        with sharding.axis_rules(mesh):
            return jit_step(state, batch)

    return Trainer(graphdef=graphdef, model_state=model_state, abstract_state=abstract_state,
                   state_shardings=state_shardings, init=jit_init, step=step, mesh=mesh, config=config)


# Trainers built in this process, newest last: a later train() call whose program is unchanged (a resume in the
# same session, a rerun with other logging or checkpoint settings) reuses the compiled init and step.
_TRAINERS: dict = {}
_TRAINERS_KEPT = 2


def cached_trainer(config, mesh) -> Trainer:
    """build_trainer(config, mesh), reused while everything that enters its programs is the same: the config
    without its `log` and `checkpoint` sections (which only the loop reads) and the mesh."""
    program = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k not in ("log", "checkpoint")}
    key = (json.dumps(program, sort_keys=True), mesh)
    trainer = _TRAINERS.pop(key, None) or build_trainer(config, mesh)
    _TRAINERS[key] = trainer  # most recently used last
    while len(_TRAINERS) > _TRAINERS_KEPT:
        _TRAINERS.pop(next(iter(_TRAINERS)))
    return trainer


# ----------------------------------------------------------------------------- main

def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Runs (or resumes) training up to `config.total_steps`."""

    stop = {"signal": None}  # SIGTERM / SIGINT at any time: finish the current step, checkpoint, exit

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(config, workdir, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: dict) -> TrainResult:
    import grain
    import orbax.checkpoint as ocp

    # ------------------------------------------------------------------ distributed set-up
    if config.get("distributed", False):
        initialize_distributed()
    os.makedirs(workdir, exist_ok=True)

    # ------------------------------------------------------------------ mesh
    try:
        devices = jax.devices() if config.mesh.get("devices", -1) == -1 else jax.devices()[:config.mesh.devices]
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    except ValueError as err:
        raise TrainError(f"config.mesh: {err}") from None
    batch_axis = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch_size = config.data.batch_size * jax.process_count()
    if global_batch_size % batch_axis:
        raise TrainError(f"config.data.batch_size: the global batch {global_batch_size} is not divisible by the "
                         f"mesh's data*fsdp = {batch_axis}")
    try:
        diffusion.EDMConfig(**config.diffusion.to_dict())
    except (TypeError, ValueError) as err:
        raise TrainError(f"config.diffusion: {err}") from None

    # ------------------------------------------------------------------ data
    if config.get("synthetic_clips", 0) and not config.data.records:
        config.unlock()
        config.data.records = _synthetic_records(config, workdir)
        config.lock()
    dataset = pipeline.make_dataset(config, split="train", process_index=jax.process_index(),
                                    process_count=jax.process_count())
    data_iter = iter(dataset)

    # ------------------------------------------------------------------ model + optimizer, created sharded
    trainer = cached_trainer(config, mesh)
    total_steps = int(config.total_steps)

    # ------------------------------------------------------------------ checkpoints
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep,
                                             save_interval_steps=1, enable_async_checkpointing=True),
        item_handlers=dict(state=ocp.StandardCheckpointHandler(), data=grain.checkpoint.CheckpointHandler(),
                           config=ocp.JsonCheckpointHandler()))
    latest = manager.latest_step()
    if latest is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              trainer.abstract_state, trainer.state_shardings)
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iter)))
        state = restored["state"]
        logging.info("resumed from step %d", latest)
    else:
        state = trainer.init()

    # ------------------------------------------------------------------ loop
    config_json = json.loads(config.to_json_best_effort())
    step = int(jax.device_get(state["step"]))
    start_time, last_save, losses = time.time(), time.time(), []
    progress = _progress(total_steps, step)
    log = Logger(config, trainer, workdir, total_steps)
    try:
        while step < total_steps:
            t_data = time.time()
            local = next(data_iter)
            local_clips = local.pop("clip_index", None)
            batch = global_batch(local, mesh)
            data_wait = time.time() - t_data
            state, metrics = trainer.step(state, batch)
            step += 1
            metrics = jax.device_get(metrics)
            log.step(step, batch, metrics, data_wait)
            if not metrics["finite"]:
                clips = local_clips.tolist() if local_clips is not None else "unknown"
                if config.train.on_nonfinite == "stop":
                    raise TrainError(f"non-finite loss or gradient at step {step} (batch clip_index {clips}); "
                                     f"the newest checkpoint is step {manager.latest_step()}")
                logging.warning("non-finite loss at step %d (clip_index %s): update skipped", step, clips)
            losses.append(float(metrics["loss"]))
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", data_s=f"{data_wait:.2f}")
            save = step % config.checkpoint.every_steps == 0 or step == total_steps or stop["signal"] is not None
            if config.checkpoint.every_minutes and time.time() - last_save > 60 * config.checkpoint.every_minutes:
                save = True
            if save:
                last_save = time.time()
                manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           data=grain.checkpoint.CheckpointSave(data_iter),
                                                           config=ocp.args.JsonSave(config_json)), force=True)
            if log.wants_sample(step):
                log.sample(step, state)
            if stop["signal"] is not None:
                logging.info("signal %d: checkpoint at step %d saved, exiting", stop["signal"], step)
                break
    finally:
        manager.wait_until_finished()
        progress.close()
        log.close()
    summary = dict(step=step, seconds=round(time.time() - start_time, 1),
                   loss_first=losses[0] if losses else None, loss_last=float(np.mean(losses[-10:])) if losses else None,
                   step_seconds=log.median_step_seconds(), mfu=log.last_mfu, losses=losses)
    if jax.process_index() == 0:
        mfu = "n/a" if summary["mfu"] is None else f"{100 * summary['mfu']:.1f}%"
        print(f"done: step {summary['step']}, {summary['seconds']} s, loss {summary['loss_first']} -> "
              f"{summary['loss_last']} (mean of the last 10 steps), median step {summary['step_seconds']} s, "
              f"MFU {mfu}")
    return TrainResult(state=state, summary=summary, data_iter=data_iter, workdir=workdir)


class Logger:
    """TensorBoard scalars every `config.log.every_steps` steps (means over the interval) and sample videos.

    Scalars: train/loss, train/grad_norm, train/lr, perf/step_seconds, perf/data_wait_seconds,
    perf/tokens_per_second (latent pixels x frames), perf/mfu (analytic FLOPs, flops.py; absent where the
    device's peak is unknown). Samples (synthetic-data runs, every `config.log.sample_every_steps`): one
    held-out clip generated in each control mode with `config.log.sample_steps` Euler steps, as GIFs.
    """

    def __init__(self, config, trainer: Trainer, workdir: str, total_steps: int):
        from actalker_jax.summaries import Summaries

        defaults = dict(every_steps=10, sample_every_steps=0, sample_steps=10)
        self.options = {**defaults, **(config.get("log") or {})}
        self.config, self.trainer, self.workdir, self.total_steps = config, trainer, workdir, total_steps
        self.summaries = Summaries(os.path.join(workdir, "tensorboard"))
        self.lr = optim.learning_rate_schedule(config.optim, total_steps)
        self.grad_accum = max(int(config.optim.grad_accum), 1)
        self.window, self.step_times, self.flops, self.last_mfu = [], [], None, None
        self.last_time, self.sampler = time.time(), None

    def step(self, step: int, batch: dict, metrics: dict, data_wait: float) -> None:
        now = time.time()
        seconds, self.last_time = now - self.last_time, now
        if step > 1 or len(self.step_times):  # the first step of a process includes compilation
            self.step_times.append(seconds)
        self.window.append(dict(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
                                step_seconds=seconds, data_wait_seconds=data_wait))
        if step % self.options["every_steps"] and step != self.total_steps:
            return
        if self.flops is None:
            self.flops = self.trainer.flops_per_step(batch)
        means = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[0]}
        step_seconds = float(np.median(self.step_times)) if self.step_times else means["step_seconds"]
        latents = batch["latents"].shape
        self.last_mfu = flops.mfu(self.flops, step_seconds, self.trainer.mesh.devices.flat[0],
                                        self.trainer.mesh.devices.size)
        self.summaries.scalars(step, {
            "train/loss": means["loss"], "train/grad_norm": means["grad_norm"],
            "train/lr": float(self.lr((step - 1) // self.grad_accum)),
            "perf/step_seconds": means["step_seconds"], "perf/data_wait_seconds": means["data_wait_seconds"],
            "perf/tokens_per_second": float(np.prod(latents[:4])) / step_seconds,
            "perf/mfu": self.last_mfu, "perf/tflop_per_step": self.flops / 1e12})
        self.window = []

    def median_step_seconds(self) -> float | None:
        return round(float(np.median(self.step_times)), 3) if self.step_times else None

    def wants_sample(self, step: int) -> bool:
        every = self.options["sample_every_steps"]
        synthetic = self.config.get("media", {}).get("face_finder") == "synthetic"
        return bool(every) and synthetic and (step % every == 0 or step == self.total_steps)

    def sample(self, step: int, state: dict) -> None:
        """Generates the held-out clip in each control mode with the current (EMA) weights -> GIF summaries."""
        from jax.experimental import multihost_utils

        from actalker_jax import sample
        from actalker_jax.data import synthetic
        from actalker_jax.eval.control import held_out_clips, motion_features

        params = state.get("ema", state["params"])
        params = (multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1
                  else jax.device_get(params))
        if jax.process_index() != 0:
            return
        if self.sampler is None:
            self.sampler = sample.LoadedModel.from_params(self.config, params, step, self.workdir)
        else:
            self.sampler.set_params(params, step)
        clip = held_out_clips(self.config, 1)[0]
        for control in sample.CONTROLS:
            frames = sample.generate(self.sampler, image=clip["frames"][0], wav=clip["wav"],
                                     sample_rate=synthetic.SAMPLE_RATE, motion=motion_features(clip), control=control,
                                     seed=0, steps=int(self.options["sample_steps"]))
            self.summaries.video(step, f"sample/{control}", frames, fps=float(self.config.media.fps))
        self.summaries.flush()

    def close(self) -> None:
        self.summaries.close()


def initialize_distributed() -> None:
    """`jax.distributed.initialize` before any computation.

    With JAX_COORDINATOR_ADDRESS set (Kubernetes, launch/jobset.yaml), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID give the job's size and this process's rank; otherwise JAX detects SLURM and TPU VMs.
    """
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        jax.distributed.initialize()
        return
    try:
        num_processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as err:
        raise TrainError(f"JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be ints: "
                         f"{err}") from None
    jax.distributed.initialize(coordinator, num_processes, process_id)


def _state_shardings(abstract_state, param_shardings, replicated):
    """Shardings of the train state: parameters (and their optimizer / EMA copies) follow the parameter rules.

    An optimizer leaf whose tree path ends in a parameter key with the parameter's shape gets that
    parameter's sharding; everything else (counts, step, key) is replicated.
    """
    def pick(path, leaf):
        for entry in reversed(path):
            name = getattr(entry, "key", None)
            if isinstance(name, str) and name in param_shardings:
                return param_shardings[name]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def _synthetic_records(config, workdir: str) -> str:
    """Generates the demo's synthetic clips once (process 0; the others wait for it) -> the records directory."""
    from actalker_jax.data import synthetic

    out = os.path.join(workdir, "synthetic")
    records_dir = os.path.join(out, "records")
    if jax.process_index() == 0 and not os.path.isdir(records_dir):
        synthetic.main(["--out", out, "--num-clips", str(config.synthetic_clips), "--seed", str(config.seed),
                        "--frames", str(config.synthetic_frames), "--size", str(config.synthetic_size),
                        "--factor", str(Media(config).factor)])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic records written")
    return records_dir


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=jax.process_index() != 0)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose config errors end the program with one line naming the flag.

    A wrong type (`--config.total_steps=abc`) is an absl flags error; an unknown key (`--config.bogus=1`)
    surfaces from ml_collections as a KeyError / AttributeError carrying the key.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err)
    except (KeyError, AttributeError) as err:
        found = re.search(r"'(\w+)", str(err))
        key = found.group(1) if found else str(err)
        culprits = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        message = f"{culprits[0] if culprits else '--config'}: the config has no key {key!r}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if CONFIG_FLAG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    try:
        train(CONFIG_FLAG.value, _WORKDIR.value)
    except (TrainError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
