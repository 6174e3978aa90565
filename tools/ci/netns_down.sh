#!/usr/bin/env bash
# Remove what tools/ci/netns_up.sh created (namespaces, veth pairs, the bridge). Safe to run twice.
for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^pima-node/ {print $1}'); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns delete "$ns" || true
done
for dev in $(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^pima-v/ {sub(/@.*/, "", $2); print $2}'); do
    ip link delete "$dev" 2>/dev/null || true
done
ip link delete pima-br0 2>/dev/null || true
rm -rf /etc/netns/pima-node[0-9]*
rmdir /etc/netns 2>/dev/null || true
