#!/bin/bash
# Branch job of party ${party}: ${processes} process(es) on this machine, coordinator on
# loopback port ${port}. Rendered by `moesaic launch render` from ${manifest}.
set -euo pipefail
${cd}${exports}mkdir -p ${log_dir}
pids=()
for process_id in $$(seq 0 $$((${processes} - 1))); do
  ${command} > "${log_dir}/branch-${party}.$$process_id.log" 2>&1 &
  pids+=($$!)
done
status=0
for pid in "$${pids[@]}"; do
  wait "$$pid" || status=1
done
if [ "$$status" -ne 0 ]; then
  echo "party ${party} failed; see ${log_dir}/branch-${party}.*.log" >&2
fi
exit "$$status"
