"""Video and audio decoding with PyAV (no ffmpeg binary needed).

    decoder = PyAVDecoder(fps=12.5)
    wave = decoder.audio(path)                      # (S,) float32, 16 kHz mono, in [-1, 1]
    for frame in decoder.frames(path): ...          # (H, W, 3) uint8 RGB, resampled to `fps`

Frame-rate resampling is frame *selection*: output frame k is source frame round(k * src_fps / fps)
(25 -> 12.5 fps keeps frames 0, 2, 4, ...; a source slower than `fps` repeats frames). No blending.
Audio: every channel mixed to mono and resampled to 16 kHz by `av.AudioResampler` (ffmpeg's swresample).
Audio comes from the container's first audio stream; a video without one may have a sidecar
`<same stem>.wav` next to it. Both streams are assumed to start together (container start offsets
are ignored).
"""

import os
from typing import Iterator, Protocol

import numpy as np

SAMPLE_RATE = 16000
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".flv", ".m4v")


class DecodeError(ValueError):
    """A video or audio file that cannot be decoded; the message names the file."""


class VideoDecoder(Protocol):
    """What the preprocessor needs from a decoder."""

    fps: float

    def audio(self, path: str) -> np.ndarray:
        """(S,) float32 mono waveform at 16 kHz."""

    def frames(self, path: str) -> Iterator[np.ndarray]:
        """(H, W, 3) uint8 RGB frames at `fps`."""


def sidecar_audio(path: str) -> str | None:
    """`<stem>.wav` next to a video, if it exists."""
    wav = os.path.splitext(path)[0] + ".wav"
    return wav if os.path.isfile(wav) else None


def _open(path: str):
    import av

    if not os.path.isfile(path):
        raise DecodeError(f"{path}: no such file")
    try:
        return av.open(path)
    except Exception as err:  # noqa: BLE001  (PyAV raises many error types for a broken file)
        raise DecodeError(f"{path}: cannot open ({type(err).__name__}: {err})") from None


def decode_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """First audio stream of `path` -> (S,) float32 mono at `sample_rate`."""
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise DecodeError(f"{path}: no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(audio=0):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except Exception as err:  # noqa: BLE001
            raise DecodeError(f"{path}: audio decoding failed ({type(err).__name__}: {err})") from None
    if not chunks:
        raise DecodeError(f"{path}: the audio stream holds no samples")
    return np.concatenate(chunks).astype(np.float32)


def source_fps(path: str) -> float:
    """Nominal frame rate of the first video stream."""
    with _open(path) as container:
        if not container.streams.video:
            raise DecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise DecodeError(f"{path}: unknown frame rate")
        return float(rate)


def decode_frames(path: str, fps: float) -> Iterator[np.ndarray]:
    """Frames of the first video stream, selected to `fps`: output k = source round(k * src_fps / fps)."""
    src = source_fps(path)
    step = src / fps
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        wanted = 0
        try:
            for index, frame in enumerate(container.decode(video=0)):
                if index < round(wanted * step):
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                while round(wanted * step) <= index:
                    yield rgb
                    wanted += 1
        except DecodeError:
            raise
        except Exception as err:  # noqa: BLE001
            raise DecodeError(f"{path}: video decoding failed at frame {wanted} "
                              f"({type(err).__name__}: {err})") from None


class PyAVDecoder:
    """The default `VideoDecoder`: PyAV, frame selection to `fps`, audio to 16 kHz mono."""

    def __init__(self, fps: float = 12.5):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = float(fps)

    def audio(self, path: str) -> np.ndarray:
        with _open(path) as container:
            has_audio = bool(container.streams.audio)
        if has_audio:
            return decode_audio(path)
        wav = sidecar_audio(path)
        if wav is None:
            raise DecodeError(f"{path}: no audio stream and no sidecar {os.path.splitext(path)[0]}.wav")
        return decode_audio(wav)

    def frames(self, path: str) -> Iterator[np.ndarray]:
        return decode_frames(path, self.fps)


def write_video(path: str, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
                sample_rate: int = SAMPLE_RATE, codec: str = "libx264") -> str:
    """Writes frames (T, H, W, 3) uint8 (H, W even) and optional mono float audio as mp4 (h264 + aac)."""
    import fractions

    import av

    frames = np.asarray(frames, np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video expects frames (T, H, W, 3) with even H, W, got {frames.shape}")
    rate = fractions.Fraction(fps).limit_denominator(1000)
    with av.open(path, "w") as container:
        video = container.add_stream(codec, rate=rate)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = {"crf": "18", "preset": "veryfast"} if codec == "libx264" else {}
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        if audio_stream is not None:
            samples = np.asarray(audio, np.float32).reshape(1, -1)
            step = 1024
            for start in range(0, samples.shape[1], step):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + step]),
                                                   format="fltp", layout="mono")
                chunk.sample_rate = sample_rate
                chunk.pts = start
                container.mux(audio_stream.encode(chunk))
            container.mux(audio_stream.encode())
    return path
