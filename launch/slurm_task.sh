#!/bin/bash
# One per node under Slurm (see slurm.sbatch): runs torchrun and forwards SIGUSR1 to its workers,
# which finish their step, checkpoint and exit. torchrun itself ignores SIGUSR1 (by default it
# would die of it); the workers install their own handler over the inherited "ignore".
set -uo pipefail
(trap '' USR1; exec launch/torchrun_multinode.sh "$@") &
torchrun_pid=$!
trap 'pkill -USR1 -P "$torchrun_pid"' USR1
while kill -0 "$torchrun_pid" 2>/dev/null; do wait "$torchrun_pid"; done
wait "$torchrun_pid"
