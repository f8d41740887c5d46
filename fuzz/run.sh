#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer on the stable toolchain and runs each one for
# SECONDS (default 60) on its committed corpus. Exits non-zero when a target crashes;
# the crashing input is left in fuzz/artifacts/TARGET/.
#
#   fuzz/run.sh [SECONDS] [TARGET...]   build, then run each target (all by default)
#   fuzz/run.sh --build                 only build
#   fuzz/run.sh --seed                  rewrite the seed inputs fuzz/corpus/*/seed-*
#   fuzz/run.sh --merge [TARGET...]     add to fuzz/corpus/TARGET the inputs of the last
#                                       runs (fuzz/target/work/TARGET) that reach new
#                                       edges (libFuzzer's -merge=1 -set_cover_merge=1)
#   fuzz/run.sh --repro TARGET FILE     run one input (a crash) through its target
#
# New inputs a run finds go to fuzz/target/work/TARGET (not committed); the committed
# corpus is only read. Environment: FUZZ_JOBS (cargo -j, default 1), FUZZ_ARGS (extra
# libFuzzer flags, e.g. "-max_len=4096").
set -euo pipefail
cd "$(dirname "$0")"

TARGETS=(control media bootstrap topology scenario tree http_head datapath)
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
BIN="target/$TRIPLE/release"

# Sanitizer coverage on stable rustc: what cargo-fuzz passes, minus the nightly-only
# -Zsanitizer. 8-bit counters and the PC table drive libFuzzer's coverage feedback;
# trace-compares lets it solve comparisons (magic numbers, version bytes, ids).
# --cfg fuzzing is what libfuzzer-sys expects. Debug assertions and overflow checks stay
# on, so an arithmetic overflow is a crash too.
# --target keeps these flags off build scripts and proc macros (serde_derive).
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"

build() {
    cargo build -j "${FUZZ_JOBS:-1}" --release --target "$TRIPLE" --bins
}

# Max input length per target: control datagrams and bootstrap frames are bounded by
# the decoders (16 KiB, 4 + 64 KiB); text files are kept short so mutations stay cheap.
max_len() {
    case "$1" in
        media) echo 1600 ;;
        control) echo 17000 ;;
        bootstrap) echo 70000 ;;
        *) echo 8192 ;;
    esac
}

run_one() {
    local t="$1" secs="$2"
    mkdir -p "corpus/$t" "artifacts/$t" "target/work/$t"
    echo "== fuzz $t for ${secs}s (corpus: $(ls "corpus/$t" | wc -l) inputs)"
    # shellcheck disable=SC2086
    "$BIN/$t" "target/work/$t" "corpus/$t" \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 ${FUZZ_ARGS:-} \
        2>"target/work/$t.log" || {
        echo "!! $t crashed; see fuzz/target/work/$t.log and fuzz/artifacts/$t/" >&2
        grep -E -A25 "panicked|ERROR|deadly signal" "target/work/$t.log" | head -60 >&2
        return 1
    }
    # Coverage when the corpus was loaded, and at the end: the growth in between is
    # libFuzzer's coverage feedback at work.
    sed -n -E 's/^#([0-9]+)[[:space:]]+(INITED|DONE)[[:space:]]+cov: ([0-9]+) ft: ([0-9]+) corp: ([0-9]+).*/   \2: edges \3, features \4, corpus \5/p' \
        "target/work/$t.log"
    grep -E "stat::(number_of_executed_units|average_exec_per_sec)" "target/work/$t.log" |
        sed -E 's/^stat::/   /; s/ +/ /g'
}

case "${1:-}" in
    --build)
        build
        exit 0
        ;;
    --seed)
        env -u RUSTFLAGS cargo run -j "${FUZZ_JOBS:-1}" -q -p ott-fuzz-seeds
        exit 0
        ;;
    --merge)
        shift
        build
        for t in "${@:-${TARGETS[@]}}"; do
            [ -d "target/work/$t" ] || continue
            # Set cover over edges (no hit counts): the fewest inputs that keep every
            # edge reached, so the committed corpus stays small.
            "$BIN/$t" -merge=1 -set_cover_merge=1 -use_counters=0 "corpus/$t" "target/work/$t" \
                -max_len="$(max_len "$t")" \
                2>&1 | grep -E "MERGE-OUTER: [0-9]+ new files" || true
        done
        exit 0
        ;;
    --repro)
        build
        "$BIN/$2" "$3"
        exit $?
        ;;
esac

SECS="${1:-60}"
shift || true
case "$SECS" in
    '' | *[!0-9]*)
        echo "usage: fuzz/run.sh [SECONDS] [TARGET...]" >&2
        exit 2
        ;;
esac
build
failed=()
run=("${@:-${TARGETS[@]}}")
for t in "${run[@]}"; do
    run_one "$t" "$SECS" || failed+=("$t")
done
# One target that ran its time without a crash passed.
echo "fuzz: $((${#run[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: crashes in ${failed[*]}" >&2
    exit 1
fi
