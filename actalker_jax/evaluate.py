"""Evaluation commands.

    python -m actalker_jax.evaluate control --workdir DIR [--num-clips 8] [--out DIR] [--steps 25] [--seed 0]
                                            [--guidance APPEARANCE AUDIO MOTION] [--guidance-regions on|off]
                                            [--window-stride S]
    python -m actalker_jax.evaluate video --pred DIR --ref DIR [--out DIR] [--inception PT] [--i3d PT]
                                          [--lpips PT] [--syncnet PT] [--no-dlib]
    python -m actalker_jax.evaluate denoise --workdir DIR [--sigmas 0.2,1,5] [--batch 4] [--split eval] [--out DIR]
    python -m actalker_jax.evaluate reach --workdir DIR [--init] [--sigma 1] [--batch 2] [--split eval] [--out DIR]

control: the control benchmark on held-out synthetic clips (`eval/control.py`): control.json, control.png and
control.md in --out (default: the workdir). video: metrics of generated videos against references for real data
(`eval/video.py`): video.json and video.md in --out (default: --pred). denoise: the cheap denoising probe of a
checkpoint (`eval/denoise.py`: x0 error with true / swapped conditions vs copying the reference): denoise.json.
reach: how strongly the audio / motion condition reaches each token through every PCM layer (`eval/reach.py`),
of the checkpoint or (--init) of the fresh initialisation of its config: reach.json and reach.png.
"""

import argparse
import os
import sys

from actalker_jax.cli_args import add_guidance_argument, add_weights_argument, add_window_stride_argument


def _control(args) -> dict:
    from actalker_jax import sample
    from actalker_jax.eval import control

    loaded = sample.load_model(args.workdir, args.weights)
    out = args.out or args.workdir
    result = control.run_control(loaded, sample.generate, num_clips=args.num_clips, steps=args.steps,
                                 seed=args.seed, out=out, guidance=args.guidance, window_stride=args.window_stride,
                                 guidance_regions=args.guidance_regions)
    with open(os.path.join(out, "control.md")) as f:
        print(f.read(), end="")
    return result


def _video(args) -> dict:
    from actalker_jax.eval import video

    result = video.run_video(args.pred, args.ref, out=args.out or args.pred, inception=args.inception,
                             i3d=args.i3d, lpips=args.lpips, syncnet=args.syncnet, dlib=not args.no_dlib)
    print(video.markdown_table(result), end="")
    return result


def _denoise(args) -> dict:
    from actalker_jax import sample
    from actalker_jax.eval import denoise

    sigmas = denoise.parse_sigmas(args.sigmas)
    loaded = sample.load_model(args.workdir, args.weights)
    result = denoise.run_denoise(loaded, sigmas=sigmas, batch_size=args.batch, split=args.split, seed=args.seed,
                                 out=args.out or args.workdir)
    print(denoise.markdown_table(result), end="")
    return result


def _reach(args) -> dict:
    from actalker_jax import sample
    from actalker_jax.eval import reach

    loaded = sample.load_model(args.workdir, args.weights)
    if args.init:
        loaded = sample.LoadedModel.from_params(loaded.config, reach.initial_params(loaded.config), 0, loaded.path)
    result = reach.run_reach(loaded, sigma=args.sigma, batch_size=args.batch, split=args.split, seed=args.seed,
                             out=args.out or args.workdir)
    print(reach.markdown_table(result), end="")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m actalker_jax.evaluate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("control", help="control benchmark on held-out synthetic clips")
    c.add_argument("--workdir", required=True,
                   help="training workdir (its newest checkpoint) or checkpoint step directory")
    c.add_argument("--num-clips", type=int, default=8)
    c.add_argument("--out", default=None, help="output directory (default: the workdir)")
    c.add_argument("--steps", type=int, default=25, help="sampling steps")
    c.add_argument("--seed", type=int, default=0, help="sampling seed of the first clip (clip i: seed + i)")
    add_guidance_argument(c)
    add_window_stride_argument(c)
    add_weights_argument(c)
    c.set_defaults(run=_control)
    v = sub.add_parser("video", help="metrics of generated videos against reference videos")
    v.add_argument("--pred", required=True, help="directory of generated videos (mp4 with audio)")
    v.add_argument("--ref", required=True, help="directory of reference videos with the same file names")
    v.add_argument("--out", default=None, help="output directory (default: --pred)")
    v.add_argument("--inception", default=None, help="pytorch-fid Inception-v3 state dict (.pth) for FID")
    v.add_argument("--i3d", default=None, help="pytorch-i3d InceptionI3d RGB state dict (.pt) for FVD")
    v.add_argument("--lpips", default=None, help="LPIPS state dict (AlexNet features + lin layers) for LPIPS")
    v.add_argument("--syncnet", default=None, help="syncnet_v2 state dict (syncnet_python format) for Sync-C/D")
    v.add_argument("--no-dlib", action="store_true", help="skip the dlib lip-sync and identity metrics")
    v.set_defaults(run=_video)
    d = sub.add_parser("denoise", help="denoising probe of a checkpoint (x0 error, use of the conditions)")
    d.add_argument("--workdir", required=True, help="training workdir or checkpoint step directory")
    d.add_argument("--sigmas", default="0.2,1,5", help="comma-separated noise levels")
    d.add_argument("--batch", type=int, default=4, help="clips in the probe batch (>= 2)")
    d.add_argument("--split", default="eval", choices=("eval", "train"), help="records split")
    d.add_argument("--seed", type=int, default=0, help="noise seed")
    d.add_argument("--out", default=None, help="output directory (default: the workdir)")
    r = sub.add_parser("reach", help="reach of the audio / motion conditions through the PCM layers")
    r.add_argument("--workdir", required=True, help="training workdir or checkpoint step directory")
    r.add_argument("--init", action="store_true", help="the fresh initialisation of the checkpoint's config")
    r.add_argument("--sigma", type=float, default=1.0, help="noise level of the probe batch")
    r.add_argument("--batch", type=int, default=2, help="clips in the probe batch")
    r.add_argument("--split", default="eval", choices=("eval", "train"), help="records split")
    r.add_argument("--seed", type=int, default=0, help="noise seed")
    r.add_argument("--out", default=None, help="output directory (default: the workdir)")
    add_weights_argument(d)
    d.set_defaults(run=_denoise)
    add_weights_argument(r)
    r.set_defaults(run=_reach)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as err:     # bad inputs: one line naming the file / key / value
        sys.exit(f"evaluate {args.command}: {err}")


if __name__ == "__main__":
    main()
