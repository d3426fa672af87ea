"""The grain input pipeline: determinism, resume, per-process sharding, crops, bad inputs, TFDS, bench."""

import gc
import io
import os

import ml_collections
import numpy as np
import pytest

from actalker_jax.bench import data as bench_data
from actalker_jax.data import pipeline, records

FRAMES = (6, 9, 12, 20, 8, 16, 7, 11)  # 8 clips, 6-20 frames
N_FRAMES = 3


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """8 random clips (latents (T, 4, 4, 4), masks 32 x 32) in two shards; returns (dir, clips in global order)."""
    out = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    clips = [bench_data.random_clip(rng, t, fps=24.0 + i, source=f"clip {i}") for i, t in enumerate(FRAMES)]
    for clip in clips:
        clip["mask_audio"] = (rng.random((32, 32)) > 0.5).astype(np.uint8)
        clip["mask_motion"] = (rng.random((32, 32)) > 0.5).astype(np.uint8)
    records.write_shard(str(out / "a.array_record"), clips[:5])
    records.write_shard(str(out / "b.array_record"), clips[5:])
    return str(out), clips


def make_config(records_path, **data):
    config = ml_collections.ConfigDict(dict(seed=3, data=pipeline.default_data_config()))
    config.data.records = records_path
    config.data.eval_fraction = 0.0
    config.data.n_frames = N_FRAMES
    config.data.batch_size = 2
    config.data.update(data)
    return config


def take(config, n, *, split="train", process_index=0, process_count=1):
    iterator = iter(pipeline.make_dataset(config, split=split, process_index=process_index,
                                          process_count=process_count))
    try:
        return [next(iterator) for _ in range(n)]
    finally:
        iterator.close()


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_default_config_documents_every_field():
    config = pipeline.default_data_config()
    for field in config.keys():
        assert f"| {field} " in pipeline.default_data_config.__doc__, field


def test_batch_matches_the_stored_clip(shard_dir):
    path, clips = shard_dir
    batches = take(make_config(path, buckets=((16, 24), (32, 32))), 6)
    for batch in batches:
        b, f = 2, N_FRAMES
        crop = batch["mask_audio"].shape[1:]
        assert crop in ((16, 24), (32, 32))
        assert batch["latents"].shape == (b, f, crop[0] // 8, crop[1] // 8, 4)
        assert batch["ref_latent"].shape == (b, crop[0] // 8, crop[1] // 8, 4)
        assert batch["audio"].shape == (b, f, 10, 5, 8) and batch["motion"].shape == (b, f, 8)
        assert batch["pose"].shape == (b, f, 6) and batch["id_embed"].shape == (b, 16)
        assert batch["face_box"].shape == (b, 4) and batch["added_time_ids"].shape == (b, 3)
        assert all(v.dtype == np.float32 for k, v in batch.items() if k != "clip_index")
        for e in range(b):
            clip = clips[int(batch["clip_index"][e])]
            t = clip["latents"].shape[0]
            stride = 2 if t >= 2 * N_FRAMES else 1
            assert batch["added_time_ids"][e, 0] == pytest.approx(float(clip["fps"]) / stride)
            np.testing.assert_array_equal(batch["added_time_ids"][e, 1:], clip["motion_buckets"])
            np.testing.assert_array_equal(batch["id_embed"][e], clip["id_embed"].astype(np.float32))
            found = []
            for first in range(t - (N_FRAMES - 1) * stride):
                window = first + stride * np.arange(N_FRAMES)
                if not np.array_equal(batch["pose"][e], clip["pose"][window].astype(np.float32)):
                    continue
                for y0 in range(4 - crop[0] // 8 + 1):
                    for x0 in range(4 - crop[1] // 8 + 1):
                        lat = clip["latents"][window, y0:y0 + crop[0] // 8, x0:x0 + crop[1] // 8]
                        img = (slice(8 * y0, 8 * y0 + crop[0]), slice(8 * x0, 8 * x0 + crop[1]))
                        if (np.array_equal(batch["latents"][e], lat.astype(np.float32))
                                and np.array_equal(batch["mask_audio"][e], clip["mask_audio"][img])
                                and np.array_equal(batch["mask_motion"][e], clip["mask_motion"][img])):
                            found.append((first, y0, x0))
            assert len(found) == 1, found
            first, y0, x0 = found[0]
            last = first + (N_FRAMES - 1) * stride
            crop_latents = clip["latents"][:, y0:y0 + crop[0] // 8, x0:x0 + crop[1] // 8]
            refs = [r for r in range(max(0, first - N_FRAMES), min(t - 1, last + N_FRAMES) + 1)
                    if np.array_equal(batch["ref_latent"][e], crop_latents[r])]
            assert refs, "reference latent is not a frame within n_frames of the window"
            np.testing.assert_array_equal(batch["audio"][e], clip["audio"][first:last + 1:stride].astype(np.float32))
            box = np.clip(clip["face_box"] - 8 * np.float32([x0, y0, x0, y0]), 0, [crop[1], crop[0]] * 2)
            np.testing.assert_allclose(batch["face_box"][e], box)


def test_same_seed_same_batches_other_seed_differs(shard_dir):
    path, _ = shard_dir
    config = make_config(path, buckets=((16, 16), (32, 32)))
    first, second = take(config, 10), take(config, 10)
    assert_batches_equal(first, second)
    config.seed = 4
    other = take(config, 10)
    assert any(not np.array_equal(x["latents"], y["latents"]) for x, y in zip(first, other))


@pytest.mark.parametrize("workers", [0, 2])
def test_orbax_checkpoint_restore_continues_the_run(shard_dir, tmp_path, workers):
    import grain
    import orbax.checkpoint as ocp

    path, _ = shard_dir
    config = make_config(path, buckets=((16, 16), (32, 32)), workers=workers)
    uninterrupted = take(config, 9)
    iterator = iter(pipeline.make_dataset(config, split="train", process_index=0, process_count=1))
    head = [next(iterator) for _ in range(5)]
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    iterator.close()
    fresh = iter(pipeline.make_dataset(config, split="train", process_index=0, process_count=1))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(manager.latest_step(),
                                   args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    tail = [next(restored.data) for _ in range(4)]
    restored.data.close()
    assert_batches_equal(head + tail, uninterrupted)


def test_two_processes_disjoint_and_cover_each_epoch(shard_dir):
    path, clips = shard_dir
    config = make_config(path, batch_size=1)
    n = len(clips)
    for epoch in range(2):
        seen = []
        for process in range(2):
            batches = take(config, (epoch + 1) * n // 2, process_index=process, process_count=2)
            seen.append([int(b["clip_index"][0]) for b in batches[epoch * n // 2:]])
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(n))


def test_global_batch_does_not_depend_on_the_process_count(shard_dir):
    """Processes 0 and 1 with batch 2, stacked in process order, are the batches of one process with batch 4."""
    path, _ = shard_dir
    config = make_config(path, batch_size=2, buckets=((16, 16), (32, 32)))
    parts = [take(config, 6, process_index=p, process_count=2) for p in range(2)]
    config.data.batch_size = 4
    assert_batches_equal([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)], take(config, 6))


def test_eval_split_gives_every_process_the_same_number_of_batches(shard_dir):
    path, _ = shard_dir
    config = make_config(path, batch_size=1, eval_fraction=0.5)
    counts = [len(list(pipeline.make_dataset(config, split="eval", process_index=p, process_count=3)))
              for p in range(3)]
    assert len(set(counts)) == 1 and counts[0] > 0, counts


def test_buckets_agree_across_processes_at_each_step(shard_dir):
    path, _ = shard_dir
    config = make_config(path, batch_size=1, buckets=((8, 8), (16, 24), (24, 16), (32, 32)))
    shapes = [[b["latents"].shape for b in take(config, 12, process_index=p, process_count=2)] for p in range(2)]
    assert shapes[0] == shapes[1]
    assert len(set(shapes[0])) > 1


def test_workers_do_not_change_batches(shard_dir):
    path, _ = shard_dir
    config = make_config(path, buckets=((16, 16), (32, 32)))
    serial = take(config, 8)
    config.data.workers = 2
    assert_batches_equal(take(config, 8), serial)


def test_eval_split_is_held_out_and_read_once(shard_dir):
    path, clips = shard_dir
    config = make_config(path, eval_fraction=0.3, batch_size=1, n_frames=2)
    train = pipeline.make_source(config, "train")
    held = pipeline.make_source(config, "eval")
    names = {train.where(i) for i in range(len(train))} | {held.where(i) for i in range(len(held))}
    assert len(train) + len(held) == len(clips) == len(names)
    shards = (("a.array_record", 5), ("b.array_record", 3))
    assert len(held) == sum(pipeline.is_eval_clip(p, i, 0.3) for p, count in shards for i in range(count))
    assert len(take(config, len(held), split="eval")) == len(held)
    config.data.eval_fraction = 0.0
    with pytest.raises(records.RecordError, match="split 'eval' is empty"):
        pipeline.make_dataset(config, split="eval", process_index=0, process_count=1)


def write_raw(path, blobs):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for blob in blobs:
        writer.write(blob)
    writer.close()


def npz(clip):
    buffer = io.BytesIO()
    np.savez(buffer, **clip)
    return buffer.getvalue()


def first_error(config, steps=8):
    with pytest.raises(records.RecordError) as info:
        take(config, steps)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_bad_inputs_name_the_file_and_record(shard_dir, tmp_path):
    path, clips = shard_dir
    good = records.serialize(clips[0])

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = open(os.path.join(path, "a.array_record"), "rb").read()
    (truncated / "t.array_record").write_bytes(data[:len(data) // 2])
    with pytest.raises(records.RecordError, match=r"t\.array_record: truncated or corrupt") as info:
        take(make_config(str(truncated)), 1)
    assert "\n" not in str(info.value)

    shape = dict(clips[1])
    shape["motion"] = shape["motion"][:-1]
    version = dict(clips[2])
    version["version"] = np.int32(7)
    bad = tmp_path / "bad"
    bad.mkdir()
    write_raw(bad / "s.array_record", [good, npz(shape)])
    message = first_error(make_config(str(bad), batch_size=1, shuffle=False))
    assert f"{bad / 's.array_record'} record 1" in message and "'motion'" in message
    write_raw(bad / "s.array_record", [good, good, npz(version)])
    for workers in (0, 2):
        message = first_error(make_config(str(bad), batch_size=1, shuffle=False, workers=workers))
        assert f"{bad / 's.array_record'} record 2" in message and "unknown version 7" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(records.RecordError, match=f"{empty}: no .array_record shards"):
        pipeline.make_dataset(make_config(str(empty)), split="train", process_index=0, process_count=1)


def test_clip_shorter_than_window_and_oversized_bucket(shard_dir):
    path, _ = shard_dir
    message = first_error(make_config(path, n_frames=7, batch_size=1, shuffle=False))
    assert "a.array_record record 0" in message and "6 frames, fewer than config.data.n_frames=7" in message
    message = first_error(make_config(path, buckets=((40, 32),), batch_size=1))
    assert "crop bucket (40, 32) does not fit the stored frame (32, 32)" in message
    with pytest.raises(ValueError, match=r"config.data.source must be .* got 'tf'"):
        pipeline.make_dataset(make_config(path, source="tf"), split="train", process_index=0, process_count=1)


def test_tfds_source_yields_the_same_clips(shard_dir, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed")
    from actalker_jax.data import tfds_builder

    path, clips = shard_dir
    tfds_builder.build(path, str(tmp_path / "tfds"), eval_fraction=0.0)
    source = tfds.data_source("actalker_clips/no_eval", split="train", data_dir=str(tmp_path / "tfds"),
                              download=False)
    by_name = {}
    for example in source:
        clip = records.deserialize(example["record"])
        by_name[str(clip["source"])] = clip
    assert sorted(by_name) == sorted(str(c["source"]) for c in clips)
    for clip in clips:
        for key, value in clip.items():
            np.testing.assert_array_equal(by_name[str(clip["source"])][key], value, err_msg=key)

    config = make_config(path, source="tfds", tfds_name="actalker_clips/no_eval", tfds_data_dir=str(tmp_path / "tfds"),
                         batch_size=1)
    tfds_clips = pipeline.make_source(config, "train")
    assert "record" in tfds_clips[0][2] and "tfds actalker_clips/no_eval/train example 0" in tfds_clips[0][2]
    batches = take(config, 2 * len(clips))
    fps = {float(c["fps"]) for c in clips}
    for batch in batches:
        assert batch["latents"].shape == (1, N_FRAMES, 4, 4, 4)
        assert float(batch["added_time_ids"][0, 0]) in fps | {f / 2 for f in fps}
    assert sorted(int(b["clip_index"][0]) for b in batches[:len(clips)]) == list(range(len(clips)))


class _RaisesOnDel:
    def __del__(self):
        raise ValueError("raised in __del__")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unraisable_hook_survives_lazy_imports():
    """A __del__ that raises while tfds's lazy imports swap `__import__` is a warning, not a failed hook."""
    epy = pytest.importorskip("etils.epy", reason="etils is not installed")
    cycle = _RaisesOnDel()
    cycle.self = cycle
    del cycle
    with epy.lazy_imports():
        gc.collect()


def test_data_bench_prints_throughput(shard_dir, capsys):
    path, _ = shard_dir
    bench_data.main(["--records", path, "--batch-size", "2", "--frames", "3", "--steps", "5", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "clips/s" in out and "MB/s" in out and "ratio" in out
