#!/usr/bin/env bash
# Both sides of the MiniLM benchmark, interleaved, then the ratios.
#
#   PAIRS=3 STEPS=4 bash benchmarks/minilm.sh [bench_minilm flags, e.g. --only activation,eval]
#
# Runs PAIRS pairs of rounds: one round of the Rust side (examples/bench_minilm.rs), then one of
# PyTorch + PEFT (benchmarks/minilm_pytorch.py), each timing STEPS steps per variant, so that both
# sides see the same machine load; prints each pair's ratios and the ratios of the medians.
# Needs: the model (python3 scripts/fetch_minilm.py) and a Python with torch, transformers, peft
# (PYTHON=/path/to/venv/bin/python). The Rust side uses flex's AVX-512 gemm (x86-v4) and glibc
# malloc tunables that keep freed buffers (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-$(python3 -c 'import os,pathlib; print(os.environ.get("BURN_PEFT_MINILM") or pathlib.Path(os.environ.get("BURN_PEFT_CACHE") or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home()/".cache")/"burn-peft")/"all-MiniLM-L6-v2")')}
FEATURES=${FEATURES:-x86-v4}
PAIRS=${PAIRS:-3}
STEPS=${STEPS:-4}
out=$(mktemp -d)
cargo build --release --example bench_minilm --features "$FEATURES"
for i in $(seq "$PAIRS"); do
    echo "== pair $i of $PAIRS"
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 \
        target/release/examples/bench_minilm --model "$MODEL" --rounds 1 --steps "$STEPS" \
        --json "$out/burn$i.json" "$@"
    "$PYTHON" benchmarks/minilm_pytorch.py --model "$MODEL" --rounds 1 --steps "$STEPS" \
        --json "$out/torch$i.json"
done
python3 - "$out" "$PAIRS" <<'PY'
import json, statistics, sys
out, pairs = sys.argv[1], int(sys.argv[2])
rows = [("full fine-tuning step", "full_ft_ms", "full_ft_ms"),
        ("LoRA step, activation space vs PEFT", "lora_activation_ms", "peft_lora_ms"),
        ("LoRA step, weight space vs PEFT", "lora_weight_ms", "peft_lora_ms"),
        ("eval forward", "eval_forward_ms", "eval_forward_ms")]
burn = [json.load(open(f"{out}/burn{i}.json")) for i in range(1, pairs + 1)]
torch = [json.load(open(f"{out}/torch{i}.json")) for i in range(1, pairs + 1)]
print(f"\n{'':40} {'burn ms':>9} {'torch ms':>9} {'ratio':>6}   ratio per pair")
for name, bk, tk in rows:
    xs, ys = [b[bk] for b in burn], [t[tk] for t in torch]
    if any(x is None for x in xs):  # a variant left out with --only
        continue
    x, y = statistics.median(xs), statistics.median(ys)
    per_pair = " ".join(f"{a / b:.2f}" for a, b in zip(xs, ys))
    print(f"{name:40} {x:9.0f} {y:9.0f} {x / y:6.2f}   {per_pair}")
PY
