#!/usr/bin/env bash
# Builds the Kubernetes components, etcd, CoreDNS and Helm from their Go modules
# through the Go module proxy, pinned by hack/versions.env, and caches them by version.
# A second run with the same versions returns at once.
source "$(dirname "$0")/lib.sh"

want=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd coredns helm)
missing=0
for b in "${want[@]}"; do [[ -x "$BIN_DIR/$b" ]] || missing=1; done
if [[ $missing == 0 ]]; then log "binaries cached in $BIN_DIR"; exit 0; fi

command -v go >/dev/null || die "Go is needed to build the Kubernetes binaries (https://go.dev/dl)"
mkdir -p "$BIN_DIR"
work="$KUBETASK_CACHE/build"
mkdir -p "$work"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces the staging modules
# with local paths. A wrapper module requires it and pins every staging module to the
# matching published v0.x version instead.
build_k8s() {
  local dir="$work/k8s-$K8S_VERSION"
  mkdir -p "$dir"
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "module kubetask.local/k8s-build"
    echo
    echo "go $(sed -n 's/^go //p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\1#p' "$gomod" |
      while read -r m; do echo "	$m => $m $K8S_STAGING_VERSION"; done
    echo ")"
  } >"$dir/go.mod"
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  (cd "$dir" && go mod tidy -e >/dev/null 2>&1 || true; cd "$dir" && go mod download)
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ldflags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=2000-01-01T00:00:00Z"
  done
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    [[ -x "$BIN_DIR/$c" ]] && continue
    log "building $c $K8S_VERSION (first run only; cached afterwards)"
    (cd "$dir" && go build -tags=tools -trimpath -ldflags "$ldflags" -o "$BIN_DIR/$c.tmp" "k8s.io/kubernetes/cmd/$c")
    mv "$BIN_DIR/$c.tmp" "$BIN_DIR/$c"
  done
}

# etcd's server module also carries relative replace directives; same wrapper trick.
build_etcd() {
  [[ -x "$BIN_DIR/etcd" ]] && return
  local dir="$work/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  local v="${ETCD_VERSION}"
  cat >"$dir/go.mod" <<MOD
module kubetask.local/etcd-build

go 1.23

require go.etcd.io/etcd/server/v3 $v

replace (
	go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 $v
	go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 $v
	go.etcd.io/etcd/client/v2 => go.etcd.io/etcd/client/v2 ${v/v3.5./v2.305.}
	go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 $v
	go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 $v
	go.etcd.io/etcd/raft/v3 => go.etcd.io/etcd/raft/v3 $v
)
MOD
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$dir" && go mod tidy -e >/dev/null 2>&1 || true)
  log "building etcd $ETCD_VERSION"
  (cd "$dir" && go build -tags=tools -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=kubetask" -o "$BIN_DIR/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$BIN_DIR/etcd.tmp" "$BIN_DIR/etcd"
}

build_simple() { # name module-path version package
  local name=$1 mod=$2 ver=$3 pkg=$4
  [[ -x "$BIN_DIR/$name" ]] && return
  local dir="$work/$name-$ver"
  mkdir -p "$dir"
  printf 'module kubetask.local/%s-build\n\ngo 1.24\n\nrequire %s %s\n' "$name" "$mod" "$ver" >"$dir/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" >"$dir/tools.go"
  (cd "$dir" && go mod tidy -e >/dev/null 2>&1 || true)
  log "building $name $ver"
  (cd "$dir" && go build -tags=tools -trimpath -ldflags "-s -w $5" -o "$BIN_DIR/$name.tmp" "$pkg")
  mv "$BIN_DIR/$name.tmp" "$BIN_DIR/$name"
}

build_etcd
build_k8s
build_simple coredns github.com/coredns/coredns "$COREDNS_VERSION" github.com/coredns/coredns ""
build_simple helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
log "binaries ready in $BIN_DIR"
