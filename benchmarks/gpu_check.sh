#!/usr/bin/env bash
# One command for a GPU machine: the tests that run on CUDA (tests/test_cuda.py and Lightning's
# FSDPStrategy test), benchmarks/llm_scale.py (GPT-2 small and a Llama shape, default and MLP
# layers) and the sequence workload of benchmarks/speed.py on the GPU, each step under a time
# limit, under 10 minutes in all. Every log and result file lands in one folder, with
# summary.md listing each step's outcome.
#
#   benchmarks/gpu_check.sh                 # on a GPU machine, from anywhere in the checkout
#   benchmarks/gpu_check.sh --cpu           # the same steps on the CPU at smoke sizes (< 1 min)
#   OUT=/folder PYTHON=.venv/bin/python LLAMA_LAYERS=8 benchmarks/gpu_check.sh
#
# Output folder: --out DIR, else $OUT, else gpu_check_out/ (relative to the repository root).
# Python: $PYTHON, else python3; it needs torch (a CUDA build on a GPU) and the project's
# dependencies (`pip install -e ".[dev,hf]"`); nothing is installed here. Kronfluence joins the
# benchmark where it is importable. GPU_CHECK_CPU=1 is the same as --cpu.
# Exit status: 0 when every step passed (a step whose optional package is missing is skipped),
# 1 when one failed or ran out of time, 2 on bad arguments.
set -u -o pipefail
cd "$(dirname "$0")/.."

mode=gpu
out="${OUT:-gpu_check_out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,18p' "$0" | cut -c3-; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then mode=cpu; fi
python="${PYTHON:-python3}"
threads=$(nproc 2>/dev/null || echo 2)
if [ "$threads" -gt 8 ]; then threads=8; fi
mkdir -p "$out"
summary="$out/summary.md"
failures=0
began=$SECONDS
export WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore

printf '# GPU check (%s mode), %s\n\n| step | outcome | seconds | log |\n|---|---|---:|---|\n' \
  "$mode" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$summary"

record() {  # record NAME OUTCOME SECONDS
  echo "| $1 | $2 | $3 | $1.log |" >> "$summary"
  echo "== $1: $2 ($3 s)"
}

step() {  # step NAME LIMIT COMMAND...: the command under a time limit, its output in NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc outcome
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) outcome=passed ;;
    124|137) outcome="timed out after ${limit} s"; failures=$((failures + 1)) ;;
    *) outcome="failed (exit $rc)"; failures=$((failures + 1)) ;;
  esac
  tail -n 25 "$out/$name.log"
  record "$name" "$outcome" $((SECONDS - t0))
}

importable() { "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

# ------------------------------------------------------------------ the machine
step device 60 "$python" - "$mode" <<'EOF'
import platform, sys
import torch
mode = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, {torch.get_num_threads()} CPU threads")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
              f"compute capability {p.major}.{p.minor}")
elif mode == "gpu":
    sys.exit("No CUDA device is visible to this torch (a CPU build, or no GPU): run "
             "benchmarks/gpu_check.sh --cpu for the CPU path.")
from importlib.util import find_spec
missing = [name for name in ("lightning_influence", "pytest", "pytorch_lightning", "hydra",
                             "transformers", "kronfluence") if find_spec(name) is None]
print("not installed: " + (", ".join(missing) if missing else "nothing"))
EOF
if [ "$mode" = gpu ] && ! grep -q "^cuda:0" "$out/device.log"; then
  echo "gpu_check.sh: no CUDA device; see $out/device.log" >&2
  exit 1
fi

# ------------------------------------------------------------------ tests
# test_cuda.py runs on LIGHTNING_INFLUENCE_TEST_DEVICE (the CPU in --cpu mode); Lightning's
# FSDPStrategy test needs CUDA (NCCL) and is skipped on the CPU
if importable pytest; then
  device=cuda; if [ "$mode" = cpu ]; then device=cpu; fi
  step tests $([ "$mode" = gpu ] && echo 150 || echo 240) \
    env LIGHTNING_INFLUENCE_TEST_DEVICE=$device "$python" -m pytest -p no:cacheprovider -v -rs \
    --junitxml="$out/tests.xml" tests/test_cuda.py \
    tests/test_fsdp.py::test_fsdp_factors_equal_the_unsharded_ones
else
  record tests "skipped (pytest is not importable)" 0
fi

# ------------------------------------------------------------------ benchmarks
if importable transformers; then
  if [ "$mode" = gpu ]; then
    step llm_scale 300 "$python" benchmarks/llm_scale.py --device cuda --model both \
      --selection both --layers "${LLAMA_LAYERS:-4}" --threads "$threads" --out "$out"
  else
    step llm_scale 180 "$python" benchmarks/llm_scale.py --smoke --device cpu --isolation none \
      --sequences 8 --threads 1 --out "$out"
  fi
else
  record llm_scale "skipped (transformers is not importable)" 0
fi

if [ "$mode" = gpu ]; then
  step speed 90 "$python" benchmarks/speed.py --workload sequence --device cuda \
    --seq-chunks 4096 --repeats 3 --threads "$threads" --out "$out"
else
  step speed 180 "$python" benchmarks/speed.py --workload sequence --device cpu \
    --seq-chunks 64 --repeats 1 --threads 1 --out "$out"
fi

echo >> "$summary"
echo "$failures step(s) failed; $((SECONDS - began)) s in all. Results: llm_scale.md, speed_sequence.md; tests: tests.xml." >> "$summary"
echo
cat "$summary"
if [ "$failures" -gt 0 ]; then exit 1; fi
