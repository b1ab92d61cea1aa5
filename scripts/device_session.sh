#!/usr/bin/env bash
# One command for a short GPU lease: check, measure, then train the demo for the time left.
#
#     bash scripts/device_session.sh OUT_DIR [MINUTES]          # on the GPU machine (default 9 minutes)
#     DEVICE=cpu bash scripts/device_session.sh OUT_DIR 3       # the same steps on the CPU, tiny shapes
#
# In this order, each step under `timeout` within what is left of MINUTES, logging to its own file:
#   env      the device, driver, PyTorch, CUDA and cuDNN versions;
#   tests    the CUDA tests (tests/test_cuda.py; on a CPU they skip themselves);
#   profile  one training step (train.py's TrainingStep) of PROFILE_CONFIG at PROFILE_BATCH x PROFILE_SEGMENT
#            (default nanoflow-h16-r128-emb512, 8 x 16000) in fp32, bf16 and fp16, one process each:
#            step time and the top kernels by device time (scripts/profile_step.py); then the demo's
#            step, eager (the training below compiles it and logs its iterations per second);
#   probe    the convolution variants of amp_probe.sh (cuDNN engine choice, layout, bias, im2col), when
#            AMP_PROBE names its folder (default .probe/, a copy of ../shared/device/ made to travel
#            with the checkout, else ../shared/device/ itself; skipped when neither holds it);
#   bench    bench.py in fp32, bf16 and fp16 (synthesis 1 s and 10 s at batch 1, the training step);
#   train    `train.py -c TRAIN_CONFIG --compile --max_minutes M` (default configs/demo-long.json:
#            continuing pretrained/nanoflow-demo.pt, or this run folder's newest checkpoint) for the
#            time left but the measuring after it, or TRAIN_MINUTES if that is less, in the config's
#            precision or TRAIN_PRECISION (fp32, bf16, fp16);
#   measure  the new checkpoint's measures on the held-out sentences (train.py -v --json).
# STEPS="train measure" (say) runs only those; COMPILE=0 trains without --compile
# (default on a GPU; COMPILE=1 on a CPU).
# OUT_DIR receives at most 5 files, none in a subfolder (the device tool brings back 8 of at most
# 16 MiB): summary.txt, nanoflow-demo.pt (the newest checkpoint with its optimizer state, when training
# ran), measures.json, logs.tar.gz (every log, profile and JSON result) and, if a step failed, failed.txt. The summary is printed last. The
# exit status is 0 when every step that ran passed. After each step the summary so far, the logs and the
# newest checkpoint are in OUT_DIR already, so that a run stopped from outside (the device tool stops a
# command at 600 s: keep MINUTES under 10) still brings back what it did. The GPU machines lack soundfile and librosa:
# ../shared/device/fetch_wheels.sh puts their wheels in .whl/ (carry it), installed here when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/device_session.sh OUT_DIR [MINUTES]}
MINUTES=${2:-9}
DEVICE=${DEVICE:-cuda}
# The training step compiled (train.py --compile) on a GPU; on a CPU only with COMPILE=1 (minutes to compile).
if [ "$DEVICE" = cpu ]; then COMPILE=${COMPILE:-0}; else COMPILE=${COMPILE:-1}; fi
STEPS=${STEPS:-env tests profile probe bench train measure}
if [ -z "${AMP_PROBE:-}" ]; then
    AMP_PROBE=.probe
    [ -f "$AMP_PROBE/amp_probe.sh" ] || AMP_PROBE=../shared/device
fi
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/demo-long.json}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_session.XXXXXX")
START=$SECONDS
BUDGET=$(python3 -c "print(int(float('$MINUTES') * 60))") || { echo "MINUTES must be a number, got $MINUTES" >&2; exit 2; }

if [ "$DEVICE" = cpu ]; then
    # Tiny shapes: the CPU run checks that every step works, it measures nothing.
    PROFILE_CONFIG=${PROFILE_CONFIG:-configs/demo.json} PROFILE_BATCH=${PROFILE_BATCH:-1}
    PROFILE_SEGMENT=${PROFILE_SEGMENT:-2048} PRECISIONS=${PRECISIONS:-fp32 bf16}
    BENCH=(--seconds 0.05 --batches 1 --train_batch 1 --segment_length 2048 --repeats 1 --warmup 0 --max_seconds 1
        --matmul_size 256 --skip checkpointing loading)
    BENCH_PRECISIONS=fp32 BENCH_SHARE=20  # a CPU without bf16 matrix units takes minutes for a bf16 matmul
    PROFILE_STEPS=(--warmup 1 --steps 1 --top 5)
    DEMO_SHAPE=(--batch "$PROFILE_BATCH" --segment "$PROFILE_SEGMENT")
else
    PROFILE_CONFIG=${PROFILE_CONFIG:-configs/nanoflow-h16-r128-emb512.json} PROFILE_BATCH=${PROFILE_BATCH:-8}
    PROFILE_SEGMENT=${PROFILE_SEGMENT:-16000} PRECISIONS=${PRECISIONS:-fp32 bf16 fp16}
    BENCH=(--seconds 1 10 --batches 1 --repeats 3 --max_seconds 10 --skip checkpointing loading)
    BENCH_PRECISIONS=$PRECISIONS BENCH_SHARE=7
    PROFILE_STEPS=(--warmup 2 --steps 3 --top 15)  # 5 steps: the fp16 step once took 5 s on an H200
    DEMO_SHAPE=()  # the training config's batch and segment
fi

if [ -d .whl ] && ! python3 -c "import soundfile, librosa" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

COMPILE_FLAG=()
[ "$COMPILE" = 1 ] && COMPILE_FLAG=(--compile)

left() { echo $((BUDGET - (SECONDS - START))); }
# snapshot: the logs, the newest checkpoint and the summary so far into OUT, each written whole (through a
# .partial file) and the summary last, as a run stopped from outside leaves them.
snapshot() {
    tar -czf "$OUT/logs.tar.gz.partial" -C "$WORK" --exclude "waveflow_*" . 2>/dev/null \
        && mv "$OUT/logs.tar.gz.partial" "$OUT/logs.tar.gz"
    local newest_checkpoint
    newest_checkpoint=$(newest 2>/dev/null)
    [ -n "$newest_checkpoint" ] && cp "$newest_checkpoint" "$OUT/nanoflow-demo.pt.partial" \
        && mv "$OUT/nanoflow-demo.pt.partial" "$OUT/nanoflow-demo.pt"
    {
        echo "device session, interim summary at $((SECONDS - START)) s (a run stopped from outside ends here)"
        cat "$WORK/environment.txt" "$WORK/steps.txt" 2>/dev/null
    } > "$OUT/summary.txt.partial" && mv "$OUT/summary.txt.partial" "$OUT/summary.txt"
    return 0
}
trap 'snapshot; exit 143' TERM
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
: > "$WORK/steps.txt"
failed=0
# step NAME CAP_SECONDS COMMAND...: run it under `timeout` for at most CAP seconds and what is left of the
# budget less RESERVE (seconds kept for the steps after it), logging to WORK/NAME.log.
step() {
    local name=$1 cap=$2
    shift 2
    local limit
    limit=$(( $(left) - RESERVE ))
    [ "$cap" -lt "$limit" ] && limit=$cap
    if [ "$limit" -lt 5 ]; then
        echo "SKIP $name (no time left)" | tee -a "$WORK/steps.txt"
        return
    fi
    local t0=$SECONDS status
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    status=$?
    if [ $status -eq 0 ]; then
        echo "PASS $name ($((SECONDS - t0)) s)" | tee -a "$WORK/steps.txt"
    else
        local why="status $status"
        [ $status -eq 124 ] || [ $status -eq 137 ] && why="stopped at its limit of $limit s"
        echo "FAIL $name ($((SECONDS - t0)) s, $why); last lines of $name.log:" | tee -a "$WORK/steps.txt"
        tail -n 12 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$WORK/steps.txt"
        failed=1
    fi
    snapshot
}
# share PERCENT: that share of the whole budget, in seconds
share() { echo $((BUDGET * $1 / 100)); }

# What the training and measuring at the end keep for themselves while the measurements run.
RESERVE=$(share 40)

# The demo, continued: a copy of TRAIN_CONFIG whose run folder is under WORK (in TRAIN_PRECISION if set).
python3 - "$WORK" "$TRAIN_CONFIG" "${TRAIN_PRECISION:-}" <<'EOF'
import json, sys
work = sys.argv[1]
config = json.load(open(sys.argv[2]))
config["train_config"]["output_directory"] = f"{work}/experiments"
if sys.argv[3]:
    config["train_config"].update(fp16_run=sys.argv[3] == "fp16", bf16_run=sys.argv[3] == "bf16")
json.dump(config, open(f"{work}/demo-long.json", "w"), indent=4)
heldout = json.loads(json.dumps(config))
heldout["data_config"]["test_files"] = "data/demo/heldout/test_files.txt"
json.dump(heldout, open(f"{work}/heldout.json", "w"), indent=4)
EOF
RUN_FOLDER=$(python3 -c "import json; c = json.load(open('$WORK/demo-long.json')); \
print(c['train_config']['output_directory'] + '/' + c['waveflow_config']['model_name'])")
newest() { ls "$RUN_FOLDER"/waveflow_* 2>/dev/null | sort -t_ -k2 -n | tail -n 1; }

if wanted env; then
    {
        date -u +%FT%TZ
        git rev-parse --short HEAD 2>/dev/null
        command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
        nproc
    } > "$WORK/environment.txt" 2>&1
    cat "$WORK/environment.txt"
fi

if wanted tests; then
    step cuda_tests "$(share 12)" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi

if wanted profile; then
    for precision in $PRECISIONS; do
        step "profile_$precision" "$(share 6)" python3 scripts/profile_step.py -c "$PROFILE_CONFIG" \
            --device "$DEVICE" --precision "$precision" --batch "$PROFILE_BATCH" --segment "$PROFILE_SEGMENT" \
            "${PROFILE_STEPS[@]}" --json "$WORK/profile_$precision.json"
    done
    # The demo's step at the training's batch and segment (its config's on a GPU), eager: compiling it here
    # would take most of the step's share; the training below compiles it and logs its iterations per second.
    step profile_demo "$(share 8)" python3 scripts/profile_step.py -c "$WORK/demo-long.json" --device "$DEVICE" \
        ${DEMO_SHAPE[@]+"${DEMO_SHAPE[@]}"} "${PROFILE_STEPS[@]}" --json "$WORK/profile_demo.json"
fi

if wanted probe && [ -f "$AMP_PROBE/amp_probe.sh" ]; then
    smoke=()
    [ "$DEVICE" = cpu ] && smoke=(--cpu-smoke)
    probe_seconds=$(share 10)
    step amp_probe $((probe_seconds + 30)) env PROBE_SECONDS="$probe_seconds" NANOFLOW_DIR="$PWD" \
        bash "$AMP_PROBE/amp_probe.sh" "$WORK/amp_probe" ${smoke[@]+"${smoke[@]}"}
fi

if wanted bench; then
    for precision in $BENCH_PRECISIONS; do
        step "bench_$precision" "$(share "$BENCH_SHARE")" sh -c "python3 bench.py -c $PROFILE_CONFIG --device $DEVICE \
            --dtype $precision --json ${BENCH[*]} > $WORK/bench_$precision.json"
    done
fi


RESERVE=0
if wanted train; then
    measure_seconds=0
    wanted measure && measure_seconds=$(share 10)
    [ "$measure_seconds" -gt 0 ] && [ "$measure_seconds" -lt 45 ] && measure_seconds=45
    # --max_minutes stops training itself, leaving its checkpoint; timeout is the net beneath it.
    train_seconds=$(( $(left) - measure_seconds - 15 ))
    if [ -n "${TRAIN_MINUTES:-}" ]; then
        cap=$(python3 -c "print(int(float('$TRAIN_MINUTES') * 60) + 20)")
        [ "$cap" -lt "$train_seconds" ] && train_seconds=$cap
    fi
    if [ "$train_seconds" -lt 30 ]; then
        echo "SKIP train (${train_seconds} s left for it)" | tee -a "$WORK/steps.txt"
    else
        max_minutes=$(python3 -c "print(round(($train_seconds - 20) / 60, 2))")
        step train $((train_seconds + 5)) python3 train.py -c "$WORK/demo-long.json" --device "$DEVICE" \
            ${COMPILE_FLAG[@]+"${COMPILE_FLAG[@]}"} --max_minutes "$max_minutes"
    fi
fi

checkpoint=$(newest)
if wanted measure; then
    if [ -n "$checkpoint" ]; then
        step measure "$(left)" python3 train.py -v -c "$WORK/heldout.json" --device "$DEVICE" \
            --checkpoint_path "$checkpoint" --json "$WORK/measures.json"
    else
        echo "SKIP measure (no checkpoint in $RUN_FOLDER)" | tee -a "$WORK/steps.txt"
    fi
fi

# The summary: every step's outcome, then the figures of the JSON results.
python3 - "$WORK" "$checkpoint" "$(( SECONDS - START ))" > "$WORK/summary.txt" 2>&1 <<'EOF'
import glob, json, os, sys
work, checkpoint, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

print(f"device session, {seconds} s")
if os.path.exists(f"{work}/environment.txt"):
    print(open(f"{work}/environment.txt").read().strip())
print(open(f"{work}/steps.txt").read().strip())
profiles = {p: load(f"{work}/profile_{p}.json") for p in ("fp32", "bf16", "fp16", "demo")}
fp32 = profiles["fp32"]
print("\ntraining step (scripts/profile_step.py): precision, batch x segment, s/step, it/s, of fp32")
for name, result in profiles.items():
    if result:
        ratio = f"{result['step_seconds'] / fp32['step_seconds']:.2f}" if fp32 and name != "demo" else ""
        compiled = ", compiled" if result["compile"] else ""
        print(f"  {name + compiled:14s} {result['batch']} x {result['segment']:<6d} {result['step_seconds']:.4f} "
              f"{result['steps_per_second']:.1f} {ratio}  (warm-up {result['warmup_seconds']:.0f} s)")
print("\nbench.py: dtype, case, seconds, kHz, of matmul")
for path in sorted(glob.glob(f"{work}/bench_*.json")):
    report = load(path)
    for result in (report or {}).get("results", []):
        print(f"  {report['dtype']:5s} {result['case']:28s} {result['seconds']:.4f} {result.get('kHz', 0):9.1f} "
              f"{result.get('fraction_of_matmul', 0):.2f}")
if checkpoint:
    import torch
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    print(f"\ndemo checkpoint: iteration {state['iteration']}, optimizer state "
          f"{'kept' if state.get('optimizer') else 'MISSING'} ({os.path.basename(checkpoint)})")
train_log = f"{work}/train.log"
if os.path.exists(train_log):
    lines = [line.strip() for line in open(train_log, errors="replace").read().replace("\r", "\n").splitlines()]
    for line in [line for line in lines if "it/s" in line or "s/it" in line][-1:] + [
        line for line in lines if line.startswith(("wall-clock", "resumed", "warning", "error"))
    ][-6:]:
        print(f"  train: {line[-160:]}")
measure_log = f"{work}/measure.log"
if os.path.exists(measure_log):
    print("\nheld-out measures (train.py -v, the end of its log):")
    lines = open(measure_log, errors="replace").read().replace("\r", "\n").splitlines()
    print("\n".join(f"  {line}" for line in lines if line.strip() and "it/s]" not in line)[-2500:])
EOF

cp "$WORK/summary.txt" "$OUT/summary.txt"
[ -n "$checkpoint" ] && cp "$checkpoint" "$OUT/nanoflow-demo.pt"
[ -f "$WORK/measures.json" ] && cp "$WORK/measures.json" "$OUT/measures.json"
grep -A 12 "^FAIL" "$WORK/steps.txt" > "$OUT/failed.txt" || rm -f "$OUT/failed.txt"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude "waveflow_*" . 2>/dev/null
rm -rf "$WORK"
echo
cat "$OUT/summary.txt"
exit $failed
