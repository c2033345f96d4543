#!/bin/bash
# On the SLURM controller, after every node converged: wait (60 s) for slurmctld to answer, then
# resume each running node (the arguments) that ai-how drained or that is down. Prints
# "resumed NODE" for each.
#   slurm-resume.sh NODE ...
set -euo pipefail
for _ in $(seq 30); do
  scontrol ping 2>/dev/null | grep -q 'is UP' && break
  sleep 2
done
scontrol ping | grep -q 'is UP' || { echo "slurmctld does not answer after 60 s: $(scontrol ping 2>&1 | tail -1)" >&2; exit 1; }
running=" $* "
sinfo -h -N -o '%N|%T|%E' | sort -u | while IFS='|' read -r node state reason; do
  [[ $running == *" $node "* ]] || continue
  if [[ $state == down* || ($state == drain* && $reason == aihow*) ]]; then
    scontrol update nodename="$node" state=resume
    echo "resumed $node"
  fi
done
