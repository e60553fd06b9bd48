#!/usr/bin/env bash
# Every method on one domain with its CPU recipe (the same seeded sample of training records for
# all), then each trained model and the base model scored the same two ways: closed-book in the
# paper's raw format (the headline) and retrieved-context (BM25, top-3) in the chat format that
# RAFT and SimRAG train in. Resumable: finished runs and evaluations are kept, an interrupted
# run continues with --resume.
#   benchmarks/methods.sh OUT [DOMAIN] [METHODS...]
# (make bench-methods runs it with OUT=runs/methods-<time>.)
set -euo pipefail
out=${1:?usage: benchmarks/methods.sh OUT [DOMAIN] [METHODS...]}
domain=${2:-current-events}
shift $(( $# > 1 ? 2 : 1 ))
methods=${*:-cpt sft cpt-sft raft simrag rlag}
kembed=${KEMBED:-kembed}
mkdir -p "$out"

evaluate() {  # evaluate NAME MODEL: both modes, each skipped when its results exist
  [ -f "$out/eval-$1/results.json" ] || $kembed eval --domain "$domain" --model "$2" --output "$out/eval-$1"
  [ -f "$out/eval-$1-rag/results.json" ] || $kembed eval --domain "$domain" --model "$2" \
    --mode retrieved-context --top-k 3 --format chat --output "$out/eval-$1-rag"
}

evaluate base smollm2-135m-instruct
for m in $methods; do
  if ! grep -qs '"event": "end"' "$out/$m/metrics.jsonl"; then
    resume=(); [ -f "$out/$m/kembed-run.json" ] && resume=(--resume)
    start=$(date +%s)
    $kembed train "$m" --domain "$domain" --output "$out/$m" "${resume[@]}"
    echo "$m $(( $(date +%s) - start ))" >> "$out/train_seconds.txt"
  fi
  evaluate "$m" "$out/$m"
done
$kembed results "$out"/eval-*
cat "$out/train_seconds.txt"
