#!/usr/bin/env bash
# Simulated nodes on one machine: network namespaces pima-node0..N-1, each with its own address
# 10.77.0.(i+1)/24 on a veth pair into the bridge pima-br0 (the host side is 10.77.0.254), and its
# own loopback. Traffic between "nodes" goes over the bridge, as between hosts; nothing is routed
# off the machine. Needs root. Idempotent: an old set-up is removed first (tools/ci/netns_down.sh).
#
#   tools/ci/netns_up.sh [N=2]
#   tools/ci/on_node 1 <command>      # run on "node" 1: same filesystem, its own network and hostname
set -euo pipefail
N=${1:-2}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/netns_down.sh" >/dev/null 2>&1 || true

ip link add pima-br0 type bridge
ip addr add 10.77.0.254/24 dev pima-br0
ip link set pima-br0 up
for ((i = 0; i < N; i++)); do
    ns=pima-node$i
    ip netns add "$ns"
    ip link add "pima-v$i" type veth peer name eth0 netns "$ns"
    ip link set "pima-v$i" master pima-br0 up
    ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
done
# Each node resolves every node's name (its hostname under tools/ci/on_node): `ip netns exec`
# bind-mounts /etc/netns/NAME/hosts over /etc/hosts inside the namespace.
for ((i = 0; i < N; i++)); do
    mkdir -p "/etc/netns/pima-node$i"
    {
        grep -v 'pima-node' /etc/hosts || true
        for ((j = 0; j < N; j++)); do echo "10.77.0.$((j + 1)) pima-node$j"; done
    } >"/etc/netns/pima-node$i/hosts"
done
# the bridge forwards between the nodes (a host's firewall could stop bridged traffic)
sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true
echo "netns: $N nodes up: $(for ((i = 0; i < N; i++)); do printf 'pima-node%d=10.77.0.%d ' "$i" $((i + 1)); done)"
