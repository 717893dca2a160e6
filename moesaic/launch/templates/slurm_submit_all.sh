#!/bin/bash
# Submits every branch job, then the merge once all of them succeeded (afterok).
# Rendered by `moesaic launch render` from ${manifest}.
set -euo pipefail
here="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")" && pwd)"
${cd}mkdir -p ${log_dir}
${submit_branches}merge_job=$$(sbatch --parsable --dependency=afterok:${dependencies} "$$here/merge.sbatch")
merge_job=$${merge_job%%;*}
echo "merge job $$merge_job runs after ${dependencies_echo}"
