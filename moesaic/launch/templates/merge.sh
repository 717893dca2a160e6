#!/bin/bash
# Merge of ${branches}, rendered by `moesaic launch render` from ${manifest}.
set -euo pipefail
${cd}${exports}mkdir -p ${log_dir}
${command} 2>&1 | tee ${log_dir}/merge.log
