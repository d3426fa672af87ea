"""Clip records: one ArrayRecord record = one preprocessed clip (a flat dict of numpy arrays).

    records.write_shard(path, clips)        # clips: iterable of dicts, validated, written atomically
    for clip in records.iter_records(path_or_dir): ...

Schema, version 1 (T frames, image H x W, latent h x w = H/f x W/f):

| key            | dtype   | shape           | meaning                                                     |
|----------------|---------|-----------------|-------------------------------------------------------------|
| latents        | float16 | (T, h, w, c)    | autoencoder latents of every frame (SVD VAE: posterior means, unscaled, c = 4) |
| audio          | float16 | (T, S, K, A)    | audio feature window per frame (Whisper-tiny: S=10 tokens, K=5 layers, A=384) |
| motion         | float16 | (T, Dm)         | per-frame expression descriptor (landmarks / ground truth), without head pose |
| pose           | float16 | (T, 6)          | per-frame head pose: yaw, pitch, roll (degrees), translation x, y, z |
| id_embed       | float16 | (Di,)           | identity embedding of the reference face                    |
| mask_audio     | uint8   | (H, W)          | mouth region (union over the clip), 0/1, image resolution   |
| mask_motion    | uint8   | (H, W)          | face region minus mouth region, 0/1                          |
| face_box       | float32 | (4,)            | union face box x0, y0, x1, y1 in pixels of the stored crop  |
| motion_buckets | int32   | (2,)            | head and expression motion buckets (spec §5), in [0, 128]   |
| fps            | float32 | ()              | frame rate of the stored frames                             |
| source         | str     | ()              | where the clip came from (file, clip index)                 |
| version        | int32   | ()              | schema version (1)                                          |

Optional keys (kept when present, validated by dtype/rank): `gt_mouth`, `gt_eye`, `gt_brow`, `gt_yaw`
(float32 (T,): synthetic ground truth). Any other key is rejected. Serialisation: one `np.savez` blob per
record (portable, no pickle). A shard is written to `<path>.tmp` and renamed when complete.
"""

import io
import os
from typing import Any, Iterable, Iterator

import numpy as np

VERSION = 1
SHARD_SUFFIX = ".array_record"

# key -> (dtype, rank); shapes are cross-checked in `validate_clip`.
SCHEMA: dict[str, tuple[str, int]] = {
    "latents": ("float16", 4),
    "audio": ("float16", 4),
    "motion": ("float16", 2),
    "pose": ("float16", 2),
    "id_embed": ("float16", 1),
    "mask_audio": ("uint8", 2),
    "mask_motion": ("uint8", 2),
    "face_box": ("float32", 1),
    "motion_buckets": ("int32", 1),
    "fps": ("float32", 0),
    "source": ("str", 0),
    "version": ("int32", 0),
}
OPTIONAL: dict[str, tuple[str, int]] = {name: ("float32", 1) for name in ("gt_mouth", "gt_eye", "gt_brow", "gt_yaw")}


class RecordError(ValueError):
    """A shard or record that does not follow the schema; the message names the file, record and key."""


def _fail(where: str, message: str):
    raise RecordError(f"{where}: {message}")


def validate_clip(clip: dict[str, Any], where: str = "clip") -> dict[str, np.ndarray]:
    """Checks keys, dtypes, ranks and cross-key shapes; returns the clip as numpy arrays."""
    missing = sorted(set(SCHEMA) - set(clip))
    if missing:
        _fail(where, f"missing key(s) {missing}")
    unknown = sorted(set(clip) - set(SCHEMA) - set(OPTIONAL))
    if unknown:
        _fail(where, f"unknown key(s) {unknown}")
    out = {}
    for key, value in clip.items():
        dtype, rank = SCHEMA.get(key) or OPTIONAL[key]
        array = np.asarray(value)
        if dtype == "str":
            if array.ndim != 0 or array.dtype.kind not in "US":
                _fail(where, f"key {key!r} must be a string, got {array.dtype} of shape {array.shape}")
            out[key] = np.asarray(str(array))
            continue
        if array.dtype != np.dtype(dtype):
            _fail(where, f"key {key!r} must be {dtype}, got {array.dtype}")
        if array.ndim != rank:
            _fail(where, f"key {key!r} must have rank {rank}, got shape {array.shape}")
        out[key] = array
    if int(out["version"]) != VERSION:
        _fail(where, f"key 'version': unknown version {int(out['version'])} (this code reads version {VERSION})")
    frames = out["latents"].shape[0]
    if frames < 1:
        _fail(where, "key 'latents' holds no frames")
    for key in ("audio", "motion", "pose") + tuple(k for k in OPTIONAL if k in out):
        if out[key].shape[0] != frames:
            _fail(where, f"key {key!r} has {out[key].shape[0]} frames, 'latents' has {frames}")
    if out["pose"].shape[1] != 6:
        _fail(where, f"key 'pose' must be (T, 6), got {out['pose'].shape}")
    if out["mask_audio"].shape != out["mask_motion"].shape:
        _fail(where, f"key 'mask_motion' shape {out['mask_motion'].shape} != 'mask_audio' {out['mask_audio'].shape}")
    height, width = out["mask_audio"].shape
    h, w = out["latents"].shape[1:3]
    if height % h or width % w or height // h != width // w:
        _fail(where, f"key 'mask_audio' {out['mask_audio'].shape} is not an integer multiple of the latent grid "
                     f"{(h, w)}")
    if out["face_box"].shape != (4,):
        _fail(where, f"key 'face_box' must be (4,), got {out['face_box'].shape}")
    if out["motion_buckets"].shape != (2,):
        _fail(where, f"key 'motion_buckets' must be (2,), got {out['motion_buckets'].shape}")
    return out


def serialize(clip: dict[str, Any], where: str = "clip") -> bytes:
    """Validated clip -> bytes (an uncompressed npz)."""
    buffer = io.BytesIO()
    np.savez(buffer, **validate_clip(clip, where))
    return buffer.getvalue()


def deserialize(data: bytes, where: str = "record") -> dict[str, np.ndarray]:
    """Bytes -> validated clip dict."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            clip = {key: npz[key] for key in npz.files}
    except Exception as err:  # noqa: BLE001  (any decoding failure is a corrupt record)
        _fail(where, f"not a readable record ({type(err).__name__}: {err})")
    return validate_clip(clip, where)


def write_shard(path: str, clips: Iterable[dict[str, Any]]) -> int:
    """Writes clips to one ArrayRecord shard atomically (temp file, then rename). Returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    try:
        for i, clip in enumerate(clips):
            writer.write(serialize(clip, f"{path} record {i}"))
            count += 1
    except BaseException:
        writer.close()
        os.remove(tmp)
        raise
    writer.close()
    os.replace(tmp, path)
    return count


def shard_paths(path_or_dir: str) -> list[str]:
    """One shard path, or every `*.array_record` shard of a directory (sorted)."""
    if os.path.isdir(path_or_dir):
        paths = sorted(os.path.join(path_or_dir, n) for n in os.listdir(path_or_dir) if n.endswith(SHARD_SUFFIX))
        if not paths:
            raise RecordError(f"{path_or_dir}: no {SHARD_SUFFIX} shards in this directory")
        return paths
    if not os.path.isfile(path_or_dir):
        raise RecordError(f"{path_or_dir}: no such shard or directory")
    return [path_or_dir]


def _close(reader) -> None:
    """Closes a reader; a corrupt shard may fail again on close, which must not hide the first error."""
    try:
        reader.close()
    except Exception:  # noqa: BLE001
        pass


def _open(path: str):
    """An ArrayRecordReader that passed its integrity check (a truncated shard reports no records)."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
    except Exception as err:  # noqa: BLE001
        raise RecordError(f"{path}: not a readable ArrayRecord shard ({type(err).__name__}: {err})") from None
    if not reader.ok():
        _close(reader)
        raise RecordError(f"{path}: truncated or corrupt ArrayRecord shard")
    return reader


def iter_records(path_or_dir: str) -> Iterator[dict[str, np.ndarray]]:
    """Yields every clip of a shard or of all shards in a directory, validated, in order."""
    for path in shard_paths(path_or_dir):
        reader = _open(path)
        try:
            for index in range(reader.num_records()):
                try:
                    data = reader.read([index])[0]
                except Exception as err:  # noqa: BLE001
                    raise RecordError(f"{path} record {index}: unreadable ({type(err).__name__}: {err})") from None
                yield deserialize(data, f"{path} record {index}")
        finally:
            _close(reader)
