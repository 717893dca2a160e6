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
# The first process to fail stops the others: they would wait for it at their next barrier.
status=0
for _ in "$${pids[@]}"; do
  if ! wait -n; then
    status=1
    kill "$${pids[@]}" 2>/dev/null || true
    wait || true
    break
  fi
done
if [ "$$status" -ne 0 ]; then
  echo "party ${party} failed; see ${log_dir}/branch-${party}.*.log" >&2
fi
exit "$$status"
