#!/usr/bin/env bash
# Check the project on a CUDA GPU in one command, and measure its speed there.
#
#     bash scripts/gpu_check.sh OUT_DIR [ITERATIONS]
#
# Runs, writing every log and result under OUT_DIR and a PASS/FAIL line per step:
#   0. the benchmark first, on an idle GPU (item 4 below);
#   1. the CUDA tests (tests/test_cuda.py: the reference fixtures and exactness tests on CUDA in
#      fp32 with TF32 off, CUDA graphs, fp16/bf16 training steps, CPU against CUDA);
#   2. the demo trained for ITERATIONS (default 600) iterations in fp32, with fp16_run and with
#      bf16_run, each evaluated (-v) at the end, so that the three test losses can be compared;
#      the fp32 run then resumed for 20 more iterations, evaluated and synthesized from (-s);
#   3. the same training under `torchrun --standalone --nproc_per_node=1` (DDP over NCCL), and
#      one training step through DataParallel against the plain model;
#   4. bench.py --device cuda --json for fp32, fp16 and bf16 (synthesis of 1 s and 10 s at batch
#      1 and 8, training steps at the config's batch size and segment), and bf16 synthesis with
#      CUDA graphs off for comparison.
# Exits non-zero when any step failed; on a machine without a CUDA device it stops at once, in one
# line. The GPU machines lack soundfile and librosa: ../shared/device/fetch_wheels.sh puts their
# wheels in .whl/, installed here when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [ITERATIONS]}
ITERATIONS=${2:-600}
BENCH_CONFIG=configs/nanoflow-h16-r128-emb512.json
# Without a GPU the CUDA tests skip themselves and train.py would train the demo on the CPU for hours.
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: no CUDA device that PyTorch can use: scripts/gpu_check.sh checks a GPU machine" \
        "(on a CPU: python -m pytest -q tests)" >&2
    exit 1
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ! python3 -c "import soundfile, librosa" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

failed=0
step() {  # step NAME COMMAND...: run it, log to OUT/NAME.log, report PASS/FAIL with the time taken
    local name=$1 start=$SECONDS
    shift
    if "$@" > "$OUT/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - start)) s)"
    else
        echo "FAIL $name ($((SECONDS - start)) s), last lines of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
        failed=1
    fi
}

demo_config() {  # demo_config NAME PRECISION: the demo config, run folder under OUT
    python3 - "$OUT" "$1" "$2" <<'EOF'
import json, sys
out, name, precision = sys.argv[1:]
config = json.load(open("configs/demo.json"))
config["train_config"].update(output_directory=f"{out}/experiments", iters_per_checkpoint=100,
                              fp16_run=precision == "fp16", bf16_run=precision == "bf16")
config["data_config"]["num_workers"] = 2
config["waveflow_config"]["model_name"] = name
json.dump(config, open(f"{out}/{name}.json", "w"), indent=4)
EOF
    echo "$OUT/$1.json"
}

for dtype in fp32 fp16 bf16; do
    step "bench_$dtype" sh -c "python3 bench.py -c $BENCH_CONFIG --device cuda --dtype $dtype --json > $OUT/bench_$dtype.json"
done
step bench_bf16_eager sh -c "python3 bench.py -c $BENCH_CONFIG --device cuda --dtype bf16 --skip training loading \
    --eager --json > $OUT/bench_bf16_eager.json"

step cuda_tests python3 -m pytest -q tests/test_cuda.py

for precision in fp32 fp16 bf16; do
    config=$(demo_config "demo-$precision" "$precision")
    step "train_$precision" python3 train.py -c "$config" --max_iterations "$ITERATIONS"
    step "evaluate_$precision" python3 train.py -v -c "$config" \
        --checkpoint_path "$OUT/experiments/demo-$precision/waveflow_$ITERATIONS"
done
config=$OUT/demo-fp32.json
step resume_fp32 python3 train.py -c "$config" --max_iterations $((ITERATIONS + 20)) \
    --checkpoint_path "$OUT/experiments/demo-fp32/waveflow_$ITERATIONS"
step synthesize_fp32 python3 train.py -s -c "$config" \
    --checkpoint_path "$OUT/experiments/demo-fp32/waveflow_$((ITERATIONS + 20))"

config=$(demo_config demo-ddp fp32)
step torchrun_nccl torchrun --standalone --nproc_per_node=1 train.py -c "$config" --max_iterations 40
step data_parallel python3 - <<'EOF'
import sys
sys.path.insert(0, "tests")
import torch
from model import negative_log_likelihood
from test_model import random_model, tiny_config
model = random_model(tiny_config("nanoflow")).cuda().train()
audio, mel = torch.rand(4, 2048, device="cuda") - 0.5, torch.randn(4, 80, 9, device="cuda")
gradients = []
for wrapped in (model, torch.nn.DataParallel(model)):
    model.zero_grad()
    z, logdet = wrapped(audio, mel)
    negative_log_likelihood(z, logdet).backward()
    gradients.append([p.grad.clone() for p in model.parameters()])
assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*gradients))
print(f"DataParallel over {torch.cuda.device_count()} GPU(s): same gradients as the plain model")
EOF


for precision in fp32 fp16 bf16; do
    grep -h "negative log-likelihood" "$OUT/evaluate_$precision.log" | sed "s/^/$precision: /"
done
exit $failed
