#!/usr/bin/env bash
# Builds a tiny throwaway image from Debian's static busybox (nslookup, wget, nc, sh) for
# checking the local cluster's DNS and Services, and imports it into the cluster's
# containerd. Not used by the tests (they use the runner image from hack/images.sh).
#   hack/toolbox-image.sh         build (cached) and import; prints the image reference
# Use it with imagePullPolicy: Never or IfNotPresent, e.g.
#   kubectl run t --image=localhost/kubetask/toolbox:busybox --image-pull-policy=Never \
#     --restart=Never -- nslookup kubernetes.default.svc.cluster.local
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

TOOLBOX_IMAGE="$IMAGE_PREFIX/toolbox:busybox"
busybox=/bin/busybox
if [[ ! -x $busybox || "$(file -L "$busybox" 2>/dev/null || true)" != *"statically linked"* ]]; then
  if [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' busybox-static 2>/dev/null || true)" != ii* ]]; then
    log "installing busybox-static"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
  fi
fi
[[ -x $busybox ]] || die "$busybox not found (apt-get install busybox-static)"

archive="$KUBETASK_CACHE/images/toolbox-busybox.oci.tar"
if [[ ! -s $archive || $busybox -nt $archive ]]; then
  log "building $TOOLBOX_IMAGE from $busybox"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/bin" "$tmp/tmp" "$tmp/etc"
  cp "$busybox" "$tmp/bin/busybox"
  # One link per applet, so `nslookup`, `wget`, `sh`... resolve inside the image.
  for applet in $("$busybox" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$tmp/bin/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$tmp/etc/passwd"
  echo 'root:x:0:' >"$tmp/etc/group"
  c="$(buildah from scratch)"
  buildah copy --quiet "$c" "$tmp/bin" /bin >/dev/null
  buildah copy --quiet "$c" "$tmp/etc" /etc >/dev/null
  buildah copy --quiet "$c" "$tmp/tmp" /tmp >/dev/null
  buildah config --entrypoint '[]' --cmd '["/bin/sh"]' --env PATH=/bin "$c"
  buildah commit --quiet --rm "$c" "$TOOLBOX_IMAGE" >/dev/null
  buildah push --quiet "$TOOLBOX_IMAGE" "oci-archive:$archive.tmp:$TOOLBOX_IMAGE"
  mv "$archive.tmp" "$archive"
fi
if [[ -S $CONTAINERD_SOCK ]]; then
  image_present "$TOOLBOX_IMAGE" || import_image "$archive"
else
  log "the cluster's containerd is not running: built $archive only (run make cluster-up, then again)"
fi
echo "$TOOLBOX_IMAGE"
