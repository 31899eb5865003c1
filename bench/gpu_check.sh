#!/usr/bin/env bash
# Every GPU check in one command, for the short loans of a GPU machine: the gpu-marked tests (the trainer's
# co-located runs with the transformers engine, and, where SGLang and Transformer Engine are installed, their
# adapters), the GPU bench suite (section 7) and some single-process tests (which then run on CUDA). Logs and
# results go to $1.
#
#     bash bench/gpu_check.sh [OUT_DIR]        (default runs/gpu_check)
#
# Each part has its own time limit, so that one hang still leaves the others' results.
set -uo pipefail
out=${1:-runs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the tools import megatron_gopd from here
python=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c "import torch, megatron.core, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)"
  "$python" -c "import transformer_engine; print('transformer_engine', transformer_engine.__version__)" 2>&1 | tail -1
  "$python" -c "import sglang; print('sglang', sglang.__version__)" 2>&1 | tail -1
} | tee "$out/env.txt"

timeout 200 "$python" -m pytest -q -rA -m gpu -k "not sglang" tests 2>&1 | tee "$out/pytest_gpu.log"
# SGLang's own (they skip without the package): its flattened-bucket reader, the engine against transformers, a
# real server as teacher, and a co-located SGLang trainer run; each engine start takes a minute or more
timeout 420 "$python" -m pytest -q -rA -m gpu -k sglang tests 2>&1 | tee "$out/pytest_gpu_sglang.log"
timeout 240 "$python" bench/run.py --only gpu --out "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
# one-process tests only, on CUDA (the suite hides the GPU from non-gpu tests unless asked): several ranks cannot
# share one GPU under NCCL
MEGATRON_GOPD_TEST_CUDA=1 timeout 150 "$python" -m pytest -q -rA "tests/test_rollout.py::test_engine_matches_megatron_student_before_and_after_a_step[1]" \
  tests/test_objectives.py::test_grpo_raises_the_verifier_reward tests/test_objectives.py::test_sft_fits_the_dataset_responses \
  2>&1 | tee "$out/pytest_single_process.log"
