#!/bin/bash
# Every branch job in parallel, then the merge once all succeeded. Rendered by
# `moesaic launch render` from ${manifest}.
set -euo pipefail
here="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")" && pwd)"
declare -A pids
${start_branches}failed=()
for party in "$${!pids[@]}"; do
  wait "$${pids[$$party]}" || failed+=("$$party")
done
if [ "$${#failed[@]}" -ne 0 ]; then
  echo "branch jobs failed: $${failed[*]}; no merge" >&2
  exit 1
fi
"$$here/merge.sh"
