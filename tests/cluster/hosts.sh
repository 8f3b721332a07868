#!/usr/bin/env bash
# Hosts on one machine for multi-host tests: each "host" is a network namespace with its own
# address (198.18.0.0/15, the benchmarking range), its own host name (a UTS namespace) and its
# own /etc/hosts, joined to the others by veth pairs on one bridge (eth0, 198.18.0.N). Each also
# has an interface that leads nowhere (data0, 198.19.0.N). Open MPI reaches them with an
# rsh agent script that enters the host's namespaces, as ssh would log in to a real host.
#
#   hosts.sh up DIR PREFIX N   make hosts node1..nodeN (namespaces PREFIX-node1.., bridge PREFIX-br)
#                              and write into DIR: hostfile, agent (the rsh agent), on (run a
#                              command on a host: DIR/on node1 CMD...)
#   hosts.sh down PREFIX       remove everything `up` made (also after a partial `up`)
#   hosts.sh down-stale STEM   `down` for every STEM<pid> prefix whose process is gone
#   hosts.sh cut PREFIX HOST   take HOST's link down (its end on the bridge)
#   hosts.sh loopback-name PREFIX HOST
#                              make HOST's own name resolve to 127.0.1.1, as Debian's installer
#                              writes /etc/hosts
#
# The agent and `on` set the host name; with SHARED_HOSTNAME=1 in their environment they leave
# the machine's own name instead (every host then has the same name). The agent answers a host it
# does not know as ssh does: "Could not resolve hostname", status 255.
# `up` exits with 77 when this machine does not allow network namespaces (not root, or namespaces
# forbidden, or what it needs of them), and with 1 for any other failure. PREFIX-nodeN must fit
# in 15 characters (an interface name).
set -euo pipefail

die() { echo "hosts.sh: $*" >&2; exit 1; }

cmd=${1:-}
case "$cmd" in
  up)
    [ $# -eq 4 ] || die "usage: hosts.sh up DIR PREFIX N"
    dir=$2 prefix=$3 n=$4
    # Interface names have at most 15 characters: PREFIX-nodeN.
    [ $((${#prefix} + 5 + ${#n})) -le 15 ] || die "prefix '$prefix' is too long for $n hosts"
    if [ "$(id -u)" -ne 0 ]; then
      echo "hosts.sh: network namespaces need root (running as uid $(id -u))" >&2
      exit 77
    fi
    command -v ip > /dev/null || die "'ip' not found: install iproute2"
    command -v unshare > /dev/null || die "'unshare' not found: install util-linux"
    # What this needs of the machine, tried once on a throwaway namespace: a machine (or a
    # container) that forbids any of it is a skip, with the reason.
    probe=$prefix-probe
    if ! err=$( (unshare --net --uts true && ip netns add "$probe" &&
                 ip link add "$probe" type veth peer name eth0 netns "$probe" &&
                 ip link add "$prefix-pb" type bridge &&
                 ip netns exec "$probe" sh -c 'echo 5 > /proc/sys/net/ipv4/tcp_retries2' &&
                 mkdir -p "/etc/netns/$probe") 2>&1); then
      ip link del "$probe" 2> /dev/null || true
      ip link del "$prefix-pb" 2> /dev/null || true
      ip netns del "$probe" 2> /dev/null || true
      rmdir "/etc/netns/$probe" 2> /dev/null || true
      echo "hosts.sh: this machine does not allow network namespaces as hosts: $err" >&2
      exit 77
    fi
    ip link del "$probe"
    ip link del "$prefix-pb"
    ip netns del "$probe"
    rmdir "/etc/netns/$probe"
    mkdir -p "$dir"
    ip link add "$prefix-br" type bridge
    ip link set "$prefix-br" up
    hosts="127.0.0.1 localhost"$'\n'
    for i in $(seq 1 "$n"); do hosts+="198.18.0.$i node$i"$'\n'; done
    : > "$dir/hostfile"
    for i in $(seq 1 "$n"); do
      ns=$prefix-node$i
      ip netns add "$ns"
      ip link add "$ns" type veth peer name eth0 netns "$ns"
      ip link set "$ns" master "$prefix-br" up
      ip -n "$ns" addr add "198.18.0.$i/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
      # TCP gives up on a connection after ~13 s of unanswered retransmissions (Linux's default,
      # 15, takes ~15 min): Open MPI's launcher learns of a lost host when its connection to
      # the host's daemon fails.
      ip netns exec "$ns" sh -c 'echo 5 > /proc/sys/net/ipv4/tcp_retries2'
      # A second interface, data0 (198.19.0.N/24), whose other end is on no bridge: an address
      # that the other hosts cannot reach, as a misconfigured interface choice gives.
      ip link add "$prefix-d$i" type veth peer name data0 netns "$ns"
      ip link set "$prefix-d$i" up
      ip -n "$ns" addr add "198.19.0.$i/24" dev data0
      ip -n "$ns" link set data0 up
      # `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts inside the namespace.
      mkdir -p "/etc/netns/$ns"
      printf '%s' "$hosts" > "/etc/netns/$ns/hosts"
      echo "node$i slots=2" >> "$dir/hostfile"
    done
    cat > "$dir/on" <<EOF
#!/bin/sh
# on HOST CMD...: runs CMD on HOST (inside its namespaces, with its host name).
host=\$1; shift
[ -d "/etc/netns/$prefix-\$host" ] || { echo "on: no host '\$host'" >&2; exit 1; }
name=\$host; [ "\${SHARED_HOSTNAME:-0}" = 1 ] && name=\$(hostname)
exec ip netns exec "$prefix-\$host" unshare --uts sh -c 'hostname "\$0"; exec "\$@"' "\$name" "\$@"
EOF
    cat > "$dir/agent" <<EOF
#!/bin/sh
# rsh agent for Open MPI (plm_rsh_agent): \$1 is the host, the rest the command line that a
# remote shell would run there.
host=\$1; shift
if [ ! -d "/etc/netns/$prefix-\$host" ]; then
  echo "ssh: Could not resolve hostname \$host: Name or service not known" >&2
  exit 255
fi
name=\$host; [ "\${SHARED_HOSTNAME:-0}" = 1 ] && name=\$(hostname)
exec ip netns exec "$prefix-\$host" unshare --uts sh -c "hostname \$name; \$*"
EOF
    chmod +x "$dir/on" "$dir/agent"
    ;;
  down)
    [ $# -eq 2 ] || die "usage: hosts.sh down PREFIX"
    prefix=$2
    for ns in $(ip netns list | awk '{print $1}' | grep "^$prefix-node" || true); do
      # Whatever still runs in a host goes with it.
      for pid in $(ip netns pids "$ns" 2> /dev/null); do kill -9 "$pid" 2> /dev/null || true; done
      ip link del "$ns" 2> /dev/null || true
      ip netns del "$ns"
    done
    rm -rf "/etc/netns/$prefix-node"*
    # The bridge and the hosts' ends of their links (a namespace that a process still holds lives
    # on after `ip netns del`, and so would the links into it).
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$prefix-" || true); do
      ip link del "$link" 2> /dev/null || true
    done
    ;;
  down-stale)
    # down-stale STEM: `down` for every prefix STEM<pid> whose process is gone (a test that was
    # killed before its teardown).
    [ $# -eq 2 ] || die "usage: hosts.sh down-stale STEM"
    for prefix in $( (ip netns list | awk '{print $1}'; ls /etc/netns 2> /dev/null) |
                    sed -n "s/^\($2[0-9][0-9]*\)-node[0-9]*\$/\1/p" | sort -u); do
      [ -d "/proc/${prefix#"$2"}" ] || "$0" down "$prefix"
    done
    ;;
  cut)
    [ $# -eq 3 ] || die "usage: hosts.sh cut PREFIX HOST"
    ip link set "$2-$3" down
    ;;
  loopback-name)
    [ $# -eq 3 ] || die "usage: hosts.sh loopback-name PREFIX HOST"
    f=/etc/netns/$2-$3/hosts
    [ -f "$f" ] || die "no host '$3'"
    { echo "127.0.1.1 $3"; grep -v " $3\$" "$f"; } > "$f.new"
    mv "$f.new" "$f"
    ;;
  *)
    die "usage: hosts.sh up|down|down-stale|cut|loopback-name ..."
    ;;
esac
