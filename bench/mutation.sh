#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules whose tests must fail when the product is wrong:
# captioning/decoding.py, explain/faithfulness.py and explain/embeddings.py, each against its
# fast tests. Surviving mutants are changes to the code that no test notices; docs/mutation.md
# lists them and what was done about them.
#
#   bash bench/mutation.sh                      # all three modules
#   bash bench/mutation.sh explain/faithfulness.py
#   MAX_CHILDREN=1 bash bench/mutation.sh captioning/decoding.py
#
# It runs in a throwaway copy of the working tree (mutmut writes a mutants/ folder and a
# setup.cfg there, never here) and prints the survivors; RESULTS=DIR keeps the copy's
# mutants/ folder and the survivors' diffs in DIR. Needs the project venv (.venv, or PYTHON=...);
# installs mutmut into it if missing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
MAX_CHILDREN="${MAX_CHILDREN:-2}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(captioning/decoding.py explain/faithfulness.py explain/embeddings.py)

# The fast tests that exercise each module (slow ones need Flickr8k or the shipped models and
# would make every mutant cost minutes).
tests_for() {
  case "$1" in
    captioning/decoding.py) echo "tests/test_decoders_decoding.py tests/test_decoding_mutants.py tests/test_explain_beam.py" ;;
    explain/faithfulness.py) echo "tests/test_explain_faithfulness.py tests/test_app.py::test_faithfulness_verdict_needs_both_curves tests/test_app.py::test_faithfulness_service_tells_a_good_map_from_bad_ones" ;;
    explain/embeddings.py) echo "tests/test_explain_embeddings.py" ;;
    *) echo "no test list for $1" >&2; return 1 ;;
  esac
}

"$PY" -c "import mutmut" 2>/dev/null || "$PY" -m pip install -q "mutmut==3.8.1"
MUTMUT="$(dirname "$PY")/mutmut"

for target in "${TARGETS[@]}"; do
  work="$(mktemp -d)"
  # Tracked and new (not ignored) files of the working tree, as they are now.
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work" 2>/dev/null || true)
  read -r -a tests <<<"$(tests_for "$target")"
  {
    echo "[mutmut]"
    echo "source_paths ="
    echo "    captioning"
    echo "    explain"
    echo "only_mutate = $target"
    echo "also_copy ="
    echo "    app"
    echo "    assets"
    printf 'pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -m\n    not slow\n'
    echo "pytest_add_cli_args_test_selection ="
    for t in "${tests[@]}"; do echo "    $t"; done
  } >"$work/setup.cfg"
  echo "== $target: mutmut in $work (tests: ${tests[*]})"
  start=$(date +%s)
  (cd "$work" && OMP_NUM_THREADS=1 "$MUTMUT" run --max-children "$MAX_CHILDREN" >"$work/run.log" 2>&1) || {
    echo "mutmut failed; last lines of $work/run.log:"; tail -20 "$work/run.log"; exit 1; }
  echo "   $(( $(date +%s) - start )) s"
  (cd "$work" && "$MUTMUT" results --all true >"$work/results.txt" 2>&1 || true)
  grep -E ": (killed|survived|no tests|timeout|suspicious|segfault|skipped)" "$work/results.txt" \
    | awk -F': ' '{n[$2]++} END {for (k in n) printf "   %s %d\n", k, n[k]}'
  echo "   survivors:"
  grep -E ": (survived|no tests)" "$work/results.txt" | sed 's/^/     /' || true
  if [ -n "${RESULTS:-}" ]; then
    out="$RESULTS/$(echo "$target" | tr / _)"
    mkdir -p "$out"
    cp "$work/results.txt" "$work/run.log" "$out/"
    for m in $(grep -E ": (survived|no tests)" "$work/results.txt" | cut -d: -f1); do
      (cd "$work" && "$MUTMUT" show "$m" >"$out/$m.diff" 2>&1 || true)
    done
  fi
  rm -rf "$work"
done
