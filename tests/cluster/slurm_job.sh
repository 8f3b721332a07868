#!/bin/bash
# A real SLURM job on this machine: starts a private munged, slurmctld and slurmd (everything under
# WORK_DIR, free ports, this host only), then submits the user-facing template
# cluster/slurm/train.sbatch with 2 tasks:
#   job 1   a short run to completion, started by srun (the template's default) and by mpirun
#   job 2   a long run, cancelled with a plain `scancel` once it has logged 2 steps: every rank must
#           save a complete checkpoint (`latest`, `mole inspect --verify`) and the job must end
#   job 3   job 2's command again with few steps: it must resume from that checkpoint and finish
# and job 2 once more under mpirun. Everything it started is stopped on exit.
#
#   tests/cluster/slurm_job.sh MOLE_BINARY SOURCE_DIR WORK_DIR
#
# Needs root and Debian's `slurm-wlm` and `munge` packages (slurmctld, slurmd, slurm-client,
# slurm-wlm-basic-plugins); exits with 77 (skipped) without them. WORK_DIR is emptied first
# (it must be empty, missing, or an earlier run's).
set -euo pipefail

SKIP=77
die() { echo "slurm_job: FAIL: $*" >&2; exit 1; }
skip() { echo "slurm_job: SKIP: $*" >&2; exit "$SKIP"; }
log() { echo "slurm_job: $*"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

[[ $# -eq 3 ]] || { echo "usage: $0 MOLE_BINARY SOURCE_DIR WORK_DIR" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || skip "needs root: slurmd runs the jobs and the daemons run as SlurmUser=root"
missing=()
for tool in munged slurmctld slurmd sbatch srun scontrol sinfo squeue scancel mpirun; do
  command -v "$tool" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null 2>&1 ||
    missing+=("$tool")
done
((${#missing[@]} == 0)) || skip "not installed: ${missing[*]} (apt-get install --no-install-recommends slurm-wlm munge; mpirun: openmpi-bin)"
export PATH=$PATH:/usr/sbin:/sbin

[[ -x $1 ]] || die "MOLE_BINARY '$1' is not an executable file"
[[ -f $2/cluster/slurm/train.sbatch ]] || die "SOURCE_DIR '$2' has no cluster/slurm/train.sbatch"
MOLE_BINARY=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
SOURCE_DIR=$(cd "$2" && pwd)
mkdir -p "$3"
WORK=$(cd "$3" && pwd -P)  # physical: compared with /proc/PID/fd links
TEMPLATE=$SOURCE_DIR/cluster/slurm/train.sbatch
CONFIG=examples/demo-mixlora.yaml  # relative to SOURCE_DIR, the jobs' working directory
[[ -f $SOURCE_DIR/$CONFIG ]] || die "no $SOURCE_DIR/$CONFIG"

PIDS=()    # the SLURM daemons this script started (children of this shell)
RUN=       # the folder of the unix sockets
FAILED=1   # cleared on success; the daemons' and jobs' logs are printed on failure
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Everything of an earlier run goes; this script's own files and daemons live here. A folder that
# holds other files is refused rather than emptied.
if [[ -n $(ls -A "$WORK") && ! -f $WORK/.slurm_job_work ]]; then
  trap - EXIT
  die "WORK_DIR '$WORK' is not empty and was not made by this script"
fi
if [[ -f $WORK/.slurm_job_work ]]; then
  # A run killed before its teardown leaves its daemons and jobs behind: they go first (found by
  # their pid files, their open log files, and SLURM_CONF naming this folder's slurm.conf).
  for f in "$WORK"/run/munge/munged.pid "$WORK"/slurmctld.pid "$WORK"/slurmd.pid; do
    if [[ -f $f ]]; then kill -9 "$(< "$f")" 2>/dev/null || true; fi
  done
  for pid in $( { find /proc/[0-9]*/fd -maxdepth 1 -lname "$WORK/log/*" 2>/dev/null | cut -d/ -f3
                  grep -lzxF "SLURM_CONF=$WORK/slurm.conf" /proc/[0-9]*/environ 2>/dev/null |
                    cut -d/ -f3; } | sort -u | grep -vxF -e "$$" -e "$BASHPID"); do
    kill -9 "$pid" 2>/dev/null || true
  done
fi
find "$WORK" -mindepth 1 -delete
touch "$WORK/.slurm_job_work"
mkdir -p "$WORK"/{state,log,munge-key}
# Unix sockets (munged's, slurmd's and slurmstepd's in the spool, PMIx's below it) must have paths
# under 108 bytes: with a long WORK_DIR they go to a short folder of their own in /tmp.
if ((${#WORK} <= 40)); then
  RUN=$WORK/run
  mkdir -p "$RUN"
else
  RUN=$(mktemp -d /tmp/mole-slurm.XXXXXX)
  ln -s "$RUN" "$WORK/run"
fi
mkdir -p "$RUN"/{munge,spool}
chmod 0755 "$RUN" "$RUN/munge"

# The processes of this cluster, to clean up: the daemons and slurmstepd (they hold their log files
# under WORK_DIR/log open; slurmstepd overwrites its environment with its title) and the jobs'
# processes (SLURM_CONF names this cluster's slurm.conf and SLURM_JOB_ID is set).
own_processes() {
  local with_conf
  {
    find /proc/[0-9]*/fd -maxdepth 1 -lname "$WORK/log/*" 2>/dev/null | cut -d/ -f3
    with_conf=$(grep -lzxF "SLURM_CONF=$WORK/slurm.conf" /proc/[0-9]*/environ 2>/dev/null || true)
    [[ -z $with_conf ]] || grep -lz '^SLURM_JOB_ID=' $with_conf 2>/dev/null | cut -d/ -f3
  } | sort -u | grep -vxF -e "$$" -e "$BASHPID" || true
}

print_logs() {
  local f
  for f in "$WORK"/log/*.log "$WORK"/log/*.out "$WORK"/job*.out; do
    [[ -f $f ]] || continue
    echo "----- $f (last 60 lines)" >&2
    tail -n 60 "$f" >&2
  done
}

# Whether process $1 runs (a zombie, dead but not yet waited for, does not).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

teardown() {
  local rc=$? pid deadline left munged_pid=
  trap - EXIT INT TERM
  if ((rc != 0 || FAILED)); then
    echo "slurm_job: failed (status $rc); the daemons' and jobs' logs:" >&2
    print_logs
  fi
  # Jobs first, while slurmctld and slurmd can still end them (slurmstepd SIGKILLs after KillWait).
  if ((${#PIDS[@]})); then
    scancel $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    deadline=$((SECONDS + 40))
    while ((SECONDS < deadline)) && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; do sleep 0.5; done
  fi
  [[ -n $RUN && -f $RUN/munge/munged.pid ]] && munged_pid=$(< "$RUN/munge/munged.pid")
  for pid in "${PIDS[@]}" $munged_pid; do kill -TERM "$pid" 2>/dev/null || true; done
  deadline=$((SECONDS + 15))
  while ((SECONDS < deadline)); do
    left=0
    for pid in "${PIDS[@]}" $munged_pid; do alive "$pid" && left=1; done
    ((left)) || break
    sleep 0.2
  done
  for pid in "${PIDS[@]}" $munged_pid; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  # Anything of this cluster still alive (a slurmstepd or a rank of a job that would not end).
  left=$(own_processes)
  if [[ -n $left ]]; then
    echo "slurm_job: killing leftover processes of this cluster: $(echo $left)" >&2
    kill -KILL $left 2>/dev/null || true
  fi
  if [[ -n $RUN && $RUN != "$WORK/run" ]]; then rm -rf "$RUN"; fi
  exit "$rc"
}
# Local TCP ports in use (any state), from /proc: no ss or netstat needed.
used_ports() {
  local f sl addr rest
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $f ]] || continue
    while read -r sl addr rest; do
      [[ $sl == sl ]] && continue
      echo $((16#${addr##*:}))
    done < "$f"
  done
  return 0
}
# Two free ports below the ephemeral range (32768+), so that two copies of this test can run at once.
pick_ports() {
  local used p
  used=" $(used_ports | tr '\n' ' ') "
  PORTS=()
  while ((${#PORTS[@]} < 2)); do
    p=$((10000 + RANDOM % 22000))
    [[ $used == *" $p "* || " ${PORTS[*]:-} " == *" $p "* ]] || PORTS+=("$p")
  done
}

NODE=$(uname -n)
NODE=${NODE%%.*}
CPUS=$(nproc)
((CPUS >= 2)) || CPUS=2  # 2 tasks; SlurmdParameters=config_overrides accepts more CPUs than cores

write_conf() {
  cat > "$WORK/slurm.conf" <<EOF
# Written by tests/cluster/slurm_job.sh: one node (this host), no cgroups, no accounting.
ClusterName=moletest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${PORTS[0]}
SlurmdPort=${PORTS[1]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$RUN/munge/munge.socket
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$RUN/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
FirstJobId=$((1000 + RANDOM % 30000))
# scancel: SIGCONT and SIGTERM to every process of the job, SIGKILL this many seconds later.
KillWait=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
  dd if=/dev/urandom of="$WORK/munge-key/munge.key" bs=1024 count=1 status=none
  chmod 0700 "$WORK/munge-key"
  chmod 0400 "$WORK/munge-key/munge.key"
  chown "$(id -u):$(id -g)" "$WORK/munge-key" "$WORK/munge-key/munge.key"
  # --force: run as root and accept this folder's permissions; the system's munged is not touched.
  munged --force --origin=127.0.0.1 --socket="$RUN/munge/munge.socket" --key-file="$WORK/munge-key/munge.key" \
    --pid-file="$RUN/munge/munged.pid" --log-file="$WORK/log/munged.log" \
    --seed-file="$WORK/munge-key/munged.seed" ||
    die "munged did not start (see $WORK/log/munged.log)"
  [[ -S $RUN/munge/munge.socket ]] || die "munged made no socket $RUN/munge/munge.socket"
}

# Starts slurmctld and slurmd in the foreground mode (-D) in the background; waits for the node to
# be idle. Returns 1 (to retry with other ports) when a daemon could not bind its port.
start_slurm() {
  local deadline state pid
  write_conf
  slurmctld -D -c -f "$WORK/slurm.conf" > "$WORK/log/slurmctld.out" 2>&1 &
  PIDS+=($!)
  slurmd -D -c -N "$NODE" -f "$WORK/slurm.conf" > "$WORK/log/slurmd.out" 2>&1 &
  PIDS+=($!)
  deadline=$((SECONDS + 60))
  while :; do
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    [[ $state == idle ]] && return 0
    for pid in "${PIDS[@]}"; do
      if ! alive "$pid"; then
        if grep -qs "Address already in use" "$WORK"/log/slurm*; then return 1; fi
        die "a SLURM daemon (pid $pid) exited while starting"
      fi
    done
    ((SECONDS < deadline)) || die "node $NODE not idle after 60 s (sinfo says '${state:-nothing}')"
    sleep 0.5
  done
}

stop_slurm() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

export SLURM_CONF=$WORK/slurm.conf
T_START=$(now)
start_munged
for attempt in 1 2 3; do
  pick_ports
  if start_slurm; then break; fi
  ((attempt < 3)) || die "SLURM could not bind its ports 3 times"
  log "ports ${PORTS[*]} were taken; trying others"
  stop_slurm
  rm -rf "$WORK/state"/* "$RUN/spool"/*
done
log "SLURM up on $NODE ($CPUS CPUs), ports ${PORTS[*]}, in $(elapsed "$T_START" "$(now)") s; SLURM_CONF=$SLURM_CONF"

# What the jobs inherit (sbatch passes the environment on): root may run mpirun, 2 ranks may share
# fewer cores, one thread per rank on this small machine, and the binary under test.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMP_NUM_THREADS=1 MOLE=$MOLE_BINARY
unset MOLE_LAUNCHER

SHORT=(--set train.warmup=0 --set train.global_batch=16 --set train.micro_batch=4 --set data.eval=
       --set log.every=1)

# submit NAME [sbatch options] -- [train.sbatch arguments]: sets JOB_ID.
submit() {
  local name=$1 opts=() out
  shift
  while [[ $1 != -- ]]; do opts+=("$1"); shift; done
  shift
  out=$(sbatch --parsable --ntasks=2 --nodes=1 --job-name="$name" --chdir="$SOURCE_DIR" \
          --output="$WORK/$name-%j.out" "${opts[@]}" "$TEMPLATE" "$CONFIG" "$@") ||
    die "sbatch of $name failed: $out"
  JOB_ID=${out%%;*}
}

job_field() {  # job_field ID KEY: JobState, ExitCode, ...
  scontrol -o show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"
}

# wait_job ID SECONDS: waits for the job to end; sets JOB_STATE and JOB_EXIT (e.g. 0:0).
wait_job() {
  local deadline=$((SECONDS + $2))
  while :; do
    JOB_STATE=$(job_field "$1" JobState)
    case $JOB_STATE in
      PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | "") ;;
      *) break ;;
    esac
    ((SECONDS < deadline)) || die "job $1 is still ${JOB_STATE:-unknown} after $2 s"
    sleep 0.25
  done
  JOB_EXIT=$(job_field "$1" ExitCode)
}

lines() { if [[ -f $1 ]]; then wc -l < "$1"; else echo 0; fi; }

# ---- Job 1: a short run to completion, with each launcher of the template.
for launcher in srun mpirun; do
  t0=$(now)
  MOLE_LAUNCHER=$launcher submit "job1-$launcher" -- "${SHORT[@]}" --set train.steps=4 \
    --set log.dir="$WORK/job1-$launcher"
  wait_job "$JOB_ID" 120
  t1=$(now)
  [[ $JOB_STATE == COMPLETED && $JOB_EXIT == 0:0 ]] ||
    die "job 1 ($launcher, $JOB_ID) ended $JOB_STATE with exit code $JOB_EXIT"
  n=$(lines "$WORK/job1-$launcher/metrics.jsonl")
  ((n == 4)) || die "job 1 ($launcher): metrics.jsonl has $n lines, not 4"
  [[ -d $WORK/job1-$launcher/adapter ]] || die "job 1 ($launcher) wrote no adapter"
  log "job 1 ($launcher, job $JOB_ID): COMPLETED 4 steps; $(elapsed "$t0" "$t1") s from sbatch to its end"
done

# ---- Job 2: a long run stopped by a plain scancel once it has logged 2 steps. Every rank gets
# SIGTERM; the run must save a complete checkpoint and the job end within LIMIT seconds.
# cancel_run NAME LAUNCHER LIMIT: sets CKPT_STEP, JOB_STATE, JOB_EXIT.
cancel_run() {
  local name=$1 launcher=$2 limit=$3 dir=$WORK/$1 deadline t0 t1 state latest rank
  MOLE_LAUNCHER=$launcher submit "$name" -- "${SHORT[@]}" --set train.steps=100000 --set log.dir="$dir"
  deadline=$((SECONDS + 120))
  while (($(lines "$dir/metrics.jsonl") < 2)); do
    state=$(job_field "$JOB_ID" JobState)
    [[ $state == PENDING || $state == CONFIGURING || $state == RUNNING ]] ||
      die "$name ($JOB_ID) is $state before logging 2 steps"
    ((SECONDS < deadline)) || die "$name ($JOB_ID) logged fewer than 2 steps in 120 s"
    sleep 0.2
  done
  t0=$(now)
  scancel "$JOB_ID"
  wait_job "$JOB_ID" "$limit"
  t1=$(now)
  [[ -f $dir/ckpt/latest ]] ||
    die "$name ($JOB_ID, $JOB_STATE, exit code $JOB_EXIT): no checkpoint ($dir/ckpt/latest)"
  latest=$(< "$dir/ckpt/latest")
  [[ -f $dir/ckpt/$latest/manifest.pb ]] || die "$name: 'latest' names '$latest', which has no manifest.pb"
  for rank in 0 1; do
    [[ -f $dir/ckpt/$latest/rank-0000$rank.safetensors ]] || die "$name: $latest lacks rank $rank's file"
  done
  "$MOLE_BINARY" inspect "$dir/ckpt/$latest" --verify > "$WORK/$name-inspect.txt" 2>&1 ||
    die "$name: mole inspect --verify failed on $latest: $(tail -n 3 "$WORK/$name-inspect.txt")"
  CKPT_STEP=$((10#${latest#step-}))
  ((CKPT_STEP >= 2)) || die "$name: checkpoint $latest is of step $CKPT_STEP, before the 2 logged steps"
  log "job 2 ($launcher, job $JOB_ID): $(elapsed "$t0" "$t1") s from scancel to its end ($JOB_STATE," \
      "exit code $JOB_EXIT); checkpoint $latest complete, every CRC verified"
}

cancel_run job2 srun 60
# srun waits for the ranks, so their status 75 (stopped after saving a checkpoint) is the job's.
[[ $JOB_EXIT == 75:0 ]] || die "job 2 (srun): exit code $JOB_EXIT, not 75:0 (mole's 'stopped, checkpoint saved')"
grep -q "stopped by a signal after step $CKPT_STEP" "$WORK"/job2-[0-9]*.out ||
  die "job 2 (srun): its output lacks mole's 'stopped by a signal after step $CKPT_STEP'"

# ---- Job 3: job 2's command again, with few enough steps to finish: it continues from the checkpoint.
step=$CKPT_STEP
t0=$(now)
submit job3 -- "${SHORT[@]}" --set train.steps=$((step + 2)) --set log.dir="$WORK/job2"
wait_job "$JOB_ID" 120
t1=$(now)
[[ $JOB_STATE == COMPLETED && $JOB_EXIT == 0:0 ]] ||
  die "job 3 ($JOB_ID) ended $JOB_STATE with exit code $JOB_EXIT"
expected="resumed from $WORK/job2/ckpt/step-$(printf %06d "$step") at step $step"
grep -qF "$expected" "$WORK"/job3-*.out || die "job 3 did not log '$expected'"
n=$(lines "$WORK/job2/metrics.jsonl")
((n == step + 2)) || die "job 3: metrics.jsonl has $n lines, not $((step + 2))"
log "job 3 (job $JOB_ID): resumed at step $step, COMPLETED step $((step + 2)); $(elapsed "$t0" "$t1") s"

# ---- Job 2 under mpirun: mpirun answers SIGTERM by killing the ranks after
# 2 x odls_base_sigkill_timeout seconds (the template's 10 each), and always takes that long; its
# exit code is its own, not the ranks' 75.
cancel_run job2-mpirun mpirun 60

FAILED=0
log "PASS in $(elapsed "$T_START" "$(now)") s"
