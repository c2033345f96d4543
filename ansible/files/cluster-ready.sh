#!/bin/bash
# On the control plane, after every node converged: the RBAC kubeadm init would add, every running
# node registered and Ready, the default service account (pods cannot be made before it), role
# labels (a kubelet may not set node-role labels on itself), and every node back in scheduling (a
# node the project stopped was drained and cordoned first). Prints changed=1 when it changed
# anything.
#   cluster-ready.sh NODE=LABEL[,LABEL...] ...
set -euo pipefail
admin=(kubectl --kubeconfig /etc/kubernetes/admin.conf)
super=(kubectl --kubeconfig /etc/kubernetes/super-admin.conf)
changed=0

# Retry "$@" every 5 s for up to 450 s; then fail, saying what was awaited.
await() {
  local what=$1
  shift
  for _ in $(seq 90); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 5
  done
  echo "after 450 s still waiting for $what: $("$@" 2>&1 | tail -1)" >&2
  exit 1
}

await "the API server to be ready" "${super[@]}" get --raw /readyz
bind() {
  "${super[@]}" get clusterrolebinding "$1" >/dev/null 2>&1 && return 0
  "${super[@]}" create clusterrolebinding "$@" >/dev/null
  changed=1
}
bind kubeadm:cluster-admins --clusterrole=cluster-admin --group=kubeadm:cluster-admins
bind aihow:kube-proxy --clusterrole=system:node-proxier --user=system:kube-proxy

names=()
for arg in "$@"; do names+=("${arg%%=*}"); done
await "nodes ${names[*]} to register" "${admin[@]}" get node "${names[@]}" -o name
"${admin[@]}" wait --for=condition=Ready --timeout=450s node "${names[@]}" >/dev/null
await "the default service account" "${admin[@]}" get serviceaccount default -o name

for arg in "$@"; do
  IFS=, read -ra labels <<< "${arg#*=}"
  out=$("${admin[@]}" label node "${arg%%=*}" "${labels[@]}")
  grep -qE '^node/\S+ labeled$' <<< "$out" && changed=1  # (not "not labeled")
done
out=$("${admin[@]}" uncordon "${names[@]}")
grep -qE '^node/\S+ uncordoned$' <<< "$out" && changed=1
echo "changed=$changed"
