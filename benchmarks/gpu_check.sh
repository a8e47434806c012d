#!/usr/bin/env bash
# The toolkit's CUDA check (the test suite runs on the CPU, so this is where CUDA-only defects show).
#
# Run on a CUDA machine, from the repository root, after `pip install -e ".[dev]"`:
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check_out
# Needs only PyTorch and the packages pyproject.toml lists (no downloads: the digits model is shipped, the
# cin256-v2-size smoke uses random weights). Takes under 8 minutes on one GPU. Steps:
#   1. nvidia-smi, torch / CUDA versions;
#   2. the CUDA-relevant tests (device resolution, LoRA init, quantizers, layers) with MPQDM_TEST_DEVICE=cuda;
#   3. quant_scripts 01 -> 06 (+ 04 --from_export) on the digits model for EfficientDM (W4A8) and MPQ-DM (W2A4)
#      with --device cuda and a short budget;
#   4. a cin256-v2-size random-weight smoke of 01 -> 04 on CUDA (benchmarks/finetune_cost.py --cin_smoke);
#   5. the CUDA engine: the cin256-v2-size EfficientDM W8A8 UNet as Q/DQ ONNX -> TensorRT INT8 engine, its latency
#      per call against PyTorch FP32 / FP16 on the same GPU and its max |Δε| to the fake-quant model
#      (benchmarks/engine_speed.py --tensorrt); needs `pip install -e ".[tensorrt]"`, skipped with a line saying so
#      when TensorRT is not installed;
# and prints the wall time and torch.cuda.max_memory_allocated of every step. Any failure stops it with a non-zero
# exit status. Everything it prints goes to OUT_DIR/gpu_check.log; the runs stay in OUT_DIR.
#
# Environment: GPU_CHECK_DEVICE=cpu runs the same steps on the CPU with tiny budgets (a dry run of this script,
# exercised by tests/scripts/test_gpu_check.py); GPU_CHECK_METHODS (default "efficientdm mpqdm"),
# GPU_CHECK_PYTEST=0 / GPU_CHECK_CIN=0 / GPU_CHECK_TRT=0 skip steps 2 / 4 / 5 (4 and 5 run only on CUDA);
# PYTHON (default python) is the interpreter.
set -euo pipefail

OUT=${1:-gpu_check_out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
METHODS=${GPU_CHECK_METHODS:-efficientdm mpqdm}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python; fi
case "$DEVICE" in
  cuda*) CUDA=1 ;;
  cpu) CUDA=0 ;;
  *) echo "error: GPU_CHECK_DEVICE must be cuda, cuda:N or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
RUN_PYTEST=${GPU_CHECK_PYTEST:-1}
RUN_CIN=${GPU_CHECK_CIN:-$CUDA}
RUN_TRT=${GPU_CHECK_TRT:-$CUDA}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
export GPU_CHECK_MEASURE_FILE="$OUT/measure.txt"  # every [measure] line is also appended here
: > "$GPU_CHECK_MEASURE_FILE"
cd "$REPO"

banner() { printf '\n=== %s\n' "$*"; }
# one measured step: [measure] line with wall time, peak CUDA memory and peak RSS (benchmarks/finetune_cost.py)
step() { "$PY" benchmarks/finetune_cost.py --measure "$@"; }

main() {

set -euo pipefail
if [ "$CUDA" = 1 ]; then  # tiny budgets on the CPU; short but real ones on a GPU
  CALIB=(--calib_steps 50 --calib_batch 8); NAIVE=(--n_calib 32 --train_steps 20)
  TUNE=(--epochs 4 --batch_size 8); SAMPLE=(--n_samples 200 --batch_size 100); REF=digits-train
else
  CALIB=(--calib_steps 4 --calib_batch 2); NAIVE=(--n_calib 8 --train_steps 4 --lora_rank 4)
  TUNE=(--epochs 1 --batch_size 2); SAMPLE=(--n_samples 8 --batch_size 8); REF=digits-heldout
fi
START=$SECONDS

banner "1. versions (device $DEVICE)"
"$PY" - "$DEVICE" <<'EOF'
import sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA runtime {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if sys.argv[1].startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("error: GPU_CHECK_DEVICE is cuda, but torch.cuda.is_available() is False")
    from ldm.util import resolve_device
    device = resolve_device(sys.argv[1])
    print(f"device {device}: {torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} visible")
EOF
if [ "$CUDA" = 1 ]; then nvidia-smi; fi

if [ "$RUN_PYTEST" = 1 ]; then
  banner "2. CUDA-relevant tests (MPQDM_TEST_DEVICE=$DEVICE)"
  MPQDM_TEST_DEVICE=$DEVICE "$PY" -m pytest -q -p no:cacheprovider tests/ldm/test_cli.py tests/quant/test_lora.py \
    tests/quant/test_layers.py tests/quant/test_quantizer.py
fi

banner "3. digits model, quant_scripts 01 -> 06 on $DEVICE"
for METHOD in $METHODS; do
  if [ "$METHOD" = mpqdm ]; then BITS=(--n_bits_w 2 --n_bits_a 4); LR=(--lora_lr_scale 0.1)
  else BITS=(--n_bits_w 4 --n_bits_a 8); LR=(); fi
  RUN="$OUT/digits-$METHOD"
  rm -rf "$RUN"
  P=(--preset digits --run_dir "$RUN" --device "$DEVICE" --no_progress)
  echo "--- $METHOD ${BITS[*]}"
  step quant_scripts/01_collect_input_4_calib.py "${P[@]}" "${CALIB[@]}"
  step quant_scripts/02_quantize_ldm_naive.py "${P[@]}" --method "$METHOD" "${BITS[@]}" "${NAIVE[@]}"
  step quant_scripts/03_train_mpqdm.py "${P[@]}" "${TUNE[@]}" "${LR[@]}" --preview_every 0
  step quant_scripts/04_sample_lora_model.py "${P[@]}" "${SAMPLE[@]}" --seed 0
  step quant_scripts/05_evaluate.py "$REF" "$RUN/samples.npz" --extractor digits --device "$DEVICE" --no-progress
  step quant_scripts/06_export_packed.py "${P[@]}"
  step quant_scripts/04_sample_lora_model.py "${P[@]}" "${SAMPLE[@]}" --seed 0 --from_export "$RUN/export.safetensors" \
    --out "$RUN/packed.npz"
  "$PY" - "$RUN" <<'EOF'
import json, sys
m = json.load(open(f"{sys.argv[1]}/samples.metrics.json"))["metrics"]
print("metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float)))
EOF
done

if [ "$RUN_CIN" = 1 ]; then
  banner "4. cin256-v2-size random-weight smoke, 01 -> 04 on $DEVICE"
  "$PY" benchmarks/finetune_cost.py --cin_smoke --device "$DEVICE" --work_dir "$OUT/cin_smoke"
fi

banner "5. TensorRT INT8 engine (cin256-v2 size, Q/DQ ONNX)"
if [ "$RUN_TRT" != 1 ]; then
  echo "skipped (runs on CUDA only; GPU_CHECK_TRT=1 forces it)"
elif ! "$PY" -c "import tensorrt" 2>/dev/null; then
  echo "skipped: TensorRT is not installed (pip install -e \".[tensorrt]\")"
else
  step benchmarks/engine_speed.py --tensorrt --settings edm-w8a8 --work_dir "$OUT/engine"
fi

banner "summary (device $DEVICE, $((SECONDS - START)) s in total)"
sed 's/^\[measure\] //' "$GPU_CHECK_MEASURE_FILE"
if grep -qv 'exit 0,' "$GPU_CHECK_MEASURE_FILE"; then
  echo "gpu_check: a step failed"; return 1
fi
echo "gpu_check: OK"
}

set +e
main 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then echo "gpu_check: FAILED (exit $status); log: $LOG" | tee -a "$LOG"; fi
exit "$status"
