#!/usr/bin/env bash
# Every method on one domain with its CPU recipe, then closed-book test accuracy of each trained
# model, the base model's closed-book and retrieved-context accuracy, and one results table.
#   benchmarks/methods.sh OUT [DOMAIN] [METHODS...]
# (make bench-methods runs it with OUT=runs/methods-<time>.)
set -euo pipefail
out=${1:?usage: benchmarks/methods.sh OUT [DOMAIN] [METHODS...]}
domain=${2:-current-events}
shift $(( $# > 1 ? 2 : 1 ))
methods=${*:-cpt sft cpt-sft raft simrag rlag}
kembed=${KEMBED:-kembed}
mkdir -p "$out"
$kembed eval --domain "$domain" --output "$out/eval-base"
$kembed eval --domain "$domain" --mode retrieved-context --top-k 3 --output "$out/eval-base-retrieved"
for m in $methods; do
  start=$(date +%s)
  $kembed train "$m" --domain "$domain" --output "$out/$m"
  echo "$m $(( $(date +%s) - start ))" >> "$out/train_seconds.txt"
  $kembed eval --domain "$domain" --model "$out/$m" --output "$out/eval-$m"
done
$kembed results "$out"/eval-*
cat "$out/train_seconds.txt"
