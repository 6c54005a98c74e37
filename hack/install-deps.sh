#!/usr/bin/env bash
# Installs the Debian packages the local stack needs (containerd, runc, buildah, the CNI
# plugins, iptables, PostgreSQL, a C compiler for the pause binary, Chromium for the
# dashboard's browser tests, ...).
# Idempotent: when every package is already installed it only runs dpkg-query and exits.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

pkgs=(containerd runc buildah containernetworking-plugins iptables conntrack socat ebtables
  ethtool debootstrap postgresql gcc libc6-dev openssl ca-certificates chromium)

missing=()
for p in "${pkgs[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)"
  [[ $status == ii* ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  log "Debian packages present"
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with your package manager"
sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || die "run as root (or install sudo): missing packages ${missing[*]}"
  sudo=(sudo)
fi
log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's containerd package starts a system containerd where systemd runs; the local
# cluster runs its own containerd (hack/cluster-up.sh) on its own socket, so that is harmless.
log "Debian packages installed"
