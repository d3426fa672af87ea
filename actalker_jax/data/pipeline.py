"""The grain input pipeline: clip records -> shuffled, per-process, windowed, cropped numpy batches.

    ds = pipeline.make_dataset(config, split="train", process_index=jax.process_index(),
                               process_count=jax.process_count())
    it = iter(ds)                      # a grain DatasetIterator: get_state()/set_state(), orbax-checkpointable
    batch = next(it)                   # dict of numpy arrays, leading axis = config.data.batch_size (per process)

Order of operations (`make_dataset`):

    source (ArrayRecord shards or `tfds.data_source`, one split) -> seeded shuffle (reshuffled every epoch)
    -> repeat -> per-example sampling (frame window, stride, reference frame, crop bucket)
    -> batch (drop remainder) -> per-process slice of whole batches [process_index::process_count]
    -> to_iter_dataset(ReadOptions) -> mp_prefetch (config.data.workers > 0)

Global step j is the stream block [j * B * P, (j + 1) * B * P) (B = per-process batch, P = process count), and
process p's batch is its p-th run of B consecutive elements, so the global batch that
`jax.make_array_from_process_local_data` assembles (process 0's rows first) is the same for any P: a run on
P processes with batch B sees exactly the batches of a one-process run with batch B * P.

Determinism: the element at position k of the repeated, shuffled stream (epoch = k // n, clip index i) is
sampled with `np.random.default_rng([seed, 0, epoch, i])`; the crop bucket of global step j = k // (B * P)
(B = per-process batch, P = process count) comes from `np.random.default_rng([seed, 1, j])`, so every process
uses the same bucket at the same step (needed by `jax.make_array_from_process_local_data`). Nothing depends on
the number of workers or threads.

Train / eval split: a clip (shard file name `s`, record index `r` inside that shard) is held out for "eval"
iff `crc32(f"{s}:{r}") / 2**32 < config.data.eval_fraction`. The rule depends only on the shard's base name
and the record's position in it, so adding shards never moves a clip between splits. The TFDS builder
(`tfds_builder.py`) applies the same rule when it writes its "train" and "eval" splits.

Batch (B = per-process batch, F = n_frames, bucket (H, W) image pixels, latent (h, w) = (H, W) / factor):

| key            | dtype   | shape              | meaning                                                    |
|----------------|---------|--------------------|------------------------------------------------------------|
| latents        | float32 | (B, F, h, w, c)    | latents of the window frames, cropped                      |
| ref_latent     | float32 | (B, h, w, c)       | latent of the reference frame, same crop                   |
| audio          | float32 | (B, F, S, K, A)    | audio features of the window frames                        |
| motion         | float32 | (B, F, De)         | expression descriptor of the window frames                 |
| pose           | float32 | (B, F, 6)          | head pose of the window frames                             |
| id_embed       | float32 | (B, Di)            | identity embedding                                         |
| mask_audio     | float32 | (B, H, W)          | mouth mask, cropped with the latents (0/1)                 |
| mask_motion    | float32 | (B, H, W)          | face-minus-mouth mask, cropped with the latents (0/1)      |
| face_box       | float32 | (B, 4)             | x0, y0, x1, y1 in pixels of the crop (clipped to it)       |
| added_time_ids | float32 | (B, 3)             | [fps / stride, head motion bucket, expression bucket]      |
| clip_index     | int32   | (B,)               | index of the clip in its split (for debugging and tests)   |
"""

import os
import zlib
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from actalker_jax.data import records

_EPOCH_TAG, _BUCKET_TAG = 0, 1


def default_data_config() -> ml_collections.ConfigDict:
    """Every `config.data` field of the input pipeline, with paper-recipe defaults (ACTALKER_SPEC §5).

    | field              | default          | meaning                                                          |
    |--------------------|------------------|------------------------------------------------------------------|
    | source             | "array_record"   | "array_record" (read `records`) or "tfds" (read `tfds_name`)      |
    | records            | ""               | shard dir, one shard path, or a list of shard paths              |
    | tfds_name          | "actalker_clips" | TFDS dataset name (built by `actalker_jax.data.tfds_builder`)     |
    | tfds_data_dir      | ""               | TFDS data_dir ("" = TFDS default)                                 |
    | eval_fraction      | 0.05             | fraction of clips held out for split "eval" (hash rule, module doc) |
    | n_frames           | 25               | frames per training window F                                     |
    | max_stride         | 2                | largest frame stride s; s = max{s <= max_stride : s * F <= T}     |
    | buckets            | ()               | crop sizes (H, W) in image pixels; () = the full stored frame     |
    | batch_size         | 1                | examples per process per step (drop remainder)                   |
    | shuffle            | True             | shuffle the train split (reshuffled every epoch)                 |
    | num_epochs         | None             | train epochs (None = forever); the eval split reads one epoch    |
    | workers            | 0                | grain mp_prefetch worker processes (0 = in-process threads only) |
    | worker_buffer_size | 2                | batches buffered per worker process                              |
    | read_threads       | 4                | ReadOptions.num_threads (threads per process reading + sampling) |
    | prefetch_buffer    | 8                | ReadOptions.prefetch_buffer_size (elements)                      |

    The seed is the top-level `config.seed`.
    """
    return ml_collections.ConfigDict(dict(
        source="array_record",
        records="",
        tfds_name="actalker_clips",
        tfds_data_dir="",
        eval_fraction=0.05,
        n_frames=25,
        max_stride=2,
        buckets=(),
        batch_size=1,
        shuffle=True,
        num_epochs=ml_collections.config_dict.placeholder(int),
        workers=0,
        worker_buffer_size=2,
        read_threads=4,
        prefetch_buffer=8,
    ))


def is_eval_clip(shard_name: str, index: int, eval_fraction: float) -> bool:
    """The held-out rule: crc32 of "<shard base name>:<record index>" below eval_fraction of 2**32."""
    key = f"{os.path.basename(shard_name)}:{index}".encode()
    return zlib.crc32(key) < eval_fraction * 2 ** 32


def _check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def _shard_list(spec: Any) -> list[str]:
    """config.data.records (dir, one path, or a list) -> shard paths."""
    if isinstance(spec, str):
        if not spec:
            raise ValueError("config.data.records is empty: give a shard directory, a shard path or a list of paths")
        return records.shard_paths(spec)
    paths = []
    for item in spec:
        paths.extend(records.shard_paths(str(item)))
    if not paths:
        raise ValueError("config.data.records is an empty list of shards")
    return paths


def count_records(path: str) -> int:
    """Records in one shard; a truncated or unreadable shard raises RecordError naming it."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
    except Exception as err:  # noqa: BLE001
        raise records.RecordError(f"{path}: not a readable ArrayRecord shard ({type(err).__name__}: {err})") from None
    try:
        if not reader.ok():
            raise records.RecordError(f"{path}: truncated or corrupt ArrayRecord shard")
        return reader.num_records()
    finally:
        try:
            reader.close()
        except Exception:  # noqa: BLE001  (a corrupt shard may fail again on close)
            pass


class ArrayRecordClips:
    """Random-access clip source over ArrayRecord shards for one split: `source[i] -> (i, bytes, where)`.

    Reads through grain's `ArrayRecordDataSource` (opened lazily, so the object pickles into worker
    processes); `where` names the shard and the record index inside it for error messages.
    """

    def __init__(self, paths: Sequence[str], split: str, eval_fraction: float):
        _check_split(split)
        self.paths = list(paths)
        counts = [count_records(p) for p in self.paths]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        keep = []
        for shard, (path, count) in enumerate(zip(self.paths, counts)):
            for index in range(count):
                if is_eval_clip(path, index, eval_fraction) == (split == "eval"):
                    keep.append(self._offsets[shard] + index)
        self._global = np.asarray(keep, np.int64)
        if not len(self._global):
            shards = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} shards {self.paths[0]} ..."
            raise records.RecordError(f"{shards}: split {split!r} is empty ({int(self._offsets[-1])} records, "
                                      f"eval_fraction={eval_fraction})")
        self._source = None

    def __len__(self) -> int:
        return len(self._global)

    def where(self, i: int) -> str:
        """'<shard path> record <index inside the shard>' of clip i of this split."""
        g = int(self._global[i])
        shard = int(np.searchsorted(self._offsets, g, side="right")) - 1
        return f"{self.paths[shard]} record {g - int(self._offsets[shard])}"

    def __getitem__(self, i: int) -> tuple[int, bytes, str]:
        i = int(i)
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        try:
            data = self._source[int(self._global[i])]
        except Exception as err:  # noqa: BLE001
            raise records.RecordError(f"{self.where(i)}: unreadable ({type(err).__name__}: {err})") from None
        return i, data, self.where(i)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state


class TfdsClips:
    """Random-access clip source over `tfds.data_source(name, split)`: `source[i] -> (i, bytes, where)`."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        _check_split(split)
        tfds = import_tfds()
        from actalker_jax.data import tfds_builder  # noqa: F401  (registers the builder)

        self.name, self.split = name, split
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"tfds dataset {name!r} split {split!r} (data_dir={data_dir!r}) cannot be read: "
                             f"{type(err).__name__}: {err}") from None
        if not len(self._source):
            raise records.RecordError(f"tfds {name}/{split}: split is empty")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> tuple[int, bytes, str]:
        i = int(i)
        where = f"tfds {self.name}/{self.split} example {i}"
        try:
            example = self._source[i]
        except Exception as err:  # noqa: BLE001
            raise records.RecordError(f"{where}: unreadable ({type(err).__name__}: {err})") from None
        shard = example["shard"]
        shard = shard.decode() if isinstance(shard, bytes) else str(shard)
        return i, example["record"], f"{where} ({shard} record {int(example['index'])})"


def import_tfds():
    """tensorflow_datasets, or an ImportError that says how to get it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError("config.data.source='tfds' needs tensorflow-datasets (it reads array_record datasets "
                          "without TensorFlow): pip install tensorflow-datasets, or pip install "
                          "'actalker_jax[data]'") from err
    return tfds


def _buckets(data) -> tuple[tuple[int, int], ...]:
    """config.data.buckets -> ((H, W), ...), validated."""
    out = []
    for bucket in data.buckets or ():
        if len(bucket) != 2 or any(int(v) != v or v <= 0 for v in bucket):
            raise ValueError(f"config.data.buckets: each bucket is (H, W) positive ints, got {tuple(bucket)!r}")
        out.append((int(bucket[0]), int(bucket[1])))
    return tuple(out)


class SampleClip:
    """grain map_with_index transform: (k, (i, bytes, where)) -> one example dict (see the module table)."""

    def __init__(self, *, seed: int, num_clips: int, n_frames: int, max_stride: int,
                 buckets: tuple[tuple[int, int], ...], step_size: int):
        if n_frames < 1:
            raise ValueError(f"config.data.n_frames must be >= 1, got {n_frames}")
        if max_stride < 1:
            raise ValueError(f"config.data.max_stride must be >= 1, got {max_stride}")
        self.seed, self.num_clips, self.n_frames = int(seed), num_clips, n_frames
        self.max_stride, self.buckets, self.step_size = max_stride, buckets, step_size

    def __call__(self, k: int, element: tuple[int, bytes, str]) -> dict[str, np.ndarray]:
        i, data, where = element
        clip = records.deserialize(data, where)
        epoch = k // self.num_clips
        rng = np.random.default_rng([self.seed, _EPOCH_TAG, epoch, i])
        n = self.n_frames
        frames = clip["latents"].shape[0]
        if frames < n:
            raise records.RecordError(f"{where}: key 'latents' has {frames} frames, fewer than "
                                      f"config.data.n_frames={n}")
        stride = max(s for s in range(1, self.max_stride + 1) if s * n <= frames)
        first = int(rng.integers(0, frames - (n - 1) * stride))
        last = first + (n - 1) * stride
        window = first + stride * np.arange(n)
        ref = int(np.clip(rng.integers(first - n, last + n + 1), 0, frames - 1))

        height, width = clip["mask_audio"].shape
        h, w = clip["latents"].shape[1:3]
        factor = height // h
        if self.buckets:
            bucket_rng = np.random.default_rng([self.seed, _BUCKET_TAG, k // self.step_size])
            crop_h, crop_w = self.buckets[int(bucket_rng.integers(len(self.buckets)))]
        else:
            crop_h, crop_w = height, width
        if crop_h % factor or crop_w % factor or crop_h > height or crop_w > width:
            raise records.RecordError(
                f"{where}: crop bucket {(crop_h, crop_w)} does not fit the stored frame {(height, width)} on its "
                f"latent grid (factor {factor}); config.data.buckets must be multiples of {factor} no larger than "
                f"every clip's frame")
        y0 = int(rng.integers(0, h - crop_h // factor + 1))
        x0 = int(rng.integers(0, w - crop_w // factor + 1))
        lat = (slice(y0, y0 + crop_h // factor), slice(x0, x0 + crop_w // factor))
        img = (slice(y0 * factor, y0 * factor + crop_h), slice(x0 * factor, x0 * factor + crop_w))
        box = clip["face_box"].astype(np.float32) - np.float32([x0, y0, x0, y0]) * factor
        box = np.clip(box, 0, np.float32([crop_w, crop_h, crop_w, crop_h]))
        head, expression = clip["motion_buckets"]
        return {
            "latents": clip["latents"][window][:, lat[0], lat[1]].astype(np.float32),
            "ref_latent": clip["latents"][ref][lat[0], lat[1]].astype(np.float32),
            "audio": clip["audio"][window].astype(np.float32),
            "motion": clip["motion"][window].astype(np.float32),
            "pose": clip["pose"][window].astype(np.float32),
            "id_embed": clip["id_embed"].astype(np.float32),
            "mask_audio": clip["mask_audio"][img].astype(np.float32),
            "mask_motion": clip["mask_motion"][img].astype(np.float32),
            "face_box": box.astype(np.float32),
            "added_time_ids": np.float32([float(clip["fps"]) / stride, head, expression]),
            "clip_index": np.int32(i),
        }


def stack_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples on a new batch axis; clips whose arrays differ in shape get an error naming them."""
    out = {}
    for key in examples[0]:
        shapes = [np.shape(e[key]) for e in examples]
        if len(set(shapes)) > 1:
            clips = [int(e["clip_index"]) for e in examples]
            raise records.RecordError(
                f"batch of clips {clips}: key {key!r} has different shapes {shapes}; give config.data.buckets "
                f"(crop sizes) or store clips of equal size and feature dims")
        out[key] = np.stack([e[key] for e in examples])
    return out


def _allow_default_absl_flags() -> None:
    """Lets grain's mp_prefetch read its absl flags in a program that never parsed absl flags (argparse, pytest).

    grain 0.2.x reads `--grain_enable_multiprocess_worker_profiling` when starting workers once the JAX profiler
    is importable and raises UnparsedFlagAccessError if absl flags were not parsed; marking them parsed keeps
    every flag at its default. A program that parsed its flags (absl.app) is left alone.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_source(config, split: str):
    """The split's random-access clip source chosen by config.data.source."""
    data = config.data
    if data.source == "array_record":
        return ArrayRecordClips(_shard_list(data.records), split, float(data.eval_fraction))
    if data.source == "tfds":
        return TfdsClips(data.tfds_name, split, data.tfds_data_dir)
    raise ValueError(f"config.data.source must be 'array_record' or 'tfds', got {data.source!r}")


def make_dataset(config, *, split: str, process_index: int, process_count: int) -> grain.IterDataset:
    """The grain IterDataset of numpy batches for this process (module doc: order, determinism, batch keys).

    config: has `seed` (int) and `data` (fields of `default_data_config()`). split: "train" or "eval".
    The repeated, shuffled stream is cut into batches of config.data.batch_size consecutive examples (drop
    remainder) and each process gets batches [process_index::process_count] (all the same number of them), so
    the global batch of a step does not depend on the process count. The eval split is read once, unshuffled.
    """
    _check_split(split)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
    data = config.data
    if data.batch_size < 1:
        raise ValueError(f"config.data.batch_size must be >= 1, got {data.batch_size}")
    if data.workers < 0:
        raise ValueError(f"config.data.workers must be >= 0, got {data.workers}")
    source = make_source(config, split)
    train = split == "train"
    ds = grain.MapDataset.source(source)
    if train and data.shuffle:
        ds = ds.seed(int(config.seed)).shuffle()
    ds = ds.repeat(data.num_epochs if train else 1)
    ds = ds.map_with_index(SampleClip(
        seed=int(config.seed), num_clips=len(source), n_frames=int(data.n_frames), max_stride=int(data.max_stride),
        buckets=_buckets(data), step_size=int(data.batch_size) * process_count))
    ds = ds.batch(int(data.batch_size), drop_remainder=True, batch_fn=stack_examples)
    ds = ds[:len(ds) - len(ds) % process_count]  # every process gets the same number of batches
    ds = ds[process_index::process_count]
    out = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data.read_threads),
                                               prefetch_buffer_size=int(data.prefetch_buffer)))
    if data.workers > 0:
        _allow_default_absl_flags()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data.workers),
                                                           per_worker_buffer_size=int(data.worker_buffer_size)))
    return out
