#!/usr/bin/env bash
# A one-node Slurm on this machine, to try `pipe run --executor slurm` against the real thing
# (Debian's slurm-wlm, munge; run as root: a container or a throwaway VM, not your workstation).
#
#   sudo scripts/slurm-local.sh            # install (apt), configure, start munged/slurmctld/slurmd
#   sinfo; pipe run pipelines/hello.yaml --executor slurm --slurm-poll 1
#   sudo scripts/slurm-local.sh stop
#
# The node has this machine's CPUs and no GPU (so a node that computes on CUDA is refused by
# sbatch: `Invalid generic resource (gres) specification`). MinJobAge is short, as on clusters
# where finished jobs leave squeue quickly.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "slurm-local.sh: run as root (it installs packages and starts daemons)" >&2
  exit 1
fi

if [ "${1:-start}" = stop ]; then
  pkill -x slurmd || true
  pkill -x slurmctld || true
  pkill -x munged || true
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
fi

host=$(hostname)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))

mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged

mkdir -p /etc/slurm /var/spool/slurmctld-pipelocal /var/spool/slurmd-pipelocal /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=pipelocal
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld-pipelocal
SlurmdSpoolDir=/var/spool/slurmd-pipelocal
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=30
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
# Slurm 22.05 has no `disabled` cgroup plugin; v1 starts where the v1 hierarchy is mounted
if [ -d /sys/fs/cgroup/cpuset ]; then plugin=cgroup/v1; else plugin=autodetect; fi
printf 'CgroupPlugin=%s\nIgnoreSystemd=yes\n' "$plugin" > /etc/slurm/cgroup.conf

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    sinfo
    exit 0
  fi
  sleep 1
done
echo "slurm-local.sh: the node did not become idle; see /var/log/slurm/*.log" >&2
sinfo >&2 || true
exit 1
