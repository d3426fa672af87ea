"""Video metrics of generated videos against references (real data): `evaluate video --pred DIR --ref DIR`.

    result = run_video(pred_dir, ref_dir, out=DIR, inception=PT, i3d=PT, lpips=PT, syncnet=PT, dlib=True)

Pairs every video in --pred with the video of the same file name in --ref (both decoded with PyAV; the reference
at the generated video's frame rate, both cut to the shorter one; frame sizes must match). The audio is the
generated video's own audio stream (or a `<stem>.wav` beside it).

Per video: PSNR, SSIM, LPIPS (with --lpips); with dlib (`data/face.py`): lip sync = Pearson correlation of the
mouth opening (inner-lip gap / outer-eye-corner distance, 68 landmarks) with the audio RMS energy per frame, and
identity = cosine similarity of the 128-d dlib face descriptors of generated and reference video; with --syncnet:
Sync-C / Sync-D / offset (`syncnet.py`) on 224x224 crops (`face.crop_square` with expand 1.4, about
syncnet_python's crop) of the generated video decoded at 25 fps (frames repeated when slower). Over all videos:
FID (--inception) between all generated and all reference frames, FVD (--i3d) between their non-overlapping
16-frame clips. Writes video.json ({"videos": {name: metrics}, "mean": metrics, "fid", "fvd", "num_videos"};
PSNR of identical videos is Infinity) and video.md.
"""

import json
import os

import numpy as np

from actalker_jax.data import video_io
from actalker_jax.eval import EvalError, control_metrics, feature_nets, syncnet as syncnet_lib, video_metrics

FVD_FRAMES = 16
SYNC_CROP_EXPAND = 1.4


def video_pairs(pred_dir: str, ref_dir: str) -> list[tuple[str, str, str]]:
    """(name, generated path, reference path) for every video of pred_dir, matched by file name in ref_dir."""
    for flag, path in (("--pred", pred_dir), ("--ref", ref_dir)):
        if not os.path.isdir(path):
            raise EvalError(f"{flag} {path}: not a directory")
    names = sorted(n for n in os.listdir(pred_dir) if n.lower().endswith(video_io.VIDEO_EXTENSIONS))
    if not names:
        raise EvalError(f"--pred {pred_dir}: no video files ({', '.join(video_io.VIDEO_EXTENSIONS)})")
    missing = [n for n in names if not os.path.isfile(os.path.join(ref_dir, n))]
    if missing:
        raise EvalError(f"--ref {ref_dir}: no reference for {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                           if len(missing) > 1 else ""))
    return [(n, os.path.join(pred_dir, n), os.path.join(ref_dir, n)) for n in names]


def load_pair(pred_path: str, ref_path: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(generated frames, reference frames) (T, H, W, 3) uint8 at the generated fps, and that fps."""
    fps = video_io.source_fps(pred_path)
    pred = np.stack(list(video_io.decode_frames(pred_path, fps)))
    ref = np.stack(list(video_io.decode_frames(ref_path, fps)))
    if pred.shape[1:] != ref.shape[1:]:
        raise EvalError(f"{ref_path}: frame size {ref.shape[2]}x{ref.shape[1]} differs from {pred_path} "
                        f"{pred.shape[2]}x{pred.shape[1]}")
    count = min(len(pred), len(ref))
    return pred[:count], ref[:count], fps


def _face_metrics(analyzer, pred: np.ndarray, ref: np.ndarray, wav: np.ndarray, fps: float) -> tuple[dict, object]:
    track = analyzer.track(pred)
    opening = video_metrics.mouth_opening(track.landmarks)
    energy = video_metrics.audio_energy(wav, len(pred), fps)
    identity = video_metrics.cosine(track.id_embed, analyzer.track(ref).id_embed)
    return dict(lip_sync=control_metrics.pearson(opening, energy), identity=identity), track


def run_video(pred_dir: str, ref_dir: str, *, out: str, inception: str | None = None, i3d: str | None = None,
              lpips: str | None = None, syncnet: str | None = None, dlib: bool = True, analyzer=None) -> dict:
    """Computes the metrics (see the module docstring), writes video.json and video.md into `out`.

    analyzer: a `face.FaceAnalyzer` for the landmark metrics and SyncNet crops (default: `face.DlibFaceAnalyzer`).
    """
    from actalker_jax.data import face

    pairs = video_pairs(pred_dir, ref_dir)
    nets = dict(inception=inception and feature_nets.load_inception(inception),
                i3d=i3d and feature_nets.load_i3d(i3d), lpips=lpips and feature_nets.load_lpips(lpips),
                syncnet=syncnet and syncnet_lib.load_syncnet(syncnet))
    if analyzer is None and (dlib or syncnet):
        analyzer = face.DlibFaceAnalyzer()
    videos, feats = {}, dict(inception=([], []), i3d=([], []))
    for name, pred_path, ref_path in pairs:
        pred, ref, fps = load_pair(pred_path, ref_path)
        metrics = dict(frames=len(pred), psnr=video_metrics.psnr(pred, ref), ssim=video_metrics.ssim(pred, ref))
        if nets["lpips"]:
            metrics["lpips"] = float(np.mean(nets["lpips"](pred, ref)))
        if nets["inception"]:
            for store, frames in zip(feats["inception"], (pred, ref)):
                store.append(nets["inception"](frames))
        if nets["i3d"]:
            clips = len(pred) // FVD_FRAMES
            for store, frames in zip(feats["i3d"], (pred, ref)):
                if clips:
                    store.append(nets["i3d"](frames[:clips * FVD_FRAMES].reshape(clips, FVD_FRAMES, *frames.shape[1:])))
        if dlib or nets["syncnet"]:
            wav = video_io.PyAVDecoder(fps).audio(pred_path)
            try:
                face_metrics, track = _face_metrics(analyzer, pred, ref, wav, fps)
            except face.FaceError as err:
                raise EvalError(f"{pred_path} / {ref_path}: {err}") from None
            if dlib:
                metrics.update(face_metrics)
            if nets["syncnet"]:
                frames25 = np.stack(list(video_io.decode_frames(pred_path, syncnet_lib.FPS)))
                square = face.crop_square(track.boxes, pred.shape[1:3], SYNC_CROP_EXPAND)
                offset, conf, dist = syncnet_lib.sync_scores(nets["syncnet"], face.crop_frames(frames25, square, 224),
                                                             wav)
                metrics.update(sync_c=conf, sync_d=dist, sync_offset=offset)
        videos[name] = metrics
    result = dict(videos=videos, mean={k: float(np.mean([v[k] for v in videos.values()]))
                                       for k in next(iter(videos.values())) if k != "frames"},
                  fid=None, fvd=None, num_videos=len(videos))
    if nets["inception"]:
        result["fid"] = video_metrics.frechet_distance(*(np.concatenate(s) for s in feats["inception"]))
    if nets["i3d"]:
        if sum(map(len, feats["i3d"][0])) < 2:
            raise EvalError(f"FVD needs >= 2 clips of {FVD_FRAMES} frames in {pred_dir}, got "
                            f"{sum(map(len, feats['i3d'][0]))}")
        result["fvd"] = video_metrics.frechet_distance(*(np.concatenate(s) for s in feats["i3d"]))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "video.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "video.md"), "w") as f:
        f.write(markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    """Mean metrics, FID and FVD as a one-row markdown table."""
    cells = {**result["mean"], "fid": result["fid"], "fvd": result["fvd"]}
    return (f"Video metrics over {result['num_videos']} videos.\n\n| " + " | ".join(cells) + " |\n|"
            + "---|" * len(cells) + "\n| " + " | ".join("-" if v is None else f"{v:.4g}" for v in cells.values())
            + " |\n")
