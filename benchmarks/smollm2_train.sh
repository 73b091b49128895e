#!/usr/bin/env bash
# Tokens/s of a LoRA training step on SmolLM2-135M-Instruct: burn-peft (`burn-peft train` as a
# library call, examples/bench_smollm2_train.rs) against transformers + PEFT
# (benchmarks/smollm2_train.py), interleaved, then the ratios.
#
#   PYTHON=/path/to/venv/bin/python PAIRS=3 SHAPES=4x128,1x512 WARMUP=2 STEPS=5 THREADS=2 \
#       bash benchmarks/smollm2_train.sh
#
# Runs PAIRS pairs of rounds: one round of the Rust side, then one of PyTorch, each a fresh model
# doing WARMUP untimed and STEPS timed steps per shape (BATCHxSEQ), so that both sides see the
# same machine load; prints each pair's ratio and the ratio of the medians (burn-peft tokens/s
# over PyTorch's: above 1 is faster). Needs the model (python3 scripts/fetch_smollm2.py) and a
# Python with torch, transformers, gguf and peft. BIN=path skips the build and times that binary.
# On a shared machine, OMP_WAIT_POLICY=PASSIVE (read by the Python side only) keeps PyTorch's
# OpenMP threads from spinning against the other load (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FEATURES=${FEATURES:-x86-v4}
PAIRS=${PAIRS:-3}
SHAPES=${SHAPES:-4x128,1x512}
WARMUP=${WARMUP:-2}
STEPS=${STEPS:-5}
THREADS=${THREADS:-2}
python3 scripts/fetch_smollm2.py >/dev/null
MODEL=$(python3 -c 'import runpy,sys; sys.argv=["x"]; print(runpy.run_path("scripts/fetch_smollm2.py")["default_dest"]())')
if [ -z "${BIN:-}" ]; then
    cargo build --release -q --example bench_smollm2_train --features "$FEATURES"
    BIN="${CARGO_TARGET_DIR:-target}/release/examples/bench_smollm2_train"
fi
out=$(mktemp -d)
for i in $(seq "$PAIRS"); do
    echo "== pair $i of $PAIRS"
    "$BIN" --model "$MODEL" --shapes "$SHAPES" --rounds 1 --warmup "$WARMUP" --steps "$STEPS" \
        --threads "$THREADS" --json "$out/burn$i.json" 2>/dev/null | grep "round [0-9]"
    "$PYTHON" benchmarks/smollm2_train.py --gguf "$MODEL" --shapes "$SHAPES" --rounds 1 \
        --warmup "$WARMUP" --steps "$STEPS" --threads "$THREADS" --json "$out/torch$i.json" \
        2>/dev/null | grep "round [0-9]"
done
python3 - "$out" "$PAIRS" "$SHAPES" "$THREADS" <<'PY'
import json, statistics, sys
out, pairs, shapes, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
burn = [json.load(open(f"{out}/burn{i}.json")) for i in range(1, pairs + 1)]
torch = [json.load(open(f"{out}/torch{i}.json")) for i in range(1, pairs + 1)]
print(f"\nLoRA training step, tokens/s, {threads} threads, medians of {pairs} pairs")
print(f"{'batch x seq':12} {'burn-peft':>10} {'PyTorch':>10} {'ratio':>6}   ratio per pair")
for s in shapes:
    xs, ys = [b[s]["tokens_per_s"] for b in burn], [t[s]["tokens_per_s"] for t in torch]
    x, y = statistics.median(xs), statistics.median(ys)
    per_pair = " ".join(f"{a / b:.2f}" for a, b in zip(xs, ys))
    print(f"{s:12} {x:10.0f} {y:10.0f} {x / y:6.2f}   {per_pair}")
PY
