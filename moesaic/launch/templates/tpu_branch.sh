#!/bin/bash
# Branch job of party ${party} on TPU VM ${tpu_name} (every worker), rendered by
# `moesaic launch render` from ${manifest}. Each worker runs one process; jax.distributed
# finds the slice's workers from the TPU environment.
set -euo pipefail
mkdir -p ${log_dir}
gcloud compute tpus tpu-vm ssh ${tpu_name} --zone ${tpu_zone}${project} --worker=all --command=${remote} 2>&1 | tee ${log}
