#!/usr/bin/env bash
# What only an accelerator can check, for the day one is available (the project was written on a CPU-only
# machine). On an Ascend or GPU machine it runs, in minutes, and prints one table:
#   parity  the parity tests on the device: tests/test_model.py's official-output tests and
#           tests/test_accelerator_formulation.py (reference logits, float16 inference, train.py's step, export)
#   train   train.py on the digits, quick-start recipe, AMP O2 with a dynamic loss scale, 2 epochs
#   msrun   the same for 1 epoch, data parallel over every local device; the ranks must end with equal weights
#   bench   benchmarks/benchmark.py, one line: a volo_d1_224 training step at batch 128, O3 (MindCV reports
#           4451 img/s on 8 Ascend 910 with these settings: ~556 per card)
# Logs go to OUT_DIR (default ./device_check), one file per check. Exit code 0 when every check passed.
# On a machine without an Ascend or GPU device it says so in one line and exits 1.
#   bash scripts/device_check.sh [OUT_DIR]
# Uses the `python` on PATH (msrun starts its workers with it too): activate the project's environment first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-./device_check}"

# "<device> <local device count>", or "none"; MindSpore's notes about missing plugins go to stderr
found="$(python - 2>/dev/null <<'EOF'
import mindspore as ms

for device, context in (("Ascend", "ascend"), ("GPU", "gpu")):
    if ms.hal.is_available(device):
        print(device, getattr(ms.device_context, context).device_count())
        break
else:
    print("none")
EOF
)"
found="$(tail -n 1 <<< "$found")"
if [ -z "$found" ]; then
    echo "device_check: \`python\` cannot import mindspore; activate the project's environment (pip install -e .[test])"
    exit 1
fi
if [ "$found" = "none" ]; then
    echo "device_check: no Ascend or GPU device on this machine (MindSpore sees only the CPU); nothing to check"
    exit 1
fi
read -r DEVICE COUNT <<< "$found"
mkdir -p "$OUT"
ROWS=()
FAILED=0

# check NAME COMMAND...: runs COMMAND with its output in $OUT/NAME.log; sets STATUS and TAKEN (seconds)
check() {
    local name=$1 start=$SECONDS
    shift
    if "$@" > "$OUT/$name.log" 2>&1; then STATUS=ok; else STATUS=FAIL; FAILED=1; fi
    TAKEN=$((SECONDS - start))
}
# json_field FILE KEY...: the keys' values in the last JSON line of FILE, space-separated ("?" when absent)
json_field() {
    python - "$@" <<'EOF'
import json, sys

lines = [line for line in open(sys.argv[1], errors="replace") if line.startswith("{")]
record = json.loads(lines[-1]) if lines else {}
print(" ".join(str(record.get(key, "?")) for key in sys.argv[2:]))
EOF
}
row() {
    ROWS+=("$(printf '%-7s %-5s %6ss  %s' "$1" "$STATUS" "$TAKEN" "$2")")
}

check parity env MINDCV_VOLO_TEST_DEVICE="$DEVICE" python -m pytest -q \
    "tests/test_model.py::test_outputs_match_the_official_model" \
    "tests/test_model.py::test_resized_pos_embed_and_logits_match_the_official_loader" \
    tests/test_accelerator_formulation.py
row parity "$(tail -n 1 "$OUT/parity.log")"

QUICKSTART=(-c configs/quickstart_cpu.yaml --data_dir "$OUT/digits" --device_target "$DEVICE"
            --amp_level O2 --loss_scale_type dynamic)
train_digits() {
    python -m mindcv_volo.digits --out "$OUT/digits" && \
        python train.py "${QUICKSTART[@]}" --epoch_size 2 --ckpt_save_dir "$OUT/ckpt_train"
}
check train train_digits
read -r TOP1 SAMPLES <<< "$(json_field "$OUT/train.log" top1 num_samples)"
row train "top-1 $TOP1 on $SAMPLES held-out digits after 2 epochs (O2)"

PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
check msrun python -m mindspore.parallel.cluster.run --worker_num "$COUNT" --local_worker_num "$COUNT" \
    --master_port "$PORT" --join True --log_dir "$OUT/msrun_logs" \
    train.py "${QUICKSTART[@]}" --epoch_size 1 --ckpt_save_dir "$OUT/ckpt_msrun"
# every rank prints "rank R weights sha256 H" at the end of a run with more than one worker
HASHES="$(cat "$OUT"/msrun_logs/worker_*.log 2>/dev/null | grep -oE 'weights sha256 [0-9a-f]+' | sort -u | wc -l)"
RANKS="$(cat "$OUT"/msrun_logs/worker_*.log 2>/dev/null | grep -cE '^rank [0-9]+ weights sha256')"
if [ "$COUNT" -gt 1 ] && { [ "$RANKS" -ne "$COUNT" ] || [ "$HASHES" -ne 1 ]; }; then STATUS=FAIL; FAILED=1; fi
row msrun "$COUNT worker(s), $RANKS rank(s) reported weights, $HASHES distinct; top-1 $(json_field "$OUT/msrun_logs/worker_0.log" top1)"

check bench python benchmarks/benchmark.py --device "$DEVICE" --model volo_d1_224 --task train \
    --batch-size 128 --amp-level O3 --iters 5 --warmup 2
read -r IMG_PER_S COMPILE ERROR <<< "$(json_field "$OUT/bench.log" img_per_s compile_s error)"
row bench "volo_d1_224 train step, batch 128, O3: $IMG_PER_S img/s (compile ${COMPILE}s)$([ "$ERROR" = "?" ] || echo "; $ERROR")"

echo "device_check on $DEVICE x $COUNT, MindSpore $(python -c 'import mindspore; print(mindspore.__version__)' 2>/dev/null); logs in $OUT"
printf '%-7s %-5s %7s  %s\n' check result time figure
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
