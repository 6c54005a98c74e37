# Shared helpers for the hack/ scripts. Source it; do not run it.
set -euo pipefail
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"
# shellcheck source=versions.env
source "$HACK_DIR/versions.env"
KUBETASK_CACHE="${KUBETASK_CACHE:-$HOME/.cache/kubetask}"
# Runtime state of the local stack (certs, pids, logs, data). Outside the repo so a
# fresh clone sees the same running cluster.
KUBETASK_STATE="${KUBETASK_STATE:-/var/lib/kubetask-local}"
BIN_DIR="$KUBETASK_CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-coredns-$COREDNS_VERSION-helm-$HELM_VERSION"
export PATH="$BIN_DIR:$PATH"

log() { printf '\033[1;34m[kubetask]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[kubetask] error:\033[0m %s\n' "$*" >&2; exit 1; }

# ---- the contract between the hack/ scripts (keep in sync with docs/local-cluster.md) ----
PROJECT_VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO_ROOT/pyproject.toml" | head -1)"
IMAGE_PREFIX="localhost/kubetask"
# KUBETASK_IMAGE_TAG: another tag for the runner and operator images, so two checkouts
# on one machine (a worktree, say) can test their own code side by side.
IMAGE_TAG="${KUBETASK_IMAGE_TAG:-$PROJECT_VERSION}"
RUNNER_IMAGE="$IMAGE_PREFIX/runner:$IMAGE_TAG"
OPERATOR_IMAGE="$IMAGE_PREFIX/operator:$IMAGE_TAG"
# The chart's bundled PostgreSQL (postgresql.enabled) on the local stack: Debian's package,
# not tied to kubetask's version (runner-image/postgres.Containerfile).
POSTGRES_IMAGE="$IMAGE_PREFIX/postgres:15"
PAUSE_IMAGE="$IMAGE_PREFIX/pause:$PAUSE_VERSION"
COREDNS_IMAGE="$IMAGE_PREFIX/coredns:$COREDNS_VERSION"
BASE_IMAGE="$IMAGE_PREFIX/debian-base:$DEBIAN_SUITE"
# Pod network: a Linux bridge created by cluster-up (and by db-up if it runs first),
# so PostgreSQL and the host-side API can bind an address that pods reach.
BRIDGE_NAME=kubetask0
POD_CIDR=10.88.0.0/16
BRIDGE_IP=10.88.0.1
BRIDGE_MAC=02:6b:74:0a:58:01
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
DNS_SVC_IP=10.96.0.10
CLUSTER_DOMAIN=cluster.local
CONTAINERD_SOCK=/run/kubetask/containerd/containerd.sock
KUBECONFIG_ADMIN="$KUBETASK_STATE/pki/admin.kubeconfig"
PG_PORT=54329
DATABASE_URL_HOST="postgresql+psycopg://kubetask:kubetask@127.0.0.1:$PG_PORT/kubetask"
DATABASE_URL_PODS="postgresql+psycopg://kubetask:kubetask@$BRIDGE_IP:$PG_PORT/kubetask"

ensure_bridge() {
  if ! ip link show "$BRIDGE_NAME" >/dev/null 2>&1; then
    ip link add "$BRIDGE_NAME" type bridge
  fi
  # No `ip ... | grep -q`: under pipefail, grep's early exit can SIGPIPE ip and fail the test.
  if [[ "$(ip -4 addr show dev "$BRIDGE_NAME")" != *"inet $BRIDGE_IP/"* ]]; then
    ip addr add "$BRIDGE_IP/16" dev "$BRIDGE_NAME"
  fi
  # Pin the bridge's MAC. A Linux bridge otherwise takes the lowest MAC of its ports, so
  # it changes whenever that pod's veth goes away, and every pod's ARP entry for the
  # gateway goes stale: pods lose the host (PostgreSQL, the operator's API) for up to a
  # minute. Locally administered address, derived from 10.88.0.1.
  if [[ "$(ip link show dev "$BRIDGE_NAME")" != *"link/ether $BRIDGE_MAC "* ]]; then
    ip link set "$BRIDGE_NAME" address "$BRIDGE_MAC"
  fi
  ip link set "$BRIDGE_NAME" up
}

# Import an OCI archive into the cluster's containerd (k8s.io namespace, where the kubelet looks).
import_image() { # archive
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images import --no-unpack=false "$1" >/dev/null
}

# ---- process and wait helpers (hack/cluster-up.sh, hack/cluster-down.sh; usable by others) ----
# Every daemon the local stack starts has $PID_DIR/<name>.pid (one pid) and
# $LOG_DIR/<name>.log. <name> is the binary's name (its /proc comm, cut to 15 chars).
PID_DIR="$KUBETASK_STATE/pids"
LOG_DIR="$KUBETASK_STATE/logs"

# Prints the pid of daemon <name> and succeeds if its pid file names a live (non-zombie)
# process whose comm matches <name> (or [comm], when given).
pid_alive() { # name [comm]
  local f="$PID_DIR/$1.pid" comm="${2:-$1}" pid stat
  [[ -s $f ]] || return 1
  pid="$(<"$f")"
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  # /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces, so split on the last ')'.
  [[ ${stat##*) } != Z* ]] || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${comm:0:15}" ]] || return 1
  echo "$pid"
}

# Starts <cmd> detached (own session, no controlling tty), appending to $LOG_DIR/<name>.log,
# and records its pid in $PID_DIR/<name>.pid and its command line in $PID_DIR/<name>.cmd.
start_daemon() { # name cmd...
  local name=$1
  shift
  mkdir -p "$PID_DIR" "$LOG_DIR"
  # Keep one previous log once it passes 50 MB.
  if [[ -f "$LOG_DIR/$name.log" ]] && (($(stat -c %s "$LOG_DIR/$name.log") > 50000000)); then
    mv -f "$LOG_DIR/$name.log" "$LOG_DIR/$name.log.1"
  fi
  printf '\n==== %s starting %s: %s\n' "$(date -Is)" "$name" "$*" >>"$LOG_DIR/$name.log"
  # setsid and nohup exec the command, so $! is the daemon's own pid.
  setsid nohup "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  echo "$!" >"$PID_DIR/$name.pid"
  printf '%s\n' "$*" >"$PID_DIR/$name.cmd"
}

# Starts daemon <name> unless it already runs with the same command line; a daemon
# running with another command line (flags changed) is restarted.
ensure_daemon() { # name cmd...
  local name=$1
  shift
  if pid_alive "$name" >/dev/null; then
    [[ "$(cat "$PID_DIR/$name.cmd" 2>/dev/null)" == "$*" ]] && return 0
    log "$name: command line changed, restarting"
    stop_daemon "$name"
  fi
  start_daemon "$name" "$@"
}

# SIGTERM, wait up to [timeout] seconds, then SIGKILL. Removes the pid file.
stop_daemon() { # name [timeout-seconds] [comm]
  local name=$1 timeout=${2:-20} pid i
  if pid="$(pid_alive "$name" "${3:-$name}")"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
      pid_alive "$name" "${3:-$name}" >/dev/null || break
      sleep 0.1
    done
    if pid_alive "$name" "${3:-$name}" >/dev/null; then
      log "$name (pid $pid) ignored SIGTERM for ${timeout}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$PID_DIR/$name.pid" "$PID_DIR/$name.cmd"
}

# Retries <cmd> every half second until it succeeds or <timeout> seconds pass.
wait_until() { # timeout-seconds cmd...
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# The last lines of a component's log, for error messages.
log_tail() { # name [lines]
  local f="$LOG_DIR/$1.log"
  [[ -f $f ]] || return 0
  printf '\n---- last %s lines of %s ----\n' "${2:-30}" "$f" >&2
  tail -n "${2:-30}" "$f" >&2
  printf -- '---- end of %s ----\n' "$f" >&2
}

# kubectl against the local cluster as cluster admin.
kc() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# Is <ref> in the cluster's containerd (namespace k8s.io)?
image_present() { # ref
  # Not `ctr ... | grep -q` (pipefail + SIGPIPE, see ensure_bridge).
  local refs
  refs="$(ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls -q "name==$1" 2>/dev/null)" || return 1
  grep -qxF "$1" <<<"$refs"
}

# Builds an image FROM scratch holding the given files, with buildah, and writes it as an
# OCI archive. Each file is src:dest. The archive's reference is <ref>, so import_image
# names the image <ref> in containerd.
build_scratch_image() { # ref archive entrypoint-json src:dest...
  local ref=$1 archive=$2 entrypoint=$3 c spec
  shift 3
  mkdir -p "$(dirname "$archive")"
  c="$(buildah from scratch)"
  for spec in "$@"; do buildah copy --quiet "$c" "${spec%%:*}" "${spec#*:}" >/dev/null; done
  buildah config --entrypoint "$entrypoint" \
    --label "org.opencontainers.image.title=$ref" "$c"
  buildah commit --quiet --rm "$c" "$ref" >/dev/null
  rm -f "$archive.tmp"
  buildah push --quiet "$ref" "oci-archive:$archive.tmp:$ref"
  mv "$archive.tmp" "$archive"
}

# Succeeds if <server> answers an A query for <name> over TCP with <ip> (bash only: no
# dig on a minimal machine). Exercises the Service IP (kube-proxy rules), the CoreDNS pod
# and its view of the API.
dns_resolves() ( # server name ip
  local server=$1 name=$2 ip=$3 q label len resp want o
  local -a labels
  q='\x00\x2a\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00' # id 42, recursion desired, 1 question
  IFS=. read -ra labels <<<"$name"
  for label in "${labels[@]}"; do q+="$(printf '\\x%02x' "${#label}")$label"; done
  q+='\x00\x00\x01\x00\x01' # root label, type A, class IN
  # shellcheck disable=SC2059 # q is a printf format of \x escapes and [a-z0-9-] labels
  len="$(printf "$q" | wc -c)"
  exec 2>/dev/null 3<>"/dev/tcp/$server/53" || exit 1
  # shellcheck disable=SC2059
  { printf "\\x$(printf %02x $((len >> 8)))\\x$(printf %02x $((len & 255)))"; printf "$q"; } >&3
  len="$(timeout 2 dd bs=1 count=2 <&3 2>/dev/null | od -An -tu1 | awk '{print $1 * 256 + $2}')"
  [[ $len =~ ^[0-9]+$ ]] && ((len > 12)) || exit 1
  resp="$(timeout 2 dd bs="$len" count=1 iflag=fullblock <&3 2>/dev/null | od -An -v -tx1 | tr -d ' \n')"
  # rcode 0 (low nibble of byte 3), at least one answer, and <ip> as the last answer's rdata.
  [[ ${resp:7:1} == 0 && ${resp:12:4} != 0000 ]] || exit 1
  want=""
  IFS=. read -ra o <<<"$ip"
  for label in "${o[@]}"; do want+="$(printf %02x "$label")"; done
  [[ $resp == *"0004$want" ]]
)
