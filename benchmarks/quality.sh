#!/usr/bin/env bash
# The "which method should I use?" study (docs/quality.md), in one command:
#
#     bash benchmarks/quality.sh --quick      # one task, one seed, short runs (the smoke preset)
#     bash benchmarks/quality.sh              # the full study: 3 tasks x 11 methods x 3 seeds
#
# Options: --root DIR (the study folder; default benchmarks/quality/runs-<preset>, ignored by
# git), --report-dir DIR (default docs/quality), --tasks a,b (train only these tasks' runs;
# the report still lists the others as missing), --report-only.
#
# Resumable: each run has its own folder; a run whose final output exists is skipped, a
# half-done one continues with `burn-peft train --resume` (a checkpoint every few steps, only
# the newest kept, and none once the run has finished: a full fine-tuning checkpoint is 1.6 GB;
# the full study's outputs take about 16 GB of disk, most of it the full runs' models), a
# run's test scoring is redone only when its files are missing. Interrupt it at any time and
# run the same command again; the report (re-written at the end of every invocation) covers
# whatever has finished and lists the rest.
#
# The full study's folder is the study's record and git keeps it (.gitignore): each run's
# files below, run.toml, `trained` (the finish time) and out/metrics.jsonl, but not the
# models, checkpoints or the splits' copies. A clone therefore carries the finished runs: the
# study continues in it where it was committed (a run that still needs its model, a sweep
# winner not yet scored on the test split, is trained again), and `--report-only` rebuilds
# the report from it.
#
# Per run it records: train.log (the trainable count), time-train.txt (/usr/bin/time -v, peak
# memory; skipped if /usr/bin/time is absent), wall.tsv (seconds and the 1-minute load average
# at the start of each segment), test_eval.json and test_predictions.jsonl (`burn-peft eval`
# on the held-out test split).
set -euo pipefail
cd "$(dirname "$0")/.."

preset=full
root=""
report_dir=docs/quality
tasks=""
report_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) preset=quick ;;
        --root) root="$2"; shift ;;
        --report-dir) report_dir="$2"; shift ;;
        --tasks) tasks="$2"; shift ;;
        --report-only) report_only=1 ;;
        *) echo "usage: bash benchmarks/quality.sh [--quick] [--root DIR] [--report-dir DIR] [--tasks a,b] [--report-only]" >&2; exit 2 ;;
    esac
    shift
done
root="${root:-benchmarks/quality/runs-$preset}"
mkdir -p "$root"
target="${CARGO_TARGET_DIR:-target}"
features=()
if grep -q avx512f /proc/cpuinfo 2>/dev/null; then features=(--features x86-v4); fi

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$root/driver.log"; }

python3 scripts/fetch_smollm2.py >/dev/null
# One invocation, so both binaries share one feature resolution (burn is built once).
cargo build --release -p peft-cli -p burn-peft-examples --bin burn-peft --example quality_report "${features[@]}"
bin="$target/release/burn-peft"
report="$target/release/examples/quality_report"
data=benchmarks/quality/data

log "start: preset $preset, uptime:$(uptime)"
started=$(date +%s)

wanted() { [ -z "$tasks" ] || [[ ",$tasks," == *",$1,"* ]]; }

elapsed() { echo "$(( $(date +%s%N) / 1000000 - $1 ))" | awk '{printf "%.1f", $1 / 1000}'; }

# Train the run in $1 (phase $3) unless it is done; resume a half-done one. Done: its final
# output $2 exists, or its `trained` marker does (the committed record of a run, whose model is
# not committed) and nothing still needs the model (a sweep run, or a study run already
# scored). A run whose checkpoints are gone (a fresh clone) starts again from nothing.
train_run() {
    local dir="$root/$1" marker="$2" phase="$3"
    [ -e "$dir/$marker" ] && return 0
    if [ -e "$dir/trained" ] && { [ "$phase" = sweep ] || [ -s "$dir/test_eval.json" ]; }; then
        return 0
    fi
    local resume=()
    if compgen -G "$dir/out/checkpoints/step-*" >/dev/null; then
        resume=(--resume)
    else
        rm -rf "$dir/out" "$dir/trained" "$dir/train.log" "$dir/wall.tsv" "$dir/time-train.txt" \
            "$dir/test_eval.json" "$dir/test_predictions.jsonl" "$dir/test.log"
    fi
    local t0 load
    t0=$(( $(date +%s%N) / 1000000 )); load=$(cut -d' ' -f1 /proc/loadavg)
    local timer=()
    if [ -x /usr/bin/time ]; then timer=(/usr/bin/time -v -a -o "$dir/time-train.txt"); fi
    log "train $1 ${resume[*]}"
    if "${timer[@]}" "$bin" train --config "$dir/run.toml" "${resume[@]}" >>"$dir/train.log" 2>&1; then
        printf 'train\t%s\t%s\n' "$(elapsed "$t0")" "$load" >>"$dir/wall.tsv"
        # A finished run needs no checkpoint (a full fine-tuning one is 1.6 GB).
        rm -rf "$dir/out/checkpoints"
        date -u +%FT%TZ >"$dir/trained"
    else
        printf 'train-failed\t%s\t%s\n' "$(elapsed "$t0")" "$load" >>"$dir/wall.tsv"
        log "FAILED: $1 (see $dir/train.log): $(tail -n 1 "$dir/train.log")"
        return 1
    fi
}

# Score the finished run in $1 on its task's held-out test split.
test_run() {
    local dir="$root/$1" task="$2"
    [ -s "$dir/test_eval.json" ] && [ -s "$dir/test_predictions.jsonl" ] && return 0
    local t0 load
    t0=$(( $(date +%s%N) / 1000000 )); load=$(cut -d' ' -f1 /proc/loadavg)
    log "test  $1"
    if "$bin" eval --config "$dir/run.toml" --eval-file "$root/data/$task/test.jsonl" \
        --predictions "$dir/test_predictions.jsonl" >"$dir/test_eval.json.tmp" 2>>"$dir/test.log"; then
        mv "$dir/test_eval.json.tmp" "$dir/test_eval.json"
        printf 'test\t%s\t%s\n' "$(elapsed "$t0")" "$load" >>"$dir/wall.tsv"
    else
        log "FAILED: test of $1 (see $dir/test.log)"
        return 1
    fi
}

# Run every line of plan file $1 (folder, marker, phase, task, ...); test-score study runs.
run_plan() {
    local failed=0
    while IFS=$'\t' read -r dir marker phase task _; do
        wanted "$task" || continue
        train_run "$dir" "$marker" "$phase" || { failed=1; continue; }
        if [ "$phase" = study ]; then test_run "$dir" "$task" || failed=1; fi
    done <"$1"
    return $failed
}

status=0
# The sweep's plan also copies the tasks' splits into the study folder (the report reads them).
plan=$("$report" plan --preset "$preset" --phase sweep --root "$root" --data "$data")
if [ "$report_only" = 0 ]; then
    run_plan "$plan" || status=1
    if plan=$("$report" plan --preset "$preset" --phase study --root "$root" --data "$data"); then
        run_plan "$plan" || status=1
    else
        status=1
    fi
fi
md=$("$report" report --preset "$preset" --root "$root" --out-dir "$report_dir")
log "done in $(( $(date +%s) - started )) s (this invocation), uptime:$(uptime); report: $md"
exit $status
