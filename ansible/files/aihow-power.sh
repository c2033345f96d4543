#!/bin/bash
# slurmctld's power programs on the controller (slurm.conf: ResumeProgram, SuspendProgram,
# ResumeFailProgram), installed as aihow-power-resume, -suspend and -resume-fail: the name says
# the action. Each queues one request file for the host's `aihow broker`, which reads the queue
# through the guest agent (no IP traffic between host and guest), carries it out and removes the
# file as its acknowledgement. Written whole then renamed: the broker never reads half a request.
#   aihow-power-ACTION HOSTLIST        (e.g. hpc-compute-[01-02], as slurmctld passes it)
set -euo pipefail
action=${0##*/aihow-power-}
case $action in resume|suspend|resume-fail) ;; *) echo "unknown power action '$action'" >&2; exit 2 ;; esac
queue=${AIHOW_POWER_QUEUE:-/var/spool/aihow-power}  # the variable: for tests only
nodes=$(scontrol show hostnames "$1" | tr '\n' ' ')
name="$(date +%s%N)-$$-$action"
printf '%s %s\n' "$action" "${nodes% }" > "$queue/.$name"
mv "$queue/.$name" "$queue/$name.req"
logger -t aihow-power "queued $action of ${nodes% }"
