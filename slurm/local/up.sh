#!/usr/bin/env bash
# Start a real Slurm cluster of N nodes on this one machine, from Debian's packages (Slurm 22.05):
# munged, slurmctld, and one slurmd per node (node1..nodeN) on 127.0.0.1, each with its own port,
# spool directory and an equal share of this machine's memory (each node has 2 CPUs).
#
#   sudo slurm/local/up.sh              # idempotent: starts what is not running, says what it did
#   sudo slurm/local/up.sh --nodes 4    # 4 nodes; another count than the running cluster's restarts it
#   sinfo; sbatch ...; squeue; scontrol show job N; scancel N     # any shell, no variables needed
#   sudo slurm/local/down.sh            # stops only what up.sh started
#
# --nodes defaults to the count of the cluster up.sh configured last (2 the first time), so a plain
# `up.sh` never reshapes a cluster someone else brought up. Changing the count rewrites slurm.conf and
# restarts slurmctld and every slurmd (Slurm 22.05 takes new nodes only at a restart); since a restart
# starts with an empty queue, up.sh refuses while jobs are queued or running, and names them.
#
# Two partitions: "batch" (default, low priority, PreemptMode=REQUEUE, GraceTime so a preempted job
# gets its --signal first) and "urgent" (higher PriorityTier: its jobs preempt batch jobs).
# Credentials expire after 10 s, so a requeued job may start again within seconds.
# State, logs and the job completion log live in $SALNET_SLURM_STATE (default /var/tmp/salnet-slurm).
set -euo pipefail

STATE=${SALNET_SLURM_STATE:-/var/tmp/salnet-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by salnet's slurm/local/up.sh"
HOSTS_MARK="# salnet slurm/local/up.sh"   # ends the /etc/hosts line up.sh adds (down.sh removes it)
CTLD_PORT=${SALNET_SLURMCTLD_PORT:-16817}
FIRST_NODE_PORT=17001                    # nodeK's slurmd listens on FIRST_NODE_PORT + K - 1
NODE_CPUS=2
MAX_NODES=64

say() { echo "up.sh: $*"; }
die() { echo "up.sh: error: $*" >&2; exit 1; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }   # a pid file whose process runs
started() { grep -qx "$1" "$STATE/started" 2>/dev/null || echo "$1" >> "$STATE/started"; }

usage() { echo "usage: $0 [--nodes N]   (N from 1 to $MAX_NODES; default: the running cluster's count, else 2)"; }
nodes=""
while (( $# )); do
    case $1 in
        --nodes) (( $# >= 2 )) || { usage >&2; die "--nodes needs a value"; }; nodes=$2; shift 2 ;;
        --nodes=*) nodes=${1#--nodes=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
if [[ -n $nodes ]] && ! { [[ $nodes =~ ^[0-9]+$ ]] && (( 10#$nodes >= 1 && 10#$nodes <= MAX_NODES )); }; then
    die "--nodes '$nodes': expected a whole number from 1 to $MAX_NODES"
fi

[[ $(id -u) == 0 ]] || die "run as root (slurmd starts jobs as their users; the daemons run as root here)"

# ---- packages ---------------------------------------------------------------------------------
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if (( ${#missing[@]} )); then
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "Slurm $(slurmctld -V | awk '{print $2}') and munge are installed"
fi

mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
touch "$STATE/started"
# One up.sh at a time (two test workers may both find the cluster down): the second waits, then
# finds everything running. The daemons must not inherit the lock ({lock}>&- below): it would be
# held as long as they run.
exec {lock}>"$STATE/up.lock"
flock "$lock"

configured_nodes() {  # the node count of the slurm.conf up.sh wrote, empty if none
    [[ -e $CONF ]] && head -1 "$CONF" | grep -qF "$MARK" || return 0
    sed -n 's/^NodeName=node\[1-\([0-9]*\)\].*/\1/p' "$CONF" | head -1
}
was_nodes=$(configured_nodes)
if [[ -z $nodes ]]; then
    nodes=${was_nodes:-2}
    say "$nodes node(s)$([[ -n $was_nodes ]] && echo " (as configured; --nodes N changes it)")"
fi
nodes=$((10#$nodes))
node_names=$(for k in $(seq "$nodes"); do printf 'node%d ' "$k"; done)
node_names=${node_names% }
node_range="node[1-$nodes]"

# ---- munge: the authentication daemon -----------------------------------------------------------
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged is running"
else
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid {lock}>&-
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n </dev/null | unmunge >/dev/null || die "munged did not start; see /var/log/munge/munged.log"
    cp /run/munge/munged.pid "$STATE/munged.pid"
    started munged
    say "started munged (pid $(cat "$STATE/munged.pid"))"
fi

# ---- host names node1..nodeN (the rendezvous host of a job is its first node's name) -----------
unresolved=()
for name in $node_names; do getent hosts "$name" >/dev/null || unresolved+=("$name"); done
if (( ${#unresolved[@]} == 0 )); then
    say "$(sed 's/ /, /g' <<<"$node_names") resolve"
else
    hosts_line="127.0.0.1 $node_names  $HOSTS_MARK"
    # our earlier line (fewer nodes) is replaced, in place: /etc/hosts may be a bind mount, which a
    # rename would not replace
    grep -vF "$HOSTS_MARK" /etc/hosts > "$STATE/hosts.tmp" || true
    printf '%s\n' "$hosts_line" >> "$STATE/hosts.tmp"
    cat "$STATE/hosts.tmp" > /etc/hosts && rm -f "$STATE/hosts.tmp"
    started hosts
    say "added '127.0.0.1 $node_names' to /etc/hosts (${unresolved[*]} did not resolve)"
fi

# ---- slurm.conf ---------------------------------------------------------------------------------
host=$(hostname -s)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
node_mem=$(( mem_mb / nodes ))          # the nodes share this machine's memory
def_mem=$(( node_mem / NODE_CPUS ))     # a job that asks for no memory gets its CPUs' share
new_conf=$(cat <<CONF
$MARK: a $nodes-node test cluster on one machine.
# Edit up.sh, not this file (up.sh rewrites it and restarts the daemons when it changes).
ClusterName=salnet-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire + 1 s before it may start (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
LaunchType=launch/slurm
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# Preemption: a job of a higher-PriorityTier partition requeues jobs of a lower one; with
# preempt_send_user_signal the preempted job first gets its --signal (USR2), then GraceTime seconds.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
MinJobAge=60
KillWait=15
InactiveLimit=0
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Without slurmdbd, sacct has nothing: every job end (requeues included) is logged here instead.
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
MailProg=/bin/true
NodeName=$node_range NodeHostname=$host NodeAddr=127.0.0.1 Port=[$FIRST_NODE_PORT-$((FIRST_NODE_PORT + nodes - 1))] CPUs=$NODE_CPUS RealMemory=$node_mem State=UNKNOWN
PartitionName=batch Nodes=$node_range Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=$node_range MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
)
stop_pidfile() {  # stop the daemon of a pid file (ours) and wait for it to exit
    local pidfile=$1 pid
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

if [[ -e $CONF ]] && ! head -1 "$CONF" | grep -qF "$MARK"; then
    die "$CONF exists and was not written by up.sh: this machine has its own Slurm configuration; not touching it"
fi
if [[ -e $CONF ]] && [[ "$(cat "$CONF")" == "$new_conf" ]]; then
    say "$CONF is up to date"
else
    if [[ -e $CONF ]]; then
        # A new slurm.conf takes a restart of every daemon, and slurmctld restarts with an empty
        # queue (-c): refuse rather than silently drop someone's jobs.
        if alive "$STATE/slurmctld.pid"; then
            queued=$(squeue -h -o '%i %T' 2>/dev/null | tr '\n' ',' | sed 's/,$//; s/,/, /g')
            if [[ -n $queued ]]; then
                die "the cluster must restart for its new configuration$([[ ${was_nodes:-} != "$nodes" ]] && echo " (${was_nodes:-?} -> $nodes nodes)"), which empties the queue, and it holds jobs: $queued. Wait for them, scancel them, or run down.sh (it cancels them) first"
            fi
        fi
        why="configuration changed"
        [[ ${was_nodes:-} != "$nodes" ]] && why="node count ${was_nodes:-?} -> $nodes"
        for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
            [[ -e $pidfile ]] || continue
            d=$(basename "$pidfile" .pid)
            if alive "$pidfile"; then say "$why: stopping $d (the queue is empty; it is restarted below)"; stop_pidfile "$pidfile"; fi
        done
    fi
    mkdir -p /etc/slurm
    printf '%s\n' "$new_conf" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    started conf
    say "wrote $CONF ($nodes node(s) x $NODE_CPUS CPUs, ${node_mem} MB each; partitions batch (default) and urgent)"
fi

# A slurmd of a node this cluster no longer has (the count went down while slurmctld was not running).
for pidfile in "$STATE"/slurmd-node*.pid; do
    [[ -e $pidfile ]] || continue
    k=$(basename "$pidfile" .pid); k=${k#slurmd-node}
    if [[ $k =~ ^[0-9]+$ ]] && (( k > nodes )) && alive "$pidfile"; then
        say "stopping slurmd node$k (not one of the $nodes node(s))"
        stop_pidfile "$pidfile"
    fi
done

# ---- slurmctld ----------------------------------------------------------------------------------
if alive "$STATE/slurmctld.pid"; then
    say "slurmctld is running (pid $(cat "$STATE/slurmctld.pid"))"
else
    # -c: start with an empty queue (a test cluster keeps no jobs across restarts). Job ids start
    # over too, so the completion log of the previous run is set aside.
    [[ -s $STATE/log/jobcomp.log ]] && mv "$STATE/log/jobcomp.log" "$STATE/log/jobcomp.log.previous"
    slurmctld -c {lock}>&-
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "UP" && break; sleep 0.2; done
    scontrol ping | grep -q UP || die "slurmctld did not come up; see $STATE/log/slurmctld.log"
    started slurmctld
    say "started slurmctld (pid $(cat "$STATE/slurmctld.pid"), port $CTLD_PORT)"
fi

# ---- slurmd node1..nodeN -----------------------------------------------------------------------
for node in $node_names; do
    if alive "$STATE/slurmd-$node.pid"; then
        say "slurmd $node is running (pid $(cat "$STATE/slurmd-$node.pid"))"
    else
        mkdir -p "$STATE/spool/$node"
        slurmd -N "$node" {lock}>&-
        for _ in $(seq 50); do alive "$STATE/slurmd-$node.pid" && break; sleep 0.1; done
        alive "$STATE/slurmd-$node.pid" || die "slurmd $node did not start; see $STATE/log/slurmd-$node.log"
        started "slurmd-$node"
        say "started slurmd $node (pid $(cat "$STATE/slurmd-$node.pid"))"
    fi
done

# ---- wait until every node takes jobs ---------------------------------------------------------
for i in $(seq 60); do
    states=$(sinfo -h -N -p batch -o '%N %t' | sort -u)
    if ! grep -qvE ' (idle|mix|alloc)$' <<<"$states"; then break; fi
    if (( i == 10 )) && grep -qE ' (down|drain|drng)' <<<"$states"; then
        scontrol update nodename="$node_range" state=resume 2>/dev/null || true
    fi
    sleep 1
done
grep -qvE ' (idle|mix|alloc)$' <<<"$states" && die "nodes not ready: $(tr '\n' ' ' <<<"$states"); see $STATE/log/"
say "ready: $(tr '\n' ' ' <<<"$states")(sinfo, sbatch, squeue, scontrol, scancel work in any shell)"
