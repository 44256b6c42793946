#!/usr/bin/env bash
# Stop the local test cluster that slurm/local/up.sh started, and only what it started:
# jobs still queued or running on it are cancelled first, then its slurmd daemons (however many
# nodes it had), slurmctld and (if up.sh started it) munged are stopped, and the /etc/hosts line
# up.sh added is removed. The state
# directory (logs, job completion log) is kept; slurm.conf stays too (it only names this cluster).
set -euo pipefail

STATE=${SALNET_SLURM_STATE:-/var/tmp/salnet-slurm}
HOSTS_MARK="# salnet slurm/local/up.sh"   # ends the /etc/hosts line up.sh added

say() { echo "down.sh: $*"; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
ours() { grep -qx "$1" "$STATE/started" 2>/dev/null; }

if [[ ! -s $STATE/started ]]; then
    say "nothing to stop (no $STATE/started: up.sh started nothing here)"
    exit 0
fi

stop() {  # stop the daemon of a pid file; SIGKILL after 10 s
    local name=$1 pidfile=$2 pid
    if ! alive "$pidfile"; then say "$name is not running"; return 0; fi
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { say "stopped $name (pid $pid)"; return 0; }; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    say "killed $name (pid $pid): it did not stop within 10 s"
}

if ours slurmctld && alive "$STATE/slurmctld.pid"; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// } ]]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 60); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.5; done
    fi
fi
# every slurmd up.sh started, whatever the node count was then (up.sh records each as slurmd-NODE)
while read -r entry; do
    [[ $entry == slurmd-* ]] && stop "slurmd ${entry#slurmd-}" "$STATE/$entry.pid"
done < <(grep '^slurmd-' "$STATE/started" | sort -V)
ours slurmctld && stop slurmctld "$STATE/slurmctld.pid"
ours munged && stop munged "$STATE/munged.pid"
if ours hosts && grep -qF "$HOSTS_MARK" /etc/hosts; then
    # rewrite in place (/etc/hosts may be a bind mount, which a rename would not replace)
    grep -vF "$HOSTS_MARK" /etc/hosts > "$STATE/hosts.tmp" || true
    cat "$STATE/hosts.tmp" > /etc/hosts && rm -f "$STATE/hosts.tmp"
    say "removed the node1..nodeN line from /etc/hosts"
fi
: > "$STATE/started"
say "done (logs kept in $STATE/log)"
