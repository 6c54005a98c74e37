#!/usr/bin/env bash
# Brings up the local single-node Kubernetes cluster (no kind, no Docker, no systemd):
# containerd, etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy and CoreDNS, all started here as background processes with pid files
# under $KUBETASK_STATE/pids and logs under $KUBETASK_STATE/logs.
# Idempotent: on a running, healthy cluster it only checks and returns.
# See docs/local-cluster.md.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

start_time=$SECONDS
PKI="$KUBETASK_STATE/pki"
CONF="$KUBETASK_STATE/config"
STATE="$KUBETASK_STATE"
CONTAINERD_STATE="$(dirname "$CONTAINERD_SOCK")"
TEMPLATES="$HACK_DIR/cluster"
# shellcheck disable=SC2034 # used by render (templates)
POD_RANGE_START=10.88.0.2
APISERVER_PORT=6443
NODE_NAME="${NODE_NAME:-$(hostname | tr '[:upper:]' '[:lower:]')}"
# The node's address: the source address of the default route (no packet is sent).
# (Whole outputs captured first: no `| head` under pipefail.)
default_ip() {
  local routes addrs
  routes="$(ip -4 -o route show default 2>/dev/null)"
  [[ $routes =~ \ dev\ ([^ ]+) ]] || return 1
  addrs="$(ip -4 -o addr show dev "${BASH_REMATCH[1]}")"
  [[ $addrs =~ \ inet\ ([0-9.]+)/ ]] || return 1
  echo "${BASH_REMATCH[1]}"
}
NODE_IP="${NODE_IP:-$(default_ip || true)}"
[[ -n $NODE_IP ]] || NODE_IP=127.0.0.1
RUNC="$(command -v runc || echo /usr/sbin/runc)"
DAEMONS=(containerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

# ---------------------------------------------------------------- preflight
((EUID == 0)) || die "cluster-up needs root (containerd, kubelet, iptables)"
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd coredns; do
  [[ -x "$BIN_DIR/$b" ]] || die "$BIN_DIR/$b is missing: run 'make binaries' (hack/build-binaries.sh) first"
done
for c in containerd containerd-shim-runc-v2 ctr "$RUNC" buildah iptables gcc openssl; do
  command -v "$c" >/dev/null || die "$c not found: run 'make deps' (hack/install-deps.sh)"
done
[[ -x /usr/lib/cni/bridge ]] || die "CNI plugins missing in /usr/lib/cni: run 'make deps'"
mkdir -p "$PKI" "$CONF" "$PID_DIR" "$LOG_DIR" "$STATE/etcd" "$STATE/kubelet" \
  "$STATE/containerd" "$STATE/cni/net.d" "$STATE/cni/ipam" "$STATE/pod-logs" "$CONTAINERD_STATE" \
  "$KUBETASK_CACHE/images"
chmod 700 "$PKI" "$STATE/etcd"

# ---------------------------------------------------------------- PKI (openssl)
# Every file is generated once and reused; a new CA regenerates everything it signed.
gen_key() { # name
  [[ -s "$PKI/$1.key" ]] || (umask 077 && openssl genrsa -out "$PKI/$1.key" 2048 2>/dev/null)
}
# Signs <name>.crt with <ca> (default: the cluster CA). kind: client or server;
# san: subjectAltName value (server certificates).
gen_cert() { # name subject kind [san] [ca]
  local name=$1 subj=$2 kind=$3 san=${4:-} ca=${5:-ca} ext
  if [[ -s "$PKI/$name.crt" && "$PKI/$name.crt" -nt "$PKI/$ca.crt" ]]; then
    # Regenerate a serving cert whose SANs no longer match (node IP or name changed).
    [[ -z $san || "$(cat "$PKI/$name.san" 2>/dev/null)" == "$san" ]] && return 0
  fi
  gen_key "$name"
  ext="$(mktemp)"
  {
    echo "basicConstraints = critical, CA:FALSE"
    echo "keyUsage = critical, digitalSignature, keyEncipherment"
    if [[ $kind == server ]]; then
      echo "extendedKeyUsage = serverAuth"
      echo "subjectAltName = $san"
    else
      echo "extendedKeyUsage = clientAuth"
    fi
  } >"$ext"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" 2>/dev/null |
    openssl x509 -req -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" -CAcreateserial -CAserial "$PKI/$ca.srl" \
      -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$ext"
  printf '%s\n' "$san" >"$PKI/$name.san"
}
# A kubeconfig with the CA and the client cert embedded.
gen_kubeconfig() { # name user
  local name=$1 user=$2 f="$PKI/$1.kubeconfig"
  [[ -s $f && $f -nt "$PKI/$name.crt" ]] && return 0
  (
    umask 077
    cat >"$f.tmp" <<KCFG
apiVersion: v1
kind: Config
clusters:
  - name: kubetask-local
    cluster:
      server: https://127.0.0.1:$APISERVER_PORT
      certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
  - name: $user
    user:
      client-certificate-data: $(base64 -w0 "$PKI/$name.crt")
      client-key-data: $(base64 -w0 "$PKI/$name.key")
contexts:
  - name: kubetask-local
    context:
      cluster: kubetask-local
      user: $user
current-context: kubetask-local
KCFG
  )
  mv "$f.tmp" "$f"
}
gen_ca() { # name common-name
  gen_key "$1"
  openssl req -x509 -new -key "$PKI/$1.key" -subj "/CN=$2" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$PKI/$1.crt" 2>/dev/null
}
gen_pki() {
  if [[ ! -s "$PKI/ca.crt" || ! -s "$PKI/ca.key" ]]; then
    log "generating the cluster CA and certificates in $PKI"
    rm -f "$PKI"/*.crt "$PKI"/*.key "$PKI"/*.kubeconfig "$PKI"/*.san "$PKI"/*.srl "$PKI"/sa.pub
    gen_ca ca kubetask-local-ca
  fi
  # The aggregation layer's CA (requestheader authentication of the front proxy).
  [[ -s "$PKI/front-proxy-ca.crt" && -s "$PKI/front-proxy-ca.key" ]] || gen_ca front-proxy-ca kubetask-local-front-proxy-ca
  gen_cert front-proxy-client "/CN=front-proxy-client" client "" front-proxy-ca
  local apiserver_san="DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  apiserver_san+=",DNS:kubernetes.default.svc.$CLUSTER_DOMAIN,DNS:localhost,DNS:$NODE_NAME"
  apiserver_san+=",IP:$KUBERNETES_SVC_IP,IP:$NODE_IP,IP:127.0.0.1"
  gen_cert apiserver "/CN=kube-apiserver" server "$apiserver_san"
  gen_cert apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client" client
  gen_cert admin "/O=system:masters/CN=admin" client
  gen_cert controller-manager "/CN=system:kube-controller-manager" client
  gen_cert scheduler "/CN=system:kube-scheduler" client
  gen_cert kube-proxy "/CN=system:kube-proxy" client
  gen_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" client
  gen_cert kubelet-serving "/CN=$NODE_NAME" server "DNS:$NODE_NAME,DNS:localhost,IP:$NODE_IP,IP:127.0.0.1"
  gen_key sa
  [[ -s "$PKI/sa.pub" && "$PKI/sa.pub" -nt "$PKI/sa.key" ]] ||
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  gen_kubeconfig admin admin
  gen_kubeconfig controller-manager system:kube-controller-manager
  gen_kubeconfig scheduler system:kube-scheduler
  gen_kubeconfig kube-proxy system:kube-proxy
  gen_kubeconfig kubelet "system:node:$NODE_NAME"
}

# ---------------------------------------------------------------- configuration files
# Replaces every @VAR@ in a template by the value of the shell variable VAR (set -u
# makes an unknown one fatal).
render() { # template
  local content v
  content="$(<"$1")"
  while [[ $content =~ @([A-Z_]+)@ ]]; do
    v=${BASH_REMATCH[1]}
    content=${content//@"$v"@/${!v}}
  done
  printf '%s\n' "$content"
}
# Writes <dest> only when its content changes (so mtimes and hashes stay stable).
install_rendered() { # template dest
  local new
  new="$(render "$1")"
  [[ -f $2 && "$(<"$2")" == "$new" ]] || printf '%s\n' "$new" >"$2"
}
write_configs() {
  install_rendered "$TEMPLATES/containerd.toml" "$CONF/containerd.toml"
  install_rendered "$TEMPLATES/10-kubetask.conflist" "$STATE/cni/net.d/10-kubetask.conflist"
  install_rendered "$TEMPLATES/kubelet-config.yaml" "$CONF/kubelet-config.yaml"
  install_rendered "$TEMPLATES/kube-proxy-config.yaml" "$CONF/kube-proxy-config.yaml"
  install_rendered "$TEMPLATES/rbac.yaml" "$CONF/rbac.yaml"
  install_rendered "$TEMPLATES/coredns.yaml" "$CONF/coredns.yaml"
}
conf_hash() { cat "$@" | sha256sum | cut -c1-16; }

# ---------------------------------------------------------------- command lines
CONTAINERD_CMD=(containerd --config "$CONF/containerd.toml")
ETCD_CMD=(
  "$BIN_DIR/etcd" --name kubetask --data-dir "$STATE/etcd"
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380
  --initial-cluster kubetask=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
  --quota-backend-bytes 2147483648 --log-level warn
)
APISERVER_CMD=(
  "$BIN_DIR/kube-apiserver"
  --advertise-address "$NODE_IP" --bind-address 0.0.0.0 --secure-port "$APISERVER_PORT"
  --etcd-servers http://127.0.0.1:2379
  --client-ca-file "$PKI/ca.crt"
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key"
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt"
  --kubelet-client-key "$PKI/apiserver-kubelet-client.key"
  --kubelet-certificate-authority "$PKI/ca.crt"
  --kubelet-preferred-address-types "InternalIP,Hostname"
  --requestheader-client-ca-file "$PKI/front-proxy-ca.crt"
  --requestheader-allowed-names front-proxy-client
  --requestheader-username-headers X-Remote-User
  --requestheader-group-headers X-Remote-Group
  --requestheader-extra-headers-prefix X-Remote-Extra-
  --proxy-client-cert-file "$PKI/front-proxy-client.crt"
  --proxy-client-key-file "$PKI/front-proxy-client.key"
  --authorization-mode "Node,RBAC"
  --enable-admission-plugins NodeRestriction
  --enable-bootstrap-token-auth
  --service-cluster-ip-range "$SERVICE_CIDR"
  --service-account-issuer "https://kubernetes.default.svc.$CLUSTER_DOMAIN"
  --service-account-key-file "$PKI/sa.pub"
  --service-account-signing-key-file "$PKI/sa.key"
  --allow-privileged
  --profiling=false
  --v 1
)
CONTROLLER_MANAGER_CMD=(
  "$BIN_DIR/kube-controller-manager"
  --kubeconfig "$PKI/controller-manager.kubeconfig"
  --authentication-kubeconfig "$PKI/controller-manager.kubeconfig"
  --authorization-kubeconfig "$PKI/controller-manager.kubeconfig"
  --bind-address 127.0.0.1
  --cluster-name kubetask-local
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key"
  --root-ca-file "$PKI/ca.crt"
  --service-account-private-key-file "$PKI/sa.key"
  --service-cluster-ip-range "$SERVICE_CIDR"
  --use-service-account-credentials
  --controllers '*,bootstrapsigner,tokencleaner'
  --leader-elect=false
  --profiling=false
  --v 1
)
SCHEDULER_CMD=(
  "$BIN_DIR/kube-scheduler"
  --kubeconfig "$PKI/scheduler.kubeconfig"
  --authentication-kubeconfig "$PKI/scheduler.kubeconfig"
  --authorization-kubeconfig "$PKI/scheduler.kubeconfig"
  --bind-address 127.0.0.1
  --leader-elect=false
  --profiling=false
  --v 1
)
KUBELET_CMD=(
  "$BIN_DIR/kubelet"
  --config "$CONF/kubelet-config.yaml"
  --kubeconfig "$PKI/kubelet.kubeconfig"
  --root-dir "$STATE/kubelet"
  --hostname-override "$NODE_NAME"
  --node-ip "$NODE_IP"
  --v 1
)
PROXY_CMD=("$BIN_DIR/kube-proxy" --config "$CONF/kube-proxy-config.yaml" --v 1)

# ---------------------------------------------------------------- health checks
# (Subshells: a failed `exec 3<>/dev/tcp/...` must not end the script.)
etcd_healthy() (
  exec 3<>/dev/tcp/127.0.0.1/2379 || exit 1
  printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  [[ "$(timeout 3 cat <&3)" == *'"health":"true"'* ]]
)
apiserver_ready() { kc get --raw /readyz --request-timeout=3s >/dev/null 2>&1; }
# Ready, as posted by the running kubelet: after a restart the node object still shows
# the old kubelet's Ready for up to 40s, so the heartbeat must postdate the kubelet start.
node_ready() {
  local out status hb since
  out="$(kc get node "$NODE_NAME" --request-timeout=3s -o \
    'jsonpath={.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}' \
    2>/dev/null)" || return 1
  read -r status hb <<<"$out"
  [[ $status == True && -n $hb ]] || return 1
  since="$(stat -c %Y "$PID_DIR/kubelet.pid" 2>/dev/null || echo 0)"
  (($(date -d "$hb" +%s) >= since - 1))
}
# Ready in the API, and kube-dns's Service IP answers a real query from the host (the API
# status can be stale for a few seconds after a restart; the query cannot).
coredns_ready() {
  [[ "$(kc -n kube-system get deploy coredns --request-timeout=3s -o 'jsonpath={.status.readyReplicas}' 2>/dev/null)" == 1 ]] &&
    dns_resolves "$DNS_SVC_IP" "kubernetes.default.svc.$CLUSTER_DOMAIN" "$KUBERNETES_SVC_IP"
}
containerd_ready() { ctr --address "$CONTAINERD_SOCK" version >/dev/null 2>&1; }
# The daemons run, with the command lines and configuration this script would use.
daemons_current() {
  local d
  for d in "${DAEMONS[@]}"; do
    pid_alive "$d" >/dev/null || return 1
  done
  [[ "$(cat "$PID_DIR/containerd.cmd")" == "$(want_cmd containerd)" ]] &&
    [[ "$(cat "$PID_DIR/etcd.cmd")" == "$(want_cmd etcd)" ]] &&
    [[ "$(cat "$PID_DIR/kube-apiserver.cmd")" == "$(want_cmd kube-apiserver)" ]] &&
    [[ "$(cat "$PID_DIR/kube-controller-manager.cmd")" == "$(want_cmd kube-controller-manager)" ]] &&
    [[ "$(cat "$PID_DIR/kube-scheduler.cmd")" == "$(want_cmd kube-scheduler)" ]] &&
    [[ "$(cat "$PID_DIR/kubelet.cmd")" == "$(want_cmd kubelet)" ]] &&
    [[ "$(cat "$PID_DIR/kube-proxy.cmd")" == "$(want_cmd kube-proxy)" ]]
}
# What start_daemon records for a daemon (its command line, plus a hash of its config
# files as a trailing "# config:" word so that a config change restarts it).
want_cmd() { # name
  case $1 in
  containerd) echo "${CONTAINERD_CMD[*]} # config:$(conf_hash "$CONF/containerd.toml")" ;;
  etcd) echo "${ETCD_CMD[*]}" ;;
  kube-apiserver) echo "${APISERVER_CMD[*]} # config:$(conf_hash "$PKI/apiserver.crt" "$PKI/sa.pub" "$PKI/front-proxy-client.crt")" ;;
  kube-controller-manager) echo "${CONTROLLER_MANAGER_CMD[*]} # config:$(conf_hash "$PKI/controller-manager.kubeconfig")" ;;
  kube-scheduler) echo "${SCHEDULER_CMD[*]} # config:$(conf_hash "$PKI/scheduler.kubeconfig")" ;;
  kubelet) echo "${KUBELET_CMD[*]} # config:$(conf_hash "$CONF/kubelet-config.yaml" "$PKI/kubelet.kubeconfig" "$PKI/kubelet-serving.crt")" ;;
  kube-proxy) echo "${PROXY_CMD[*]} # config:$(conf_hash "$CONF/kube-proxy-config.yaml" "$PKI/kube-proxy.kubeconfig")" ;;
  esac
}
# Starts <name> unless it already runs as wanted (restarts it when its command line or
# configuration changed).
ensure() { # name cmd...
  local name=$1 want
  shift
  want="$(want_cmd "$name")"
  if pid_alive "$name" >/dev/null; then
    [[ "$(cat "$PID_DIR/$name.cmd" 2>/dev/null)" == "$want" ]] && return 0
    log "$name: command line or configuration changed, restarting it"
    stop_daemon "$name"
  fi
  log "starting $name"
  start_daemon "$name" "$@"
  printf '%s\n' "$want" >"$PID_DIR/$name.cmd"
}
# Waits for <check>; on timeout prints the tail of <name>'s log and fails.
await() { # name timeout what check...
  local name=$1 timeout=$2 what=$3
  shift 3
  if ! wait_until "$timeout" "$@"; then
    log_tail "$name" 40
    pid_alive "$name" >/dev/null || log "$name is not running (pid file $PID_DIR/$name.pid)"
    die "timed out after ${timeout}s waiting for $what (log: $LOG_DIR/$name.log)"
  fi
}

# ---------------------------------------------------------------- images
# Builds the pause binary from Kubernetes' own build/pause/linux/pause.c.
pause_archive() {
  local archive="$KUBETASK_CACHE/images/pause-$PAUSE_VERSION-k8s-$K8S_VERSION.oci.tar"
  if [[ ! -s $archive ]]; then
    log "building the pause image $PAUSE_IMAGE from k8s.io/kubernetes@$K8S_VERSION build/pause"
    local src tmp
    src="$(go env GOMODCACHE 2>/dev/null || echo "$HOME/go/pkg/mod")/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
    if [[ ! -f $src ]]; then
      command -v go >/dev/null || die "go is needed to fetch k8s.io/kubernetes@$K8S_VERSION (pause.c)"
      GOFLAGS=-mod=mod go mod download "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
    fi
    [[ -f $src ]] || die "pause.c not found at $src"
    tmp="$(mktemp -d)"
    gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-kubetask" -o "$tmp/pause" "$src"
    strip "$tmp/pause"
    build_scratch_image "$PAUSE_IMAGE" "$archive" '["/pause"]' "$tmp/pause:/pause"
    rm -rf "$tmp"
  fi
  echo "$archive"
}
coredns_archive() {
  local archive="$KUBETASK_CACHE/images/coredns-$COREDNS_VERSION.oci.tar"
  if [[ ! -s $archive || "$BIN_DIR/coredns" -nt $archive ]]; then
    log "building the CoreDNS image $COREDNS_IMAGE from $BIN_DIR/coredns"
    build_scratch_image "$COREDNS_IMAGE" "$archive" '["/coredns"]' "$BIN_DIR/coredns:/coredns"
  fi
  echo "$archive"
}
# Imports the pause and CoreDNS images when containerd does not have them (a fresh
# containerd root, or the kubelet's image GC removed them).
ensure_images() {
  local archive
  if ! image_present "$PAUSE_IMAGE"; then
    archive="$(pause_archive)"
    log "importing $PAUSE_IMAGE"
    import_image "$archive"
  fi
  if ! image_present "$COREDNS_IMAGE" || [[ "$BIN_DIR/coredns" -nt "$KUBETASK_CACHE/images/coredns-$COREDNS_VERSION.oci.tar" ]]; then
    archive="$(coredns_archive)"
    log "importing $COREDNS_IMAGE"
    import_image "$archive"
  fi
  image_present "$PAUSE_IMAGE" || die "$PAUSE_IMAGE is not in containerd after the import"
  image_present "$COREDNS_IMAGE" || die "$COREDNS_IMAGE is not in containerd after the import"
}

# ---------------------------------------------------------------- host setup
host_setup() {
  sysctl -qw net.ipv4.ip_forward=1
  if [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
    sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
  else
    modprobe br_netfilter 2>/dev/null || true
    [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] ||
      die "net.bridge.bridge-nf-call-iptables is missing: load br_netfilter (ClusterIPs need it)"
    sysctl -qw net.bridge.bridge-nf-call-iptables=1
  fi
  ensure_bridge
}

# ---------------------------------------------------------------- main
gen_pki
write_configs
ensure_bridge # cheap, and repairs the bridge's settings (its pinned MAC) on a running cluster

if daemons_current && apiserver_ready && node_ready && coredns_ready &&
  image_present "$PAUSE_IMAGE" && image_present "$COREDNS_IMAGE"; then
  log "cluster already running and healthy (node $NODE_NAME Ready; KUBECONFIG=$KUBECONFIG_ADMIN)"
  exit 0
fi

host_setup

ensure containerd "${CONTAINERD_CMD[@]}"
await containerd 30 "containerd on $CONTAINERD_SOCK" containerd_ready
ensure_images

ensure etcd "${ETCD_CMD[@]}"
await etcd 30 "etcd on 127.0.0.1:2379" etcd_healthy

ensure kube-apiserver "${APISERVER_CMD[@]}"
await kube-apiserver 90 "kube-apiserver /readyz" apiserver_ready

ensure kube-controller-manager "${CONTROLLER_MANAGER_CMD[@]}"
ensure kube-scheduler "${SCHEDULER_CMD[@]}"
ensure kubelet "${KUBELET_CMD[@]}"
ensure kube-proxy "${PROXY_CMD[@]}"

kc apply -f "$CONF/rbac.yaml" >/dev/null
kc apply -f "$CONF/coredns.yaml" >/dev/null

await kubelet 90 "node $NODE_NAME to be Ready" node_ready
for d in "${DAEMONS[@]}"; do
  pid_alive "$d" >/dev/null || {
    log_tail "$d" 40
    die "$d exited (log: $LOG_DIR/$d.log)"
  }
done
if ! wait_until 90 coredns_ready; then
  kc -n kube-system get pods -l k8s-app=kube-dns -o wide >&2 || true
  kc -n kube-system describe pods -l k8s-app=kube-dns 2>&1 | tail -25 >&2 || true
  log_tail kubelet 30
  die "timed out after 90s waiting for CoreDNS to be ready"
fi

log "cluster up in $((SECONDS - start_time))s: node $NODE_NAME Ready ($K8S_VERSION), API https://$NODE_IP:$APISERVER_PORT"
log "export KUBECONFIG=$KUBECONFIG_ADMIN"
