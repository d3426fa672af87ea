"""A TFDS builder for preprocessed clips: each example is one serialized clip record (bytes) and its origin.

    from actalker_jax.data import tfds_builder
    tfds_builder.build("/data/records", data_dir="/data/tfds", eval_fraction=0.05)   # ArrayRecord shards -> TFDS
    source = tfds.data_source("actalker_clips", split="train", data_dir="/data/tfds", download=False)

or with the TFDS CLI-style flow: `tfds.builder("actalker_clips", data_dir=...).download_and_prepare(
download_config=tfds.download.DownloadConfig(manual_dir=RECORDS_DIR))`.

Examples: `record` (bytes: the `records.serialize` blob, decoded with `records.deserialize`), `shard` (base name of
the source shard) and `index` (record index inside it). Splits "train" and "eval" follow the held-out rule of
`pipeline.is_eval_clip` with the builder config's `eval_fraction`, so `config.data.source = "tfds"` yields the same
clips per split as reading the shards directly with the same `eval_fraction`. Written with
`file_format="array_record"`, so `tfds.data_source` reads it without TensorFlow.
"""

import dataclasses
import os

import numpy as np

try:
    import tensorflow_datasets as tfds
except ImportError as _err:
    raise ImportError("actalker_jax.data.tfds_builder needs tensorflow-datasets: pip install tensorflow-datasets, "
                      "or pip install 'actalker_jax[data]'") from _err

from actalker_jax.data import pipeline, records


@dataclasses.dataclass(eq=False)
class ActalkerClipsConfig(tfds.core.BuilderConfig):
    """Builder config: the fraction of clips held out for the "eval" split."""

    eval_fraction: float = 0.05


class ActalkerClips(tfds.core.GeneratorBasedBuilder):
    """Preprocessed ACTalker clips (one clip record per example) read from ArrayRecord shards in manual_dir."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Clip record schema version 1."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the `*.array_record` clip shards written by actalker_jax.data "
                                    "(records.write_shard) in manual_dir.")
    BUILDER_CONFIGS = [
        ActalkerClipsConfig(name="default", description="5% of clips held out for eval.", eval_fraction=0.05),
        ActalkerClipsConfig(name="no_eval", description="Every clip in train.", eval_fraction=0.0),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Preprocessed talking-head clips (latents, audio features, motion, masks) as record bytes.",
            features=tfds.features.FeaturesDict({
                "record": tfds.features.Scalar(dtype=np.object_, doc="serialized clip (records.serialize)"),
                "shard": tfds.features.Text(doc="base name of the source shard"),
                "index": tfds.features.Scalar(dtype=np.int64, doc="record index inside the source shard"),
            }),
        )

    def _split_generators(self, dl_manager):
        """Splits "train" and "eval" (a split that would hold no clip is left out: TFDS rejects empty splits)."""
        paths = records.shard_paths(os.fspath(dl_manager.manual_dir))
        fraction = self.builder_config.eval_fraction
        members = {"train": [], "eval": []}
        for path in paths:
            for index in range(pipeline.count_records(path)):
                members["eval" if pipeline.is_eval_clip(path, index, fraction) else "train"].append((path, index))
        return {split: self._generate_examples(paths, set(keep)) for split, keep in members.items() if keep}

    def _generate_examples(self, paths, keep):
        """Yields (key, example) for every record (path, index) in keep; each record is validated on the way."""
        for path in paths:
            for index, clip in enumerate(records.iter_records(path)):
                if (path, index) not in keep:
                    continue
                name = os.path.basename(path)
                yield f"{name}:{index}", {
                    "record": records.serialize(clip, f"{path} record {index}"),
                    "shard": name,
                    "index": index,
                }


def build(records_dir: str, data_dir: str, eval_fraction: float = 0.05) -> tfds.core.DatasetBuilder:
    """Builds (or finds already built) the `actalker_clips` dataset from shards in records_dir into data_dir.

    eval_fraction selects the builder config: 0.05 -> "default", 0.0 -> "no_eval"; other values raise.
    """
    names = {c.eval_fraction: c.name for c in ActalkerClips.BUILDER_CONFIGS}
    if eval_fraction not in names:
        raise ValueError(f"eval_fraction {eval_fraction} has no builder config; known: {sorted(names)} "
                         f"(add an ActalkerClipsConfig to ActalkerClips.BUILDER_CONFIGS)")
    builder = ActalkerClips(data_dir=data_dir, config=names[eval_fraction], file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=records_dir))
    return builder
