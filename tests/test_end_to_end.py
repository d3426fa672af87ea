"""CI-sized end to end: synthetic clips -> records -> train a few steps -> sample -> evaluate control and denoise."""

import json
import math
import os

from actalker_jax import evaluate, train
from demo_config import tiny_config


def test_generate_train_sample_evaluate(tmp_path):
    # The trainer tests' tiny config (8x8 latent tokens, one UNet level, 4-frame windows) on 2 synthetic clips that
    # the trainer generates into WORKDIR/synthetic and writes records of.
    config = tiny_config("", synthetic_clips=2, synthetic_frames=10, **{"checkpoint.every_steps": 2})
    workdir = str(tmp_path / "run")
    result = train.train(config, workdir)
    assert result.summary["step"] == 2 and math.isfinite(result.summary["loss_last"])
    assert os.path.isdir(os.path.join(workdir, "synthetic", "records"))

    out = str(tmp_path / "eval")
    evaluate.main(["control", "--workdir", workdir, "--num-clips", "1", "--steps", "2", "--out", out])
    report = json.load(open(os.path.join(out, "control.json")))
    assert report["num_clips"] == 1 and report["checkpoint_step"] == 2
    assert set(report["modes"]) == {"audio", "motion", "both"}
    for mode, metrics in report["modes"].items():
        assert set(metrics) == {"mouth_corr", "eye_corr", "yaw_corr", "mouth_leak", "eye_leak", "yaw_leak",
                                "psnr_static"}
        assert all(v is None or math.isfinite(v) for v in metrics.values()), (mode, metrics)
        assert metrics["psnr_static"] is not None
    assert report["modes"]["audio"]["eye_corr"] is None and report["modes"]["motion"]["mouth_corr"] is None
    assert os.path.getsize(os.path.join(out, "control.png")) > 1000
    assert os.path.isfile(os.path.join(out, "control.md"))

    probe = evaluate.main(["denoise", "--workdir", workdir, "--split", "train", "--batch", "2", "--sigmas", "1",
                           "--out", out])
    assert probe["checkpoint_step"] == 2
    assert all(math.isfinite(v) for v in probe["sigmas"]["1"].values())
