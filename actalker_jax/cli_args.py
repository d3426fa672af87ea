"""Command-line arguments shared by `sample` and `evaluate` (no jax import, so `evaluate --help` stays light).

    add_weights_argument(parser)        # --weights {auto, ema, params}
    add_guidance_argument(parser)       # --guidance APPEARANCE AUDIO MOTION, --guidance-regions on|off
    add_window_stride_argument(parser)  # --window-stride S
"""

import argparse

WEIGHTS = ("auto", "ema", "params")


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """--weights: which stored weights a checkpoint is used with (`sample.load_model`)."""
    parser.add_argument("--weights", choices=WEIGHTS, default="auto",
                        help="auto: the EMA of the parameters when stored, else the parameters")


def add_guidance_argument(parser: argparse.ArgumentParser) -> None:
    """--guidance: (appearance, audio, motion) scales and --guidance-regions for `sample.generate`; None: the
    checkpoint config's. args.guidance_regions is True, False or None."""
    parser.add_argument("--guidance", type=float, nargs=3, metavar=("APPEARANCE", "AUDIO", "MOTION"), default=None,
                        help="guidance scales (default: the checkpoint config's diffusion.guidance_*; spec 2.0 7.5 "
                             "3.0, demo 2.0 3.0 6.0)")
    parser.add_argument("--guidance-regions", type=_on_off, default=None, metavar="on|off",
                        help="on: audio guidance inside the mouth region only, motion guidance outside it; off: "
                             "both on the whole frame, as the released sampler (default: the checkpoint config's "
                             "diffusion.guidance_regions; the demo on)")


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return value == "on"


def add_window_stride_argument(parser: argparse.ArgumentParser) -> None:
    """--window-stride: output frames between a sampling window's frames for `sample.generate`; None: the config's."""
    parser.add_argument("--window-stride", type=int, default=None, metavar="S",
                        help="output frames between the frames of a sampling window (default: the checkpoint "
                             "config's diffusion.window_stride; 1 = the released sampler, the demo 3)")
