# Shared by the experiment scripts: a `mudd compare` folder under RUNS mirrored by its small files under docs.

# restore_compare OUT DOCS_FOLDER: on a fresh machine, start OUT from the finished runs kept in DOCS_FOLDER.
restore_compare() {
  if [ ! -e "$1" ] && [ -f "$2/compare.json" ]; then mkdir -p "$(dirname "$1")" && cp -r "$2" "$1"; fi
}

# keep_compare OUT DOCS_FOLDER: copy compare.json, the results and plots (once the part has finished) and each
# finished run's metrics.jsonl and run.json; safe to call while the part still runs.
keep_compare() {
  mkdir -p "$2"
  cp "$1"/compare.json "$2/"
  for f in "$1"/results.json "$1"/results.md "$1"/*.png; do if [ -f "$f" ]; then cp "$f" "$2/"; fi; done
  for run in $(python3 "$(dirname "${BASH_SOURCE[0]}")/finished_runs.py" "$1"); do
    dest="$2/runs/$(basename "$(dirname "$run")")/$(basename "$run")"
    mkdir -p "$dest" && cp "$run/metrics.jsonl" "$run/run.json" "$dest/"
  done
  python3 "$(dirname "${BASH_SOURCE[0]}")/scrub_paths.py" "$2"/*.json "$2"/*.md "$2"/runs/*/*/run.json
}
