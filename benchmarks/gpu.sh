python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
# One-shot GPU benchmark of clipserve (benchmarks/gpu_bench.py) on a lent NVIDIA H200.
#
# Call it with the device tool's `run`, in ONE call:
#     carry: [".whl"]    command: bash benchmarks/gpu.sh    timeout_s: 480
# .whl/ is ignored by git (.git/info/exclude has /.whl/), so a fresh checkout lacks it; make it here
# (about 6 MiB) with, in the repo root:
#     P="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform \
#        manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp $P -d .whl -r benchmarks/gpu-wheels.txt
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp $P -d .whl/fallback typing-extensions==4.16.0
# benchmarks/gpu-wheels.txt lists what the machine lacks (fastapi, starlette, pydantic, uvicorn,
# open_clip_torch...); they are installed above with --no-deps into /tmp/site, and clipserve runs
# from src/. .whl/fallback/ holds a newer copy of a package the machine has (pydantic 2.14 needs
# typing-extensions >= 4.16), installed only if the imports below fail with the machine's own.
# The benchmark's whole budget is about 6 minutes (each cell bounded); the table is printed a row
# at a time and, when $OUT is set, lands in $OUT/gpu.md (stdout) with stderr in $OUT/gpu.err.
# Elsewhere: `bash benchmarks/gpu.sh` after downloading .whl/ as the device README says, or
# `.venv/bin/python benchmarks/gpu_bench.py --quick --device cpu` for a CPU smoke run.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
set -o pipefail
md=/dev/null err=/dev/null
if [ -n "${OUT:-}" ]; then md=$OUT/gpu.md err=$OUT/gpu.err; fi

check='import clipserve.cli, clipserve.api.app, clipserve.bench, open_clip, uvicorn, httptools'
if ! python3 -c "$check" 2>/tmp/import.err; then
    echo "imports failed with the machine's packages:"; tail -5 /tmp/import.err
    if compgen -G '.whl/fallback/*.whl' >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/fallback/*.whl || exit
        python3 -c "$check" || exit
        echo "imports work with .whl/fallback/"
    else
        exit 1
    fi
fi

{
    echo "# clipserve GPU benchmark ($(date -u +%FT%TZ))"
    echo
    echo '```'
    nvidia-smi -L 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    python3 - <<'EOF'
import sys
from importlib.metadata import version

import torch

print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, "
      f"cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
      f"cuda available: {torch.cuda.is_available()}")
names = ("torchvision", "open_clip_torch", "timm", "fastapi", "starlette", "pydantic",
         "uvicorn", "httpx", "typing_extensions", "anyio", "pillow", "numpy")
print(", ".join(f"{n} {version(n)}" for n in names))
EOF
    # Requirement conflicts of the carried wheels with the machine's packages (informational).
    python3 -m pip check 2>&1 | grep -iE 'fastapi|starlette|pydantic|uvicorn|open-clip|ftfy|limits|typing-inspection|opentelemetry|deprecated' || true
    echo '```'
    echo
} 2>&1 | tee "$md"

timeout -k 15 375 python3 benchmarks/gpu_bench.py --budget 330 "$@" 2> >(tee "$err" >&2) | tee -a "$md"
rc=$?
[ "$rc" = 124 ] && echo "gpu_bench.py ran past its 375 s limit" | tee -a "$md"
exit "$rc"
