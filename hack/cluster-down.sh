#!/usr/bin/env bash
# Stops the local cluster that hack/cluster-up.sh started: the pods' containers (and their
# containerd shims), kube-proxy, kubelet, containerd, the control plane and etcd, each by
# the pid it recorded; unmounts what the kubelet and containerd mounted; removes the
# iptables chains kube-proxy, the kubelet and the CNI plugins added and the pods' veths.
# Keeps the PKI, the etcd data and the caches, so a later cluster-up is a restart.
#   --purge  also deletes $KUBETASK_STATE (certificates, etcd data, containerd's images).
# Idempotent; fast when nothing runs.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

purge=0
for a in "$@"; do
  case $a in
  --purge) purge=1 ;;
  -h | --help)
    sed -n '2,9p' "$0"
    exit 0
    ;;
  *) die "unknown argument $a (usage: $0 [--purge])" ;;
  esac
done
((EUID == 0)) || die "cluster-down needs root"
CONTAINERD_STATE="$(dirname "$CONTAINERD_SOCK")"
CONF="$KUBETASK_STATE/config"

# Pids of the processes in a pod's cgroup (the kubelet puts every pod under kubepods).
pod_pids() {
  local f pid
  for f in /proc/[0-9]*/cgroup; do
    pid="${f#/proc/}"
    pid="${pid%/cgroup}"
    grep -q ':/kubepods' "$f" 2>/dev/null && echo "$pid"
  done
  return 0
}
# Pids of the containerd-shim processes that serve our containerd (their command line
# names our socket), found by pid, never by a process-name pattern.
shim_pids() {
  local f pid
  for f in /proc/[0-9]*/cmdline; do
    pid="${f#/proc/}"
    pid="${pid%/cmdline}"
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == containerd-shim* ]] || continue
    [[ "$(tr '\0' ' ' 2>/dev/null <"$f")" == *"-address $CONTAINERD_SOCK "* ]] && echo "$pid"
  done
  return 0
}
# Pids of daemons started from $BIN_DIR or with our containerd config whose pid file is
# gone (a crashed script, a removed state dir): a last resort, still matched by pid.
stray_pids() {
  local f pid cmd
  for f in /proc/[0-9]*/cmdline; do
    pid="${f#/proc/}"
    pid="${pid%/cmdline}"
    [[ $pid != "$$" ]] || continue
    cmd="$(tr '\0' ' ' 2>/dev/null <"$f")" || continue
    case $cmd in
    "$BIN_DIR/"etcd\ * | "$BIN_DIR/"kube-apiserver\ * | "$BIN_DIR/"kube-controller-manager\ * | \
      "$BIN_DIR/"kube-scheduler\ * | "$BIN_DIR/"kubelet\ * | "$BIN_DIR/"kube-proxy\ --config\ * | \
      "containerd --config $CONF/containerd.toml"*) echo "$pid" ;;
    esac
  done
  return 0
}
kill_pids() { # signal pid...
  local sig=$1
  shift
  (($# > 0)) && kill "-$sig" "$@" 2>/dev/null
  return 0
}

# 1. The node agents first, so nothing restarts the pods while they are being stopped.
stop_daemon kube-proxy 10
stop_daemon kubelet 20

# 2. The pods: kill and delete every task and container in containerd's k8s.io namespace.
if pid_alive containerd >/dev/null; then
  ctr_() { ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }
  tasks="$(ctr_ tasks ls -q 2>/dev/null || true)"
  if [[ -n $tasks ]]; then
    log "stopping $(wc -w <<<"$tasks") pod container(s)"
    for t in $tasks; do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    # The CRI plugin deletes a task once it sees it exit; delete what it has not.
    no_tasks() { [[ -z "$(ctr_ tasks ls -q 2>/dev/null)" ]]; }
    wait_until 5 no_tasks || true
    for t in $(ctr_ tasks ls -q 2>/dev/null || true); do
      ctr_ tasks delete --force "$t" >/dev/null 2>&1 || true
    done
  fi
  containers="$(ctr_ containers ls -q 2>/dev/null || true)"
  for c in $containers; do
    ctr_ containers delete "$c" >/dev/null 2>&1 || true
    # libcni's result cache of the pod sandboxes (always /var/lib/cni with containerd 1.6).
    rm -f "/var/lib/cni/results/kubetask-$c-eth0" "/var/lib/cni/results/cni-loopback-$c-lo"
  done
fi
# Whatever is left in a pod cgroup (containerd not running, a task that would not die).
leftover="$(pod_pids)"
if [[ -n $leftover ]]; then
  log "killing leftover pod processes: $(tr '\n' ' ' <<<"$leftover")"
  # shellcheck disable=SC2086 # one pid per word
  kill_pids KILL $leftover
fi

# 3. containerd and the shims.
stop_daemon containerd 20
shims="$(shim_pids)"
if [[ -n $shims ]]; then
  # shellcheck disable=SC2086
  kill_pids TERM $shims
  for _ in $(seq 1 30); do
    [[ -z "$(shim_pids)" ]] && break
    sleep 0.1
  done
  shims="$(shim_pids)"
  # shellcheck disable=SC2086
  [[ -z $shims ]] || kill_pids KILL $shims
fi

# 4. The control plane and etcd.
stop_daemon kube-scheduler 10
stop_daemon kube-controller-manager 10
stop_daemon kube-apiserver 10
stop_daemon etcd 20

strays="$(stray_pids)"
if [[ -n $strays ]]; then
  log "stopping processes of the cluster that had no pid file: $(tr '\n' ' ' <<<"$strays")"
  # shellcheck disable=SC2086
  kill_pids TERM $strays
  sleep 2
  strays="$(stray_pids)"
  # shellcheck disable=SC2086
  [[ -z $strays ]] || kill_pids KILL $strays
fi

# 5. Mounts: the pods' network namespaces (created by containerd's CRI as /run/netns/cni-*),
# the kubelet's volumes and root-dir bind mount, containerd's rootfs and shm mounts.
mounts="$(findmnt -rn -o TARGET | grep -E "^($KUBETASK_STATE|$CONTAINERD_STATE|/run/netns/cni-|/var/run/netns/cni-)" | sort -r || true)"
if [[ -n $mounts ]]; then
  log "unmounting $(wc -l <<<"$mounts") mount(s)"
  while read -r m; do
    # findmnt -r escapes spaces as \x20
    m="$(printf '%b' "$m")"
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done <<<"$mounts"
fi
for ns in /run/netns/cni-*; do
  [[ -e $ns ]] && rm -f "$ns"
done

# 6. iptables: kube-proxy's own cleanup, then every KUBE-* and CNI-* chain and the rules
# that jump to them (the kubelet's KUBE-FIREWALL etc., the bridge plugin's masquerade
# chains, portmap's CNI-HOSTPORT-*), in IPv4 and IPv6.
# (No `| grep -q` here: under pipefail an early grep exit can SIGPIPE the writer.)
if [[ -x "$BIN_DIR/kube-proxy" && "$(iptables -t nat -S 2>/dev/null)" == *"-N KUBE-"* ]]; then
  "$BIN_DIR/kube-proxy" --cleanup --config "$CONF/kube-proxy-config.yaml" >/dev/null 2>&1 ||
    "$BIN_DIR/kube-proxy" --cleanup >/dev/null 2>&1 || true
fi
clean_chains() { # iptables|ip6tables
  local ipt=$1 table rule chain chains
  command -v "$ipt" >/dev/null || return 0
  for table in filter nat mangle raw; do
    "$ipt" -t "$table" -S >/dev/null 2>&1 || continue
    chains="$("$ipt" -t "$table" -S | sed -n 's/^-N \(\(KUBE\|CNI\)-[^ ]*\)$/\1/p')"
    # Rules in any chain (built-in ones included) that jump or go to our chains.
    while read -r rule; do
      [[ -n $rule ]] || continue
      eval "\"$ipt\" -w -t $table -D ${rule#-A }" 2>/dev/null || true
    done < <("$ipt" -t "$table" -S | grep -E -- '^-A [^ ]+ .*-[jg] (KUBE|CNI)-' |
      grep -vE -- '^-A (KUBE|CNI)-' || true)
    for chain in $chains; do "$ipt" -w -t "$table" -F "$chain" 2>/dev/null || true; done
    for chain in $chains; do "$ipt" -w -t "$table" -X "$chain" 2>/dev/null || true; done
  done
}
clean_chains iptables
clean_chains ip6tables

# 7. The pods' veths (normally gone with their network namespaces), the bridge unless
# PostgreSQL (hack/db.sh) listens on it, and the IP allocations of the dead pods.
if ip link show "$BRIDGE_NAME" >/dev/null 2>&1; then
  for v in $(ip -o link show master "$BRIDGE_NAME" type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$v" 2>/dev/null || true
  done
  if pid_alive postgres >/dev/null || [[ -n "$(ss -Hltnu "src $BRIDGE_IP" 2>/dev/null)" ]]; then
    log "PostgreSQL (or another server) listens on $BRIDGE_NAME ($BRIDGE_IP): keeping the bridge"
  else
    ip link del "$BRIDGE_NAME" 2>/dev/null || true
  fi
fi
rm -rf "$KUBETASK_STATE/cni/ipam"
# Paths the kubelet hard-codes outside its root dir: the device-plugin socket and the
# /var/log/containers symlinks into its pod log dir (dangling once the pods are gone).
rm -f /var/lib/kubelet/device-plugins/kubelet.sock
for l in /var/log/containers/*.log; do
  [[ -L $l && "$(readlink "$l")" == "$KUBETASK_STATE/"* ]] && rm -f "$l"
done

# 8. Check that nothing of ours survived.
left="$(stray_pids)$(shim_pids)$(pod_pids)"
[[ -z $left ]] || die "still running: $(tr '\n' ' ' <<<"$left")(see ps -fp PID)"

if ((purge)); then
  if pid_alive postgres >/dev/null; then
    die "PostgreSQL (hack/db.sh) is running: stop it (make db-down) before --purge"
  fi
  log "purging $KUBETASK_STATE and $CONTAINERD_STATE"
  # Anything still mounted below it (should be nothing by now) must not be followed.
  if [[ -n "$(findmnt -rn -o TARGET | grep "^$KUBETASK_STATE" || true)" ]]; then
    die "something is still mounted under $KUBETASK_STATE: not purging"
  fi
  rm -rf "$KUBETASK_STATE" "$CONTAINERD_STATE"
fi
log "cluster down"
