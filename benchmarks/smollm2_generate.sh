#!/usr/bin/env bash
# SmolLM2-135M-Instruct generation speed, three sides in one run on the same threads:
# burn-peft (`burn-peft generate`: `--base f32`, the GGUF file dequantized to f32, and
# `--base gguf`, its Q4_1 / Q8_0 blocks kept packed), transformers (float32) and llama.cpp
# (llama-cpp-python, Q4_1 blocks kept packed).
#
#   PYTHON=.venv/bin/python THREADS=2 ROUNDS=3 bash benchmarks/smollm2_generate.sh
#
# PYTHON must have torch, transformers, gguf and llama-cpp-python (see docs/benchmarks.md for how
# llama-cpp-python is built on these CPUs). Prefill: one forward over 512 prompt tokens;
# decode: 128 greedy tokens after the chat prompt. BIN=path skips the build and times that binary.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
FEATURES=${FEATURES:-x86-v4}
python3 scripts/fetch_smollm2.py >/dev/null
MODEL=$(python3 -c 'import runpy,sys; sys.argv=["x"]; print(runpy.run_path("scripts/fetch_smollm2.py")["default_dest"]())')
if [ -z "${BIN:-}" ]; then
    cargo build --release -q -p peft-cli --features "$FEATURES"
    BIN="${CARGO_TARGET_DIR:-target}/release/burn-peft"
fi
TEXT=$("$PYTHON" benchmarks/smollm2_generate.py --side prefill-text --gguf "$MODEL" 2>/dev/null)
export RAYON_NUM_THREADS=$THREADS
# Three burn-peft sides: the f32 model, the GGUF blocks kept packed (decoding steps on 8-bit
# activations, as llama.cpp), and the same with f32 activations.
for round in $(seq "$ROUNDS"); do
    for side in f32 gguf gguf-f32-activations; do
        case "$side" in
            f32) flags=(--base f32) ;;
            gguf) flags=(--base gguf) ;;
            *) flags=(--base gguf --f32-activations) ;;
        esac
        prefill=$("$BIN" generate --model "$MODEL" "${flags[@]}" --prompt "$TEXT" \
            --max-new-tokens 1 2>&1 >/dev/null \
            | sed -n 's/.*prefill: \([0-9.]*\) tokens\/s.*/\1/p')
        decode=$("$BIN" generate --model "$MODEL" "${flags[@]}" --chat --max-new-tokens 128 \
            --prompt "Tell me a long story about a lighthouse keeper." 2>&1 >/dev/null \
            | sed -n 's/.*decode: \([0-9.]*\) tokens\/s.*/\1/p')
        echo "burn-peft base=$side round prefill_tok_s=$prefill decode_tok_s=$decode"
    done
done
"$PYTHON" benchmarks/smollm2_generate.py --side transformers --gguf "$MODEL" --threads "$THREADS" \
    --rounds "$ROUNDS" 2>/dev/null | grep round
"$PYTHON" benchmarks/smollm2_generate.py --side llamacpp --gguf "$MODEL" --threads "$THREADS" \
    --rounds "$ROUNDS" 2>/dev/null | grep round
