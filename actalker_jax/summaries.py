"""TensorBoard summaries of a run: scalars and animated sample videos, written by process 0 only.

    writer = Summaries(os.path.join(workdir, "tensorboard"))
    writer.scalars(step, {"loss": 0.4, "lr": 1e-4})
    writer.video(step, "sample/both", frames, fps=12.5)     # frames (T, H, W, 3) uint8
    writer.close()

Videos are animated GIFs in TensorBoard's image dashboard (what `add_video` produces), encoded with
Pillow, so no moviepy / ffmpeg is needed. `tensorboard --logdir WORKDIR/tensorboard` shows both.
"""

import io

import jax
import numpy as np


class Summaries:
    """A tensorboardX event writer that does nothing on processes other than 0."""

    def __init__(self, logdir: str):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir, flush_secs=30)

    def scalars(self, step: int, values: dict) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            if value is not None and np.isfinite(value):
                self._writer.add_scalar(name, float(value), step)

    def video(self, step: int, tag: str, frames: np.ndarray, fps: float) -> None:
        """frames: (T, H, W, 3) uint8 -> an animated GIF summary."""
        if self._writer is None:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"video {tag!r}: frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3,
                              encoded_image_string=gif_bytes(frames, fps))
        self._writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """(T, H, W, 3) uint8 -> an animated GIF (looping) at `fps`."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=int(round(1000 / fps)),
                   loop=0)
    return out.getvalue()
