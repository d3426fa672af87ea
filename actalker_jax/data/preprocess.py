"""Raw talking-head videos -> ArrayRecord clip shards (records.py schema), resumable and fault tolerant.

    python -m actalker_jax.data.preprocess --videos DIR --out DIR --whisper PATH --svd PATH \
        [--workers N] [--fps 12.5|25] [--size 512] [--frames-per-clip 100] [--min-frames 25]

Input: every video file under --videos (recursive; .mp4 .mov .mkv .avi .webm .flv .m4v). Audio comes from
the video's own audio stream, or, for a video without one, from a sidecar `<stem>.wav` next to it.
--whisper: a local Whisper(-tiny) folder (transformers `save_pretrained` layout, with the feature
extractor). --svd: a diffusers SVD folder (with vae/) or a VAE folder, or a directory written by
`actalker_jax.convert` (holding vae_config.json).

Per video: audio -> Whisper windows (audio.py); frames at --fps (video_io.py) cut into consecutive clips
of --frames-per-clip frames (a shorter tail is kept if it has >= --min-frames); per clip: face track,
square crop at --size, masks and identity (face.py), motion, pose and buckets (motion.py), VAE posterior
means (unscaled) of every cropped frame. The clip length is capped by the audio: T = min(video frames,
floor(samples * fps / 16000)).

Output in --out: one shard `<relative path with / -> __>.array_record` per video holding its clips (written to
a temp name and renamed, so a kill never leaves a corrupt shard); `manifest.jsonl`, one line per finished
video, appended after its shard is in place, with `status` ok, failed (a bad input: undecodable file, no
face, too short; a ValueError or OSError) or error (anything else, e.g. out of memory); `failures.jsonl`, one
line per failed video or skipped clip with the reason. A re-run skips videos whose manifest line is ok and
whose shard exists and videos that failed (unless --retry-failed); it retries errors and unfinished videos.
--workers N runs N spawned processes, each loading the models once (on one GPU they share it:
XLA_PYTHON_CLIENT_PREALLOCATE=false is set in them).

A record's `source` is "<relative path>#clip<k>:<first>-<end>" (frame indices at --fps); every clip has its own
crop (the union face box of that clip). Memory per process: one clip of decoded source frames
(frames-per-clip x H x W x 3 bytes) plus the video's Whisper states (float16, K x A x 2 bytes per 20 ms).

Library use, with any component replaced by your own (Protocols in video_io.py, face.py, audio.py):

    pre = Preprocessor(Options(size=512), WhisperEncoder(whisper_dir), LatentEncoder(svd_dir), face_analyzer=...)
    clips, skipped = pre.process("talk.mp4", name="talk.mp4")
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

from actalker_jax.data import records
from actalker_jax.data.audio import FPS_CHOICES, AudioEncoder, frame_windows, num_frames
from actalker_jax.data.video_io import VIDEO_EXTENSIONS, PyAVDecoder, VideoDecoder

MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"


class LatentEncoder:
    """The default frame encoder: the Flax SVD VAE encoder, posterior means (unscaled), jit-compiled batches.

    path: a diffusers folder (pipeline with vae/, or the VAE folder itself) or an `actalker_jax.convert`
    output directory (vae_config.json + vae/). Frames (T, S, S, 3) uint8 -> (T, S/f, S/f, 4) float32.
    `.vae` is the loaded module (sampling decodes with the same weights).
    """

    def __init__(self, path: str, batch_size: int = 8):
        import jax
        from flax import nnx

        from actalker_jax import convert

        if not os.path.isdir(path):
            raise FileNotFoundError(f"--svd {path}: not a directory")
        try:
            if os.path.isfile(os.path.join(path, "vae_config.json")):
                vae = convert.load_converted(path, "vae")
            else:
                vae = convert.load_diffusers_vae(path)
        except Exception as err:  # noqa: BLE001  (orbax / safetensors raise many types)
            raise ValueError(f"--svd {path}: cannot load the VAE ({type(err).__name__}: {err})") from None
        self.vae, self.config, self.batch_size = vae, vae.config, batch_size
        self.factor = vae.config.downsample_factor
        graphdef, state = nnx.split(vae)
        self._state = state

        @jax.jit
        def encode(state, images):
            return nnx.merge(graphdef, state).encode(images)[0]

        self._encode = encode

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % self.factor or frames.shape[2] % self.factor:
            raise ValueError(f"frames must be (T, H, W, 3) with H, W multiples of {self.factor}, got {frames.shape}")
        out = []
        for start in range(0, len(frames), self.batch_size):
            batch = frames[start:start + self.batch_size].astype(np.float32) / 127.5 - 1.0
            count = len(batch)
            if count < self.batch_size:
                batch = np.concatenate([batch, np.zeros((self.batch_size - count,) + batch.shape[1:], np.float32)])
            out.append(np.asarray(self._encode(self._state, batch))[:count])
        return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class Options:
    """Preprocessing settings (the CLI flags)."""

    fps: float = 12.5
    size: int = 512
    frames_per_clip: int = 100
    min_frames: int = 25
    vae_batch: int = 8

    def __post_init__(self):
        if float(self.fps) not in FPS_CHOICES:
            raise ValueError(f"--fps must be one of {FPS_CHOICES}, got {self.fps}")
        if self.size < 64 or self.size % 64:
            raise ValueError(f"--size must be a positive multiple of 64, got {self.size}")
        if self.min_frames < 1 or self.frames_per_clip < self.min_frames:
            raise ValueError(f"need 1 <= --min-frames ({self.min_frames}) <= --frames-per-clip "
                             f"({self.frames_per_clip})")


class Preprocessor:
    """One video -> its clip records. Every component is replaceable (see the Protocols in the data modules)."""

    def __init__(self, options: Options, audio_encoder: AudioEncoder,
                 latent_encoder: Callable[[np.ndarray], np.ndarray], face_analyzer=None,
                 decoder: VideoDecoder | None = None):
        from actalker_jax.data.face import DlibFaceAnalyzer

        self.options = options
        self.audio_encoder = audio_encoder
        self.latent_encoder = latent_encoder
        self.face_analyzer = face_analyzer or DlibFaceAnalyzer()
        self.decoder = decoder or PyAVDecoder(options.fps)

    def clip_record(self, frames: np.ndarray, audio: np.ndarray, source: str) -> dict[str, Any]:
        """frames (T, H, W, 3) uint8, audio windows (T, 10, K, A) -> one record (records.SCHEMA)."""
        from actalker_jax.data import face, motion

        size = self.options.size
        track = self.face_analyzer.track(frames)
        square = face.crop_square(track.boxes, frames.shape[1:3])
        crops = face.crop_frames(frames, square, size)
        boxes = face.to_crop(track.boxes, square, size)
        landmarks = face.to_crop(track.landmarks, square, size)
        mask_audio, mask_motion, face_box = face.region_masks(boxes, landmarks, size)
        head, exp = motion.motion_buckets(landmarks)
        return {
            "latents": np.asarray(self.latent_encoder(crops), np.float16),
            "audio": np.asarray(audio, np.float16),
            "motion": motion.expression_descriptor(landmarks).astype(np.float16),
            "pose": motion.head_pose(landmarks, size).astype(np.float16),
            "id_embed": np.asarray(track.id_embed, np.float16),
            "mask_audio": mask_audio,
            "mask_motion": mask_motion,
            "face_box": face_box,
            "motion_buckets": np.array([head, exp], np.int32),
            "fps": np.float32(self.options.fps),
            "source": source,
            "version": np.int32(records.VERSION),
        }

    def process(self, path: str, name: str) -> tuple[list[dict[str, Any]], list[str]]:
        """Video -> (records, reasons of skipped clips). Raises when the video itself cannot be used."""
        opts = self.options
        wave = self.decoder.audio(path)
        total = num_frames(len(wave), opts.fps)
        if total < opts.min_frames:
            raise ValueError(f"audio of {len(wave) / 16000:.2f} s gives {total} frames at {opts.fps} fps "
                             f"(need --min-frames {opts.min_frames})")
        states = np.asarray(self.audio_encoder(wave), np.float16)  # the records store float16 anyway
        clips, skipped, buffer, start, seen = [], [], [], 0, 0

        def flush():
            index = len(clips) + len(skipped)
            source = f"{name}#clip{index}:{start}-{start + len(buffer)}"
            try:
                windows = frame_windows(states, len(wave), opts.fps, start, len(buffer))
                clips.append(self.clip_record(np.stack(buffer), windows, source))
            except ValueError as err:
                skipped.append(f"{source}: {err}")

        for frame in self.decoder.frames(path):
            if seen >= total:
                break
            buffer.append(frame)
            seen += 1
            if len(buffer) == opts.frames_per_clip:
                flush()
                start, buffer = seen, []
        if len(buffer) >= opts.min_frames:
            flush()
        if seen < opts.min_frames:
            raise ValueError(f"video has {seen} frames at {opts.fps} fps (need --min-frames {opts.min_frames})")
        if not clips:
            raise ValueError("no usable clip: " + "; ".join(skipped))
        return clips, skipped


def find_videos(root: str) -> list[str]:
    """Video files under `root`, as sorted paths relative to it."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--videos {root}: not a directory")
    found = []
    for folder, _, files in os.walk(root):
        for file in files:
            if file.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, file), root))
    return sorted(found)


def shard_name(relpath: str) -> str:
    """Deterministic shard file name of a video: its relative path with separators replaced."""
    return relpath.replace(os.sep, "__") + records.SHARD_SUFFIX


def read_manifest(out_dir: str) -> dict[str, dict]:
    """video relative path -> its last manifest entry (a torn last line from a kill is ignored)."""
    entries = {}
    path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("video"), str) and "status" in entry:
                    entries[entry["video"]] = entry
    return entries


def _end_line(path: str) -> None:
    """Terminates a torn last line (a kill during an append) so the next entry starts on its own line."""
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _append(path: str, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(options: Options, whisper: str, svd: str, videos: str, out: str) -> None:
    """Loads the models once per process."""
    from actalker_jax.data.audio import WhisperEncoder

    _WORKER.update(pre=Preprocessor(options, WhisperEncoder(whisper), LatentEncoder(svd, options.vae_batch)),
                   videos=videos, out=out)


def _init_spawned(*args) -> None:
    """Initialiser of a pool process: N processes share one accelerator without preallocating it.

    A failure is kept and reported for every video (an initialiser that raises makes the pool respawn forever).
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        _init_worker(*args)
    except Exception as err:  # noqa: BLE001
        _WORKER["init_error"] = f"loading the models failed: {type(err).__name__}: {err}"


def check_model_paths(whisper: str, svd: str) -> None:
    """Fails early, naming the flag, when a model folder lacks its config files."""
    if not os.path.isfile(os.path.join(whisper, "config.json")) or \
            not os.path.isfile(os.path.join(whisper, "preprocessor_config.json")):
        raise FileNotFoundError(f"--whisper {whisper}: expected a Whisper folder with config.json and "
                                "preprocessor_config.json")
    if not any(os.path.isfile(os.path.join(svd, *name)) for name in
               (("vae_config.json",), ("vae", "config.json"), ("config.json",))):
        raise FileNotFoundError(f"--svd {svd}: expected a diffusers SVD folder (vae/config.json), a VAE folder "
                                "(config.json) or a converted dir (vae_config.json)")


def _run_one(relpath: str) -> dict:
    """Processes one video and writes its shard; returns the manifest entry (never raises on a bad video)."""
    start = time.time()
    shard = shard_name(relpath)
    if "init_error" in _WORKER:
        return {"video": relpath, "status": "error", "reason": _WORKER["init_error"], "seconds": 0.0}
    try:
        clips, skipped = _WORKER["pre"].process(os.path.join(_WORKER["videos"], relpath), relpath)
        records.write_shard(os.path.join(_WORKER["out"], shard), clips)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001  (any failure skips the video and is reported)
        reason = f"{type(err).__name__}: {err}"
        bad_input = isinstance(err, (ValueError, OSError))
        if not bad_input:
            reason += " | " + traceback.format_exc(limit=3).replace("\n", " ")
        return {"video": relpath, "status": "failed" if bad_input else "error", "reason": reason,
                "seconds": round(time.time() - start, 2)}
    return {"video": relpath, "status": "ok", "shard": shard, "clips": len(clips),
            "frames": int(sum(len(c["latents"]) for c in clips)), "skipped_clips": skipped,
            "seconds": round(time.time() - start, 2)}


def run(videos: str, out: str, whisper: str, svd: str, options: Options, workers: int = 1,
        retry_failed: bool = False, progress: bool = True) -> dict:
    """Preprocesses every pending video under `videos` into `out`. Returns counts {done, failed, skipped, clips}."""
    from tqdm import tqdm

    check_model_paths(whisper, svd)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.endswith(records.SHARD_SUFFIX + ".tmp"):
            os.remove(os.path.join(out, name))
    for name in (MANIFEST, FAILURES):
        _end_line(os.path.join(out, name))
    manifest = read_manifest(out)
    todo, skipped = [], 0
    for relpath in find_videos(videos):
        entry = manifest.get(relpath)
        if entry and entry["status"] == "ok" and os.path.isfile(os.path.join(out, entry["shard"])):
            skipped += 1
        elif entry and entry["status"] == "failed" and not retry_failed:
            skipped += 1
        else:
            todo.append(relpath)
    stats = {"done": 0, "failed": 0, "skipped": skipped, "clips": 0}
    bar = tqdm(total=len(todo), unit="video", disable=not progress, dynamic_ncols=True)
    start = time.time()

    def record(entry: dict) -> None:
        _append(os.path.join(out, MANIFEST), entry)
        if entry["status"] != "ok":
            stats["failed"] += 1
            _append(os.path.join(out, FAILURES), {"video": entry["video"], "status": entry["status"],
                                                  "reason": entry["reason"]})
        else:
            stats["done"] += 1
            stats["clips"] += entry["clips"]
            for reason in entry["skipped_clips"]:
                _append(os.path.join(out, FAILURES), {"video": entry["video"], "clip": reason})
        bar.update(1)
        bar.set_postfix(clips=stats["clips"], clips_per_s=f"{stats['clips'] / max(time.time() - start, 1e-9):.2f}",
                        failed=stats["failed"])

    try:
        if workers <= 1:
            if todo:
                _init_worker(options, whisper, svd, videos, out)
            for relpath in todo:
                record(_run_one(relpath))
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            init_args = (options, whisper, svd, videos, out)
            with context.Pool(workers, initializer=_init_spawned, initargs=init_args) as pool:
                for entry in pool.imap_unordered(_run_one, todo):
                    record(entry)
    finally:
        bar.close()
    return stats


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m actalker_jax.data.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--videos", required=True, help="folder of input videos (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder: shards, manifest.jsonl, failures.jsonl")
    parser.add_argument("--whisper", required=True, help="local Whisper(-tiny) folder")
    parser.add_argument("--svd", required=True, help="diffusers SVD (or VAE) folder, or a converted Orbax dir")
    parser.add_argument("--workers", type=int, default=1, help="processes (each loads the models once)")
    parser.add_argument("--fps", type=float, default=12.5, choices=FPS_CHOICES, help="training frame rate")
    parser.add_argument("--size", type=int, default=512, help="square crop side, a multiple of 64")
    parser.add_argument("--frames-per-clip", type=int, default=100, help="frames per record")
    parser.add_argument("--min-frames", type=int, default=25, help="shortest clip kept")
    parser.add_argument("--vae-batch", type=int, default=8, help="frames per VAE encoder call")
    parser.add_argument("--retry-failed", action="store_true", help="retry videos that failed in an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        options = Options(fps=args.fps, size=args.size, frames_per_clip=args.frames_per_clip,
                          min_frames=args.min_frames, vae_batch=args.vae_batch)
        stats = run(args.videos, args.out, args.whisper, args.svd, options, workers=args.workers,
                    retry_failed=args.retry_failed, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
