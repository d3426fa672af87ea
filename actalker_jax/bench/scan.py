"""Selective-scan benchmark: forward and forward+backward time, effective bandwidth, H100 floor ratio.

    python -m actalker_jax.bench.scan --impl pallas --shape paper-video           # on a GPU
    python -m actalker_jax.bench.scan --impl all --shape small                    # ratios between impls
    python -m actalker_jax.bench.scan --impl pallas --shape paper-video --check   # errors vs reference
    python -m actalker_jax.bench.scan --impl xla --shape long --dtype float32 --warmup 0 --iters 1  # host memory
    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python -m actalker_jax.bench.scan --triton-report

Times are medians over --iters runs after --warmup runs of a jitted forward (y) and a jitted
forward+backward (y and the gradients of <y, g> w.r.t. every input). Bytes count the (batch, L, D)
and (batch, L, N) arrays each pass must read or write once (ANCHORS.md §4); the H100 floor is
max(bytes / 3.35 TB/s, state updates / unit throughput) with the throughputs implied by the
ANCHORS.md §4 table (fwd: exp unit, 2.95e12 updates/s; bwd: fp32, 1.84e12 updates/s).
`--check` compares the chosen impl with impl="reference" at the given shape (float32: relative
error <= 1e-4; bfloat16 inputs: within 3e-2 of the float32 result) and exits non-zero on failure.
Every run ends with the peak resident memory of the process (host RSS).
`--triton-report` needs no GPU: it compiles the pallas kernels with Triton for sm_90 and prints
what ptxas reports (registers, spills); it needs jax-cuda12-plugin and ptxas (nvidia-cuda-nvcc-cu12).
"""
import argparse
import itertools
import io
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from actalker_jax.bench.timing import median_ms
from actalker_jax.kernels.selective_scan import IMPLS, resolve_impl, selective_scan

SHAPES = {  # (batch, L, D, N)
    "paper-video": (2, 72_000, 640, 16),  # whole-video scan, top UNet level
    "paper-frame": (50, 3_105, 640, 16),  # per-frame scans: 48x64 tokens + ID + 32 audio tokens, 25 frames x 2
    "small": (2, 4_096, 128, 16),
    "demo": (16, 261, 64, 16),  # configs/demo.py per-frame scans: 16x16 tokens + ID + 4 audio, 2 clips x 8 frames
    "long": (1, 131_072, 256, 16),  # memory check: one (L, D, N) float32 tensor would be 2 GiB
}
HBM_BYTES_PER_S = 3.35e12
FWD_UPDATES_PER_S = 2.95e12
BWD_UPDATES_PER_S = 1.84e12
GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def traffic_bytes(batch, length, dim, nstate, itemsize):
    """(forward, backward) bytes: fwd reads u, delta, z, B, C, mask and writes y; bwd also reads g, writes 5 grads."""
    seq = batch * length * dim * itemsize
    bc = batch * length * nstate * itemsize
    fwd = 4 * seq + 2 * bc + batch * length
    bwd = 7 * seq + 4 * bc + batch * length
    return fwd, bwd


def h100_floor_s(batch, length, dim, nstate, itemsize):
    """(forward, backward) H100 floor in seconds."""
    fwd_bytes, bwd_bytes = traffic_bytes(batch, length, dim, nstate, itemsize)
    updates = batch * length * dim * nstate
    return (
        max(fwd_bytes / HBM_BYTES_PER_S, updates / FWD_UPDATES_PER_S),
        max(bwd_bytes / HBM_BYTES_PER_S, updates / BWD_UPDATES_PER_S),
    )


def make_inputs(shape, dtype, seed=0, keep=0.9):
    """Scan inputs (dict of arrays), a kept-token mask (each token kept with probability `keep`), a cotangent."""
    batch, length, dim, nstate = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 9)
    seq = lambda k: jax.random.normal(k, (batch, length, dim), jnp.float32).astype(dtype)
    arrays = dict(
        u=seq(keys[0]),
        delta=(jax.random.normal(keys[1], (batch, length, dim)) - 2.0).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(keys[2], (dim, nstate))),
        B=jax.random.normal(keys[3], (batch, length, nstate)).astype(dtype),
        C=jax.random.normal(keys[4], (batch, length, nstate)).astype(dtype),
        D=jax.random.normal(keys[5], (dim,)),
        z=seq(keys[6]),
        delta_bias=0.5 * jax.random.normal(keys[7], (dim,)),
    )
    mask = jax.random.uniform(keys[8], (batch, length)) < keep
    return arrays, mask, seq(jax.random.fold_in(keys[0], 1))


def build(impl, options):
    """Jitted forward and forward+backward functions of (arrays, mask, g)."""

    def forward(arrays, mask):
        return selective_scan(**arrays, mask=mask, impl=impl, options=options)

    def forward_backward(arrays, mask, g):
        y, vjp = jax.vjp(lambda a: forward(a, mask), arrays)
        return y, vjp(g)[0]

    return jax.jit(forward), jax.jit(forward_backward)


def bench(impl, shape, dtype, options, warmup, iters, keep=0.9):
    arrays, mask, g = make_inputs(shape, dtype, keep=keep)
    forward, forward_backward = build(impl, options)
    fwd_ms = median_ms(forward, (arrays, mask), warmup, iters)
    fb_ms = median_ms(forward_backward, (arrays, mask, g), warmup, iters)
    itemsize = jnp.dtype(dtype).itemsize
    fwd_bytes, bwd_bytes = traffic_bytes(*shape, itemsize)
    floor_fwd, floor_bwd = h100_floor_s(*shape, itemsize)
    return dict(
        fwd_ms=fwd_ms,
        fb_ms=fb_ms,
        fwd_gbs=fwd_bytes / fwd_ms * 1e-6,
        fb_gbs=(fwd_bytes + bwd_bytes) / fb_ms * 1e-6,
        floor_fwd_ms=1e3 * floor_fwd,
        floor_fb_ms=1e3 * (floor_fwd + floor_bwd),
    )


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def check(impl, shape, options, keep=0.9):
    """Errors of `impl` against impl="reference" (float32) and of bfloat16 inputs against float32; True if all pass."""
    arrays, mask, g = make_inputs(shape, jnp.float32, keep=keep)
    _, ref_fb = build("reference", None)
    _, fb = build(impl, options)
    y_ref, grads_ref = ref_fb(arrays, mask, g)
    y, grads = fb(arrays, mask, g)
    bf = {k: v.astype(jnp.bfloat16) if v.ndim == 3 else v for k, v in arrays.items()}
    y16, grads16 = fb(bf, mask, g.astype(jnp.bfloat16))
    ok = True
    for name, ref, out, out16 in [("y", y_ref, y, y16)] + [(k, grads_ref[k], grads[k], grads16[k]) for k in GRAD_ARGS]:
        err, err16 = rel_err(out, ref), rel_err(out16, out)
        passed = err <= 1e-4 and err16 <= 3e-2
        ok &= passed
        print(f"  {name:10s} fp32 rel err {err:.2e}   bf16 vs fp32 {err16:.2e}   {'ok' if passed else 'FAIL'}")
    return ok


def triton_report(shape, options):
    """Print ptxas register and spill counts of the pallas kernels (fwd+bwd, bf16 I/O) compiled for sm_90a.

    A development aid built on private jax modules: it captures the Triton IR the Pallas lowering
    produces during a CUDA export and compiles it with the Triton pipeline of jax-cuda12-plugin.
    """
    from jax._src.lib import triton
    from jax._src.pallas.triton import pallas_call_registration

    ptxas = shutil.which("ptxas")
    if ptxas is None:
        import nvidia.cuda_nvcc

        ptxas = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")
    if not triton.has_compilation_handler("CUDA"):
        raise RuntimeError("no Triton compilation handler for CUDA: install jax-cuda12-plugin and set "
                           "JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 on a machine without a GPU")
    modules = []
    lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        modules.append((jaxpr.debug_info.func_name, result.module))
        return result

    arrays, mask, g = jax.eval_shape(lambda: make_inputs(shape, jnp.bfloat16))
    _, forward_backward = build("pallas", {**(options or {}), "interpret": False})
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            jax.export.export(
                forward_backward, platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
            )(arrays, mask, g)
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower
    num_warps = (options or {}).get("num_warps", 1)
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in modules:
            buf = io.BytesIO()
            module.operation.write_bytecode(buf)
            t0 = time.perf_counter()
            ptx = triton.compile("CUDA", buf.getvalue(), "9.0", num_warps=num_warps, num_ctas=1, num_stages=3).asm
            path = os.path.join(tmp, name + ".ptx")
            with open(path, "w") as f:
                f.write(ptx)
            log = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
                                 capture_output=True, text=True, check=True).stderr
            seconds = time.perf_counter() - t0
            regs = re.search(r"Used (\d+) registers", log).group(1)
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
            print(f"{name:32s} {regs:>3s} registers, spill stores/loads {spills[0]}/{spills[1]} bytes, "
                  f"{ptx.count('bar.sync')} bar.sync, {ptx.count('ex2.approx')} ex2 in the PTX; "
                  f"Triton + ptxas {seconds:.1f} s")


def sweep(shape, dtype, base, specs, warmup, iters):
    """Times impl="pallas" for every combination of the knob values in `specs` ("knob=v1,v2")."""
    grid = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        if name not in base or not values:
            raise SystemExit(f"--sweep: expected KNOB=V1,V2 with KNOB in {sorted(base)}, got {spec!r}")
        grid[name] = [int(v) for v in values.split(",")]
    fixed = {k: v for k, v in base.items() if v is not None and k not in grid}
    print(f"pallas sweep at {shape}, {dtype.name}, fixed {fixed}")
    for values in itertools.product(*grid.values()):
        options = {**fixed, **dict(zip(grid, values))}
        try:
            r = bench("pallas", shape, dtype, options, warmup, iters)
            print(f"{options}: fwd {r['fwd_ms']:8.3f} ms   fwd+bwd {r['fb_ms']:8.3f} ms")
        except Exception as err:  # a knob combination the kernel or Triton rejects: report and go on
            print(f"{options}: failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="auto", choices=[*IMPLS, "all"])
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--keep", type=float, default=0.9,
                        help="fraction of tokens the mask keeps (a PCM region: the CPU demo's mouth keeps 0.1)")
    parser.add_argument("--check", action="store_true", help="compare with impl='reference' instead of timing")
    parser.add_argument("--triton-report", action="store_true", help="ptxas registers/spills of the pallas kernels")
    parser.add_argument("--chunk-size", type=int, help="xla: tokens per chunk")
    parser.add_argument("--block", type=int, help="xla: tokens per sequential block")
    parser.add_argument("--block-d", type=int, help="pallas: channels per program")
    parser.add_argument("--chunk", type=int, help="pallas: scan positions per program")
    parser.add_argument("--sub", type=int, help="pallas: tokens per unrolled step")
    parser.add_argument("--num-warps", type=int, help="pallas: warps per program")
    parser.add_argument("--block-d-bwd", type=int, help="pallas: channels per backward program")
    parser.add_argument("--sub-bwd", type=int, help="pallas: tokens per unrolled backward step")
    parser.add_argument("--sweep", nargs="+", metavar="KNOB=V1,V2", default=(),
                        help="pallas: time every combination of these knobs (e.g. block_d_bwd=8,32 num_warps=1,4)")
    args = parser.parse_args(argv)

    knobs = {
        "xla": {"chunk_size": args.chunk_size, "block": args.block},
        "pallas": {"block_d": args.block_d, "chunk": args.chunk, "sub": args.sub, "num_warps": args.num_warps,
                   "block_d_bwd": args.block_d_bwd, "sub_bwd": args.sub_bwd},
    }
    if args.sweep:
        return sweep(SHAPES[args.shape], jnp.dtype(args.dtype), knobs["pallas"], args.sweep, args.warmup, args.iters)
    on_gpu = resolve_impl("auto") == "pallas"
    if args.impl == "all":
        impls = [impl for impl in IMPLS if impl not in ("auto", "pallas")] + (["pallas"] if on_gpu else [])
    else:
        impls = [resolve_impl(args.impl)]
    shape = SHAPES[args.shape]
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"selective scan, shape {args.shape} (batch, L, D, N) = {shape}, {dtype.name} I/O, mask keeps {args.keep}, "
          f"{device.platform} ({device.device_kind}), jax {jax.__version__}")
    if "pallas" in impls and not on_gpu:
        print("note: pallas runs in interpret mode off GPU; its times say nothing about the kernel")

    if args.triton_report:
        print(f"pallas kernels, shape {args.shape} {shape}, bf16 I/O, Triton -> PTX -> ptxas sm_90a:")
        triton_report(shape, {k: v for k, v in knobs["pallas"].items() if v is not None})
        return 0
    if args.check:
        ok = True
        for impl in impls:
            print(f"{impl} vs reference:")
            ok &= check(impl, shape, {k: v for k, v in knobs.get(impl, {}).items() if v is not None} or None,
                        args.keep)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1

    results = {}
    for impl in impls:
        options = {k: v for k, v in knobs.get(impl, {}).items() if v is not None} or None
        r = results[impl] = bench(impl, shape, dtype, options, args.warmup, args.iters, args.keep)
        print(
            f"{impl:10s} fwd {r['fwd_ms']:9.3f} ms ({r['fwd_gbs']:7.1f} GB/s, "
            f"{r['fwd_ms'] / r['floor_fwd_ms']:8.1f}x H100 floor {r['floor_fwd_ms']:.3f} ms)   "
            f"fwd+bwd {r['fb_ms']:9.3f} ms ({r['fb_gbs']:7.1f} GB/s, "
            f"{r['fb_ms'] / r['floor_fb_ms']:8.1f}x H100 floor {r['floor_fb_ms']:.3f} ms)"
        )
    if len(results) > 1:
        base = impls[-1]
        for impl in impls[:-1]:
            print(
                f"{impl} / {base}: fwd {results[impl]['fwd_ms'] / results[base]['fwd_ms']:.2f}x, "
                f"fwd+bwd {results[impl]['fb_ms'] / results[base]['fb_ms']:.2f}x"
            )
    print(f"host peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
