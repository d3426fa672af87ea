#!/usr/bin/env bash
# GPU measurement batch for a lent H100/H200 (device tool): correctness first, then timings.
#   bash scripts/gpu_suite.sh scan|scantest|sweep|unet|pcm|train|finetune|train25|trainhost|demo|mfu ...   (sections to run; default: scan unet pcm)
# Logs go to $OUT (or ./gpu_out): summary.log (tails) and full.log. Each step has its own timeout so one failure does not stop the rest.
# Numbers belong in docs/benchmarks.md with date, device, jax version and the command.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# The device machine cannot reach a package index, so no `pip install -e .`: expose kernels/ the way
# setup.py installs it (as actalker_jax.kernels) and import the package from the tree.
[ -e actalker_jax/kernels ] || ln -s ../kernels actalker_jax/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() {  # step NAME TIMEOUT_S COMMAND...   (exit status in STEP_RC)
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$OUT/summary.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/step.log" 2>&1; local rc=$?; STEP_RC=$rc
  { echo "=== $name"; cat "$OUT/step.log"; } >>"$OUT/full.log"
  grep -v -e "cuda_timer.cc" -e "Compiling jit(" "$OUT/step.log" | cut -c1-400 | tail -n 25 | tee -a "$OUT/summary.log"
  rm -f "$OUT/step.log"
  echo "--- $name rc=$rc ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.log"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/summary.log"
demo_runs() {  # the CPU demo on the GPU: a long run (checkpoints every 1000 steps) and the 500-step ablations, then
  # `evaluate control` (8 held-out clips, 10 steps) on each; everything into $OUT/demo.tgz.
  # DEMO_RECORDS: the demo's records (python -m actalker_jax.data.synthetic --out D --num-clips 64 --seed 0
  # --frames 25 --size 32 --factor 2; the device machine has no PyAV to write the clips' mp4s).
  local records=${DEMO_RECORDS:-gpu_carry/records} runs=/tmp/demo_runs res=/tmp/demo_out long_s=${DEMO_LONG_S:-330}
  local common="--config.data.records=$records --config.model.pcm.scan_impl=auto --config.log.sample_every_steps=0"
  mkdir -p $runs $res
  ( export XLA_PYTHON_CLIENT_PREALLOCATE=false; unset XLA_PYTHON_CLIENT_MEM_FRACTION
    timeout -s TERM "$long_s" python3 -m actalker_jax.train --config configs/demo.py --workdir $runs/long $common \
      --config.total_steps=${DEMO_LONG_STEPS:-10000} --config.checkpoint.every_steps=1000 --config.checkpoint.keep=50 \
      >$res/train-long.log 2>&1 &
    for name in demo no_pcm no_mask_drop scan_video fixed_gates; do
      cfg=configs/demo_ablations.py:$name; [ $name = demo ] && cfg=configs/demo.py
      timeout "$long_s" python3 -m actalker_jax.train --config $cfg --workdir $runs/$name $common >$res/train-$name.log 2>&1 &
    done
    wait
    for ckpt in $runs/long/checkpoints/* $runs/[dnsf]*/checkpoints/500; do
      name=$(basename $(dirname $(dirname $ckpt)))-$(basename $ckpt)
      timeout 240 python3 -m actalker_jax.evaluate control --workdir $ckpt --num-clips 8 --steps 10 --out $res/$name \
        >$res/control-$name.log 2>&1 &
    done
    wait )
  for f in $res/control-*.log; do echo "== $f"; tail -n 12 $f; done | tee -a "$OUT/summary.log"
  tail -n 3 $res/train-*.log | tee -a "$OUT/summary.log"
  tar czf "$OUT/demo.tgz" -C $res .
}
sections=${*:-scan unet pcm}
for section in $sections; do
  case $section in
    scan)
      step scan_tests 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_selective_scan.py
      step scan_check_bf16 120 python3 -m actalker_jax.bench.scan --impl pallas --shape paper-video --check
      step scan_check_f32 120 python3 -m actalker_jax.bench.scan --impl pallas --shape paper-video --dtype float32 --check
      step scan_video 180 python3 -m actalker_jax.bench.scan --impl all --shape paper-video
      step scan_frame 180 python3 -m actalker_jax.bench.scan --impl all --shape paper-frame ;;
    unet)
      step unet_fwd 240 python3 -m actalker_jax.bench.unet --config svd_xt --frames 14 --latent 64x64 --dtype bfloat16 --mode forward ;;
    pcm)
      for preset in svd-320 svd-640 svd-1280; do
        step "pcm_$preset" 180 python3 -m actalker_jax.bench.pcm --preset "$preset" --dtype bfloat16 --impl auto
      done ;;
    scantest)
      step scan_tests 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_selective_scan.py ;;
    sweep)
      step sweep_bwd 150 python3 -m actalker_jax.bench.scan --shape paper-video --iters 5 --sweep block_d_bwd=8,16,32 num_warps=1,4
      step sweep_fwd 100 python3 -m actalker_jax.bench.scan --shape paper-video --iters 5 --sweep block_d=32,128 num_warps=1,4 ;;
    train)
      step train_full_14 ${TRAIN_LIMIT_S:-280} python3 -m actalker_jax.bench.train --config configs/actalker_svd_xt.py \
        --frames 14 --config.data.batch_size=1 --config.mesh.devices=1 --steps 3 --warmup 1 ;;
    finetune)
      step train_finetune_14 ${TRAIN_LIMIT_S:-280} python3 -m actalker_jax.bench.train \
        --config configs/actalker_finetune_1gpu.py --steps 3 --warmup 1 ;;
    train25)
      step train_full_25 ${TRAIN_LIMIT_S:-280} python3 -m actalker_jax.bench.train --config configs/actalker_svd_xt.py \
        --frames 25 --config.data.batch_size=1 --config.mesh.devices=1 --steps 3 --warmup 1 ;;
    demo)
      demo_runs ;;
    trainhost)  # --init host: no init program to compile (the jitted init of SVD-xt did not finish in 420 s); compile log
      export JAX_LOG_COMPILES=1
      [ "${DEMO_PALLAS_S:-100}" -gt 0 ] && step demo_pallas "${DEMO_PALLAS_S:-100}" python3 -m actalker_jax.bench.train --config configs/demo.py --init host \
        --config.model.pcm.scan_impl=auto --steps 20 --warmup 3
      step train_full_14 ${TRAIN_LIMIT_S:-420} python3 -m actalker_jax.bench.train --config configs/actalker_svd_xt.py \
        --frames 14 --config.data.batch_size=1 --config.mesh.devices=1 --steps 3 --warmup 1 --init host
      unset JAX_LOG_COMPILES ;;
    mfu)  # issue 7's measurement in one call: the SVD-xt + PCM training step at 14 frames 512x512 (host init, full
      # remat, no gradient accumulation: every step applies AdamW), then 25 frames with the time left (MFU_BUDGET_S
      # for the section); the xla scan instead if the first run failed (not timed out). JAX logs the trace, lowering
      # and XLA compile times. MFU_XLA_FLAGS (default: cuBLAS for every GEMM, no Triton GEMM autotuning) goes to
      # XLA_FLAGS: the 2026-12-04 H200 run (XLA defaults) did not finish compiling the step in 359 s.
      budget=${MFU_BUDGET_S:-560} t0=$SECONDS config=${MFU_CONFIG:-configs/actalker_svd_xt.py} image=${MFU_IMAGE:-512}
      export JAX_LOG_COMPILES=1 XLA_FLAGS="${MFU_XLA_FLAGS---xla_gpu_enable_triton_gemm=false}"
      echo "XLA_FLAGS=$XLA_FLAGS" | tee -a "$OUT/summary.log"
      bench="python3 -m actalker_jax.bench.train --config $config --image $image --config.data.batch_size=1 --config.mesh.devices=1 --config.optim.grad_accum=1 --steps 3 --warmup 1 --init host"
      step train_full_14 $((budget - 20)) $bench --frames 14; rc14=$STEP_RC
      left=$((budget - (SECONDS - t0)))
      if [ "$rc14" = 0 ] && [ $left -gt 120 ]; then
        step train_full_25 $left $bench --frames 25
      elif [ "$rc14" != 0 ] && [ "$rc14" != 124 ] && [ $left -gt 120 ]; then
        step train_full_14_xla_scan $left $bench --frames 14 --config.model.pcm.scan_impl=xla
      fi
      unset JAX_LOG_COMPILES XLA_FLAGS ;;
    *) echo "unknown section $section" ;;
  esac
done
