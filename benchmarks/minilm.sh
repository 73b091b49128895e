#!/usr/bin/env bash
# Both sides of the MiniLM benchmark in one run, then the ratios.
# Needs: the model (python3 scripts/fetch_minilm.py) and a Python with torch, transformers, peft
# (PYTHON=/path/to/venv/bin/python). The Rust side uses flex's AVX-512 gemm (x86-v4) and glibc
# malloc tunables that keep freed buffers (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-$(python3 -c 'import os,pathlib; print(os.environ.get("BURN_PEFT_MINILM") or pathlib.Path(os.environ.get("BURN_PEFT_CACHE") or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home()/".cache")/"burn-peft")/"all-MiniLM-L6-v2")')}
FEATURES=${FEATURES:-x86-v4}
out=$(mktemp -d)
cargo build --release --example bench_minilm --features "$FEATURES"
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 \
    target/release/examples/bench_minilm --model "$MODEL" --json "$out/burn.json" "$@"
"$PYTHON" benchmarks/minilm_pytorch.py --model "$MODEL" --json "$out/torch.json"
python3 - "$out/burn.json" "$out/torch.json" <<'PY'
import json, sys
b, t = (json.load(open(p)) for p in sys.argv[1:3])
rows = [("full fine-tuning step", b["full_ft_ms"], t["full_ft_ms"]),
        ("LoRA step, activation space vs PEFT", b["lora_activation_ms"], t["peft_lora_ms"]),
        ("LoRA step, weight space vs PEFT", b["lora_weight_ms"], t["peft_lora_ms"]),
        ("eval forward", b["eval_forward_ms"], t["eval_forward_ms"])]
print(f"\n{'':40} {'burn ms':>9} {'torch ms':>9} {'ratio':>6}")
for name, x, y in rows:
    if x is None or y is None:  # a variant left out with --only
        continue
    print(f"{name:40} {x:9.0f} {y:9.0f} {x / y:6.2f}")
PY
