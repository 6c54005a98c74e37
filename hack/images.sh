#!/usr/bin/env bash
# Builds the kubetask images offline-style with buildah (no Docker engine, no registry)
# and imports them into the local cluster's containerd.
#
#   hack/images.sh base      Debian minimal base image ($BASE_IMAGE) from debootstrap
#   hack/images.sh runner    runner image ($RUNNER_IMAGE)     from runner-image/Containerfile
#   hack/images.sh operator  operator image ($OPERATOR_IMAGE) from runner-image/operator.Containerfile
#   hack/images.sh postgres  PostgreSQL for the chart's bundled database ($POSTGRES_IMAGE)
#                            from runner-image/postgres.Containerfile
#   hack/images.sh import    import the runner, operator and postgres archives into $CONTAINERD_SOCK
#   hack/images.sh all       base runner operator postgres import
#
# Everything is cached under $KUBETASK_CACHE/images: a step whose inputs did not change
# reuses its archive and returns at once. Inputs are
#   base:             DEBIAN_SUITE, the package list and the recipe version below
#   runner, operator: pyproject.toml, README.md, the operator/ tree, the Containerfile,
#                     the base image id
# KUBETASK_BUILD_CONTEXT overrides the build context (default: the repository root).
# KUBETASK_IMAGE_TAG tags the runner and operator images (default: the project version),
# e.g. so that a git worktree builds and imports its own without replacing the shared ones.
# KUBETASK_REBUILD=1 ignores the caches; KUBETASK_VERBOSE=1 shows the whole build output
# (otherwise it is in $KUBETASK_CACHE/images/<name>.build.log). DEBIAN_MIRROR overrides the Debian mirror
# (default: the first one apt on this host uses for $DEBIAN_SUITE).
source "$(dirname "$0")/lib.sh"

IMG_CACHE="$KUBETASK_CACHE/images"
CONTEXT="${KUBETASK_BUILD_CONTEXT:-$REPO_ROOT}"
REBUILD="${KUBETASK_REBUILD:-0}"
BASE_PACKAGES=(python3 python3-venv ca-certificates tini)
# Bump when the base recipe (trimming, config) changes: it is part of the cache key.
BASE_RECIPE=1
LABEL_INPUTS=dev.kubetask.inputs
BUILD_CA_BUNDLE="${KUBETASK_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

mkdir -p "$IMG_CACHE"

need() { command -v "$1" >/dev/null || die "$1 is missing: run 'make deps' (hack/install-deps.sh)"; }

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1"; }
image_label() { # image label
  buildah inspect --type image --format "{{index .ImageAnnotations \"$2\"}}{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null || true
}

# Load an OCI archive into buildah's store under the given name.
load_archive() { # archive ref
  local id
  id="$(buildah pull --quiet "oci-archive:$1" | tail -1)"
  buildah tag "$id" "$2"
}

# Write the image as an OCI archive, atomically.
export_archive() { # ref archive
  rm -f "$2.tmp"
  buildah push --quiet "$1" "oci-archive:$2.tmp:$1" >/dev/null
  mv -f "$2.tmp" "$2"
}

# Digest of the (single) manifest in an OCI archive, as containerd lists it.
archive_digest() { # archive
  tar -xOf "$1" index.json | python3 -c 'import json, sys; print(json.load(sys.stdin)["manifests"][0]["digest"])'
}

timed() { # name cmd...
  local name="$1" t0=$SECONDS
  shift
  "$@"
  log "$name: done in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- base

base_key() {
  printf '%s\n' "$DEBIAN_SUITE" "recipe=$BASE_RECIPE" "${BASE_PACKAGES[@]}" | sha256sum | cut -c1-16
}

debian_mirror() {
  if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
    echo "$DEBIAN_MIRROR"
    return
  fi
  local m
  # shellcheck disable=SC2016 # apt's own $(FIELD) placeholders
  m="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null |
    awk -v s="$DEBIAN_SUITE" '$2 == s {print $1; exit}')"
  [[ -n "$m" ]] || die "no Debian mirror for $DEBIAN_SUITE in this host's apt sources: set DEBIAN_MIRROR"
  echo "$m"
}

make_rootfs() { # tarball
  local tarball="$1" work rootfs
  need debootstrap
  work="$(mktemp -d "$IMG_CACHE/.rootfs.XXXXXX")"
  rootfs="$work/rootfs"
  local mirror
  mirror="$(debian_mirror)"
  log "debootstrap $DEBIAN_SUITE (minbase + ${BASE_PACKAGES[*]}) from $mirror"
  local incl
  incl="$(IFS=,; echo "${BASE_PACKAGES[*]}")"
  if ! debootstrap --variant=minbase --include="$incl" "$DEBIAN_SUITE" "$rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1; then
    tail -30 "$work/debootstrap.log" >&2
    rm -rf "$work"
    die "debootstrap failed"
  fi
  # Keep the image small, and small after any later apt-get install too (like the
  # official slim images): no docs, man pages, locales, apt lists or caches.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/kubetask-excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/kubetask-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,info,groff,lintian,linda,locale}/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/var/tmp/* "$rootfs"/root/.cache
  : >"$rootfs/etc/machine-id"
  : >"$rootfs/etc/hostname"
  rm -f "$rootfs/etc/resolv.conf"
  tar -C "$rootfs" --numeric-owner --xattrs -cf "$tarball.tmp" .
  mv -f "$tarball.tmp" "$tarball"
  rm -rf "$work"
  log "rootfs: $tarball ($(du -h "$tarball" | cut -f1))"
}

cmd_base() {
  need buildah
  local key rootfs archive ctr mnt
  key="$(base_key)"
  rootfs="$IMG_CACHE/debian-base-$DEBIAN_SUITE-$key.rootfs.tar"
  archive="$IMG_CACHE/debian-base-$DEBIAN_SUITE-$key.oci.tar"
  if [[ $REBUILD != 1 ]]; then
    if image_exists "$BASE_IMAGE" && [[ "$(image_label "$BASE_IMAGE" "$LABEL_INPUTS")" == "$key" ]]; then
      log "base: $BASE_IMAGE is up to date ($key)"
      return
    fi
    if [[ -s $archive ]]; then
      log "base: loading $BASE_IMAGE from $archive"
      load_archive "$archive" "$BASE_IMAGE"
      return
    fi
  else
    rm -f "$rootfs" "$archive"
  fi
  [[ -s $rootfs ]] || make_rootfs "$rootfs"
  log "base: building $BASE_IMAGE from $rootfs"
  ctr="$(buildah from scratch)"
  # Extract into the mounted container rather than `buildah copy`, which would reset
  # owners and modes (setgid binaries, /var/mail, ...) that the tarball carries.
  mnt="$(buildah mount "$ctr")"
  tar -C "$mnt" --numeric-owner --xattrs -xpf "$rootfs"
  buildah umount "$ctr" >/dev/null
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd /bin/bash \
    --label "$LABEL_INPUTS=$key" \
    --label org.opencontainers.image.title="kubetask Debian $DEBIAN_SUITE base" \
    --label org.opencontainers.image.description="debootstrap --variant=minbase + ${BASE_PACKAGES[*]}" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  export_archive "$BASE_IMAGE" "$archive"
  # Older keys of the same suite are dead weight.
  find "$IMG_CACHE" -maxdepth 1 -name "debian-base-$DEBIAN_SUITE-*" -not -name "*-$key.*" -delete
  log "base: $BASE_IMAGE -> $archive ($(du -h "$archive" | cut -f1))"
}

# ---------------------------------------------------------------- runner / operator

# Hash of everything a runner or operator build reads.
app_inputs_hash() { # containerfile
  local base_id
  base_id="$(image_id "$BASE_IMAGE")"
  {
    echo "base=$base_id"
    echo "context-files:"
    (
      cd "$CONTEXT" || exit 1
      {
        printf '%s\0' pyproject.toml
        if [[ -e README.md ]]; then printf '%s\0' README.md; fi
        find operator -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -not -name '*.pyc' -print0
      } | sort -z | xargs -0 sha256sum
    )
    echo "containerfile:"
    sha256sum <"$1"
    if [[ -e $CONTEXT/.dockerignore ]]; then sha256sum <"$CONTEXT/.dockerignore"; fi
  } | sha256sum | cut -c1-64
}

# The build's output: the STEP lines only, unless KUBETASK_VERBOSE=1.
show_build() {
  if [[ ${KUBETASK_VERBOSE:-0} == 1 ]]; then cat >&2; else grep --line-buffered '^STEP ' | cut -c1-120 >&2 || true; fi
}

# The archive of an image: runner and operator per KUBETASK_IMAGE_TAG, postgres once.
archive_of() { # name
  if [[ $1 == postgres ]]; then echo "$IMG_CACHE/postgres-15.oci.tar"; else echo "$IMG_CACHE/$1-$IMAGE_TAG.oci.tar"; fi
}

# Hash of what the postgres build reads: the base, its Containerfile and entrypoint.
postgres_inputs_hash() { # containerfile
  {
    echo "base=$(image_id "$BASE_IMAGE")"
    sha256sum <"$1"
    sha256sum <"$REPO_ROOT/runner-image/postgres-entrypoint.sh"
  } | sha256sum | cut -c1-64
}

build_app() { # name ref containerfile [inputs-hash function]
  local name="$1" ref="$2" cf="$3" hasher="${4:-app_inputs_hash}"
  need buildah
  image_exists "$BASE_IMAGE" || cmd_base
  [[ -f $CONTEXT/pyproject.toml && -d $CONTEXT/operator/kubetask ]] ||
    die "$CONTEXT is not a kubetask source tree (pyproject.toml, operator/kubetask)"
  local archive
  archive="$(archive_of "$name")"
  local stamp="$archive.inputs"
  local hash
  hash="$("$hasher" "$cf")"
  if [[ $REBUILD != 1 && -s $archive && -f $stamp && "$(cat "$stamp")" == "$hash" ]]; then
    log "$name: $ref is up to date (${hash:0:12}), archive $archive"
    return
  fi
  log "$name: building $ref (inputs ${hash:0:12})"
  local old_id=""
  if image_exists "$ref"; then old_id="$(image_id "$ref")"; fi
  # pip in the RUN steps trusts what this host trusts (a TLS-intercepting proxy's CA, say):
  # the host's CA bundle is bind-mounted over the image's own bundle for the RUN steps
  # only (an existing path, so no mount point is left behind in a layer) and named by
  # PIP_CERT, since pip otherwise uses its own copy of certifi.
  local ca_args=() img_bundle=/etc/ssl/certs/ca-certificates.crt
  if [[ -f $BUILD_CA_BUNDLE ]]; then
    ca_args=(--volume "$(readlink -f "$BUILD_CA_BUNDLE"):$img_bundle:ro" --build-arg "PIP_CERT=$img_bundle")
  fi
  # chroot isolation: RUN steps share the host's network (pip reaches PyPI) and need no
  # network namespace or CNI setup. --pull=never: the base only exists in the local store.
  local build_log="$IMG_CACHE/$name.build.log"
  if ! buildah bud \
    --isolation chroot \
    --pull=never \
    --layers --force-rm \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    "${ca_args[@]}" \
    --label "$LABEL_INPUTS=$hash" \
    --label "org.opencontainers.image.version=$PROJECT_VERSION" \
    -f "$cf" -t "$ref" "$CONTEXT" 2>&1 | tee "$build_log" | show_build; then
    tail -40 "$build_log" >&2
    die "$name: buildah bud failed (full log: $build_log)"
  fi
  # The image this build replaced is now untagged: drop it (its layers that the new one
  # shares stay; --layers keeps the intermediate images as the build cache).
  if [[ -n $old_id && $old_id != "$(image_id "$ref")" ]]; then
    if [[ -z "$(buildah inspect --type image --format '{{.Names}}' "$old_id" 2>/dev/null | tr -d '[]')" ]]; then
      buildah rmi "$old_id" >/dev/null 2>&1 || true
    fi
  fi
  rm -f "$stamp"
  export_archive "$ref" "$archive"
  echo "$hash" >"$stamp"
  log "$name: $ref -> $archive ($(du -h "$archive" | cut -f1))"
}

cmd_runner() { build_app runner "$RUNNER_IMAGE" "$REPO_ROOT/runner-image/Containerfile"; }
cmd_operator() { build_app operator "$OPERATOR_IMAGE" "$REPO_ROOT/runner-image/operator.Containerfile"; }
cmd_postgres() { build_app postgres "$POSTGRES_IMAGE" "$REPO_ROOT/runner-image/postgres.Containerfile" postgres_inputs_hash; }

# ---------------------------------------------------------------- import

cmd_import() {
  if [[ ! -S $CONTAINERD_SOCK ]]; then
    log "import: skipped, the cluster's containerd is not running ($CONTAINERD_SOCK missing); run 'make cluster-up' and then 'hack/images.sh import'"
    return 0
  fi
  need ctr
  local name ref archive want have
  for name in runner operator postgres; do
    case $name in
    runner) ref="$RUNNER_IMAGE" ;;
    operator) ref="$OPERATOR_IMAGE" ;;
    postgres) ref="$POSTGRES_IMAGE" ;;
    esac
    archive="$(archive_of "$name")"
    [[ -s $archive ]] || die "import: $archive missing: run 'hack/images.sh $name' first"
    want="$(archive_digest "$archive")"
    have="$(ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls "name==$ref" | awk 'NR == 2 {print $3}')"
    if [[ -n $want && $want == "$have" ]]; then
      log "import: $ref already in containerd ($want)"
      continue
    fi
    log "import: $ref into $CONTAINERD_SOCK (k8s.io)"
    import_image "$archive"
    image_present "$ref" ||
      die "import: $ref not listed by containerd after importing $archive"
  done
  log "import: done; containerd (k8s.io) has:"
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls | awk -v p="$IMAGE_PREFIX/" 'NR == 1 || index($1, p) == 1' >&2
}

cmd_all() {
  timed base cmd_base
  timed runner cmd_runner
  timed operator cmd_operator
  timed postgres cmd_postgres
  cmd_import
}

case "${1:-}" in
base | runner | operator | postgres | import | all) "cmd_$1" ;;
*)
  echo "usage: $0 base|runner|operator|postgres|import|all" >&2
  exit 2
  ;;
esac
