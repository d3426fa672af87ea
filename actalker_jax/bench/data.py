"""Input-pipeline throughput against what the paper recipe consumes per host.

    python -m actalker_jax.bench.data --records DIR [--workers N] [--batch-size B] [--frames F] [--step-seconds S]
    python -m actalker_jax.bench.data --write-random DIR --num-clips 64 --frames-per-clip 20 --latent 4 --image 32
    python -m actalker_jax.bench.data --write-random DIR --num-clips 32 --frames-per-clip 60 --latent 72 --image 576 \
        --audio-dim 384                                                  # paper-sized clips (576 px, 25 fps, 2.4 s)

Reads the train split of DIR through `pipeline.make_dataset` (process 0 of 1) and times --steps batches after
--warmup batches. Prints clips/s, the MB/s of the batches it yields (float32 arrays) and of the stored records it
reads (mean record size from the shard files), and the ratio of clips/s to the paper recipe's need per host:
batch 1 per GPU x 8 GPUs per host (ACTALKER_SPEC §5) every --step-seconds (an assumed training step time, default
1.0 s; not measured here). A ratio above 1 means this host's input pipeline keeps up with that step time.
`--write-random` writes random clips following the record schema (for benchmarks and tests).
"""

import argparse
import os
import time

import ml_collections
import numpy as np

from actalker_jax.data import pipeline, records

PAPER_CLIPS_PER_GPU = 1
PAPER_GPUS_PER_HOST = 8


def random_clip(rng: np.random.Generator, frames: int, *, latent: int = 4, image: int = 32, channels: int = 4,
                audio: tuple[int, int, int] = (10, 5, 8), motion_dim: int = 8, id_dim: int = 16,
                fps: float = 25.0, source: str = "random") -> dict[str, np.ndarray]:
    """A random clip following the record schema: latents (frames, latent, latent, channels), masks (image, image)."""
    f16 = np.float16
    mouth = np.zeros((image, image), np.uint8)
    mouth[image // 2:3 * image // 4, image // 4:3 * image // 4] = 1
    face = np.zeros_like(mouth)
    face[image // 8:7 * image // 8, image // 8:7 * image // 8] = 1
    return {
        "latents": rng.standard_normal((frames, latent, latent, channels)).astype(f16),
        "audio": rng.standard_normal((frames,) + tuple(audio)).astype(f16),
        "motion": rng.standard_normal((frames, motion_dim)).astype(f16),
        "pose": rng.standard_normal((frames, 6)).astype(f16),
        "id_embed": rng.standard_normal((id_dim,)).astype(f16),
        "mask_audio": mouth,
        "mask_motion": face - mouth,
        "face_box": np.float32([image / 8, image / 8, 7 * image / 8, 7 * image / 8]),
        "motion_buckets": rng.integers(0, 129, size=2).astype(np.int32),
        "fps": np.float32(fps),
        "source": source,
        "version": np.int32(records.VERSION),
    }


def write_random(out: str, num_clips: int, frames: int, latent: int, image: int, audio_dim: int = 8, shards: int = 2,
                 seed: int = 0):
    """Writes num_clips random clips of `frames` frames into `shards` shards under out; returns the shard paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range(shards):
        path = os.path.join(out, f"random-{shard:05d}-of-{shards:05d}{records.SHARD_SUFFIX}")
        clips = (random_clip(rng, frames, latent=latent, image=image, audio=(10, 5, audio_dim),
                             source=f"random clip {i}")
                 for i in range(shard, num_clips, shards))
        records.write_shard(path, clips)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", help="shard directory (or one shard) to read")
    parser.add_argument("--workers", type=int, default=0, help="grain mp_prefetch worker processes")
    parser.add_argument("--batch-size", type=int, default=1, help="examples per batch (per process)")
    parser.add_argument("--frames", type=int, default=25, help="frames per training window (config.data.n_frames)")
    parser.add_argument("--read-threads", type=int, default=4, help="ReadOptions.num_threads")
    parser.add_argument("--steps", type=int, default=50, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (worker start-up)")
    parser.add_argument("--step-seconds", type=float, default=1.0,
                        help="ASSUMED training step time of the paper recipe, seconds (not measured)")
    parser.add_argument("--write-random", metavar="DIR", help="write random clips into DIR and exit")
    parser.add_argument("--num-clips", type=int, default=64)
    parser.add_argument("--frames-per-clip", type=int, default=20)
    parser.add_argument("--latent", type=int, default=4, help="latent grid side h = w")
    parser.add_argument("--image", type=int, default=32, help="mask side H = W")
    parser.add_argument("--audio-dim", type=int, default=8, help="audio feature width A (Whisper-tiny: 384)")
    args = parser.parse_args(argv)

    if args.write_random:
        paths = write_random(args.write_random, args.num_clips, args.frames_per_clip, args.latent, args.image,
                             args.audio_dim)
        print(f"wrote {args.num_clips} clips of {args.frames_per_clip} frames into {len(paths)} shards in "
              f"{args.write_random}")
        return
    if not args.records:
        parser.error("give --records DIR (or --write-random DIR)")

    config = ml_collections.ConfigDict(dict(seed=0, data=pipeline.default_data_config()))
    config.data.records = args.records
    config.data.eval_fraction = 0.0
    config.data.n_frames = args.frames
    config.data.batch_size = args.batch_size
    config.data.workers = args.workers
    config.data.read_threads = args.read_threads
    shards = records.shard_paths(args.records)
    stored = sum(os.path.getsize(p) for p in shards) / max(1, sum(pipeline.count_records(p) for p in shards))

    iterator = iter(pipeline.make_dataset(config, split="train", process_index=0, process_count=1))
    try:
        for _ in range(args.warmup):
            next(iterator)
        out_bytes = 0
        start = time.perf_counter()
        for _ in range(args.steps):
            batch = next(iterator)
            out_bytes += sum(v.nbytes for v in batch.values())
        seconds = time.perf_counter() - start
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
    clips = args.steps * args.batch_size / seconds
    need = PAPER_CLIPS_PER_GPU * PAPER_GPUS_PER_HOST / args.step_seconds
    print(f"records {args.records}: {len(shards)} shards, mean stored record {stored / 1e6:.3f} MB")
    print(f"workers {args.workers}, read threads {args.read_threads}, batch {args.batch_size}, frames {args.frames}, "
          f"{args.steps} batches in {seconds:.3f} s")
    print(f"throughput: {clips:.1f} clips/s, {out_bytes / seconds / 1e6:.1f} MB/s of batches, "
          f"{clips * stored / 1e6:.1f} MB/s of records read")
    print(f"paper recipe per host: {PAPER_CLIPS_PER_GPU} clip/GPU x {PAPER_GPUS_PER_HOST} GPUs / "
          f"{args.step_seconds:g} s step (assumed) = {need:.1f} clips/s; ratio {clips / need:.1f}x")


if __name__ == "__main__":
    main()
