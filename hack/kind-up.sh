#!/usr/bin/env bash
# For users with Docker: a kind cluster with the kubetask images loaded into it.
#   1. kind create cluster --config kind-config.yaml (skipped if it exists)
#   2. docker build the runner and operator images from runner-image/ (default base image
#      python:3.11-slim-bookworm), tagged as on the local stack
#   3. kind load docker-image
# The chart's bundled PostgreSQL (postgresql.enabled) gives a database: docs/kind.md.
# KIND_CLUSTER overrides the name.
source "$(dirname "$0")/lib.sh"

KIND_CLUSTER="${KIND_CLUSTER:-kubetask}"
for c in docker kind kubectl; do
  command -v "$c" >/dev/null || die "$c is needed (docs/kind.md)"
done
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (docker info)"

clusters="$(kind get clusters 2>/dev/null || true)"
if grep -qxF "$KIND_CLUSTER" <<<"$clusters"; then
  log "kind cluster $KIND_CLUSTER exists"
else
  log "creating kind cluster $KIND_CLUSTER"
  kind create cluster --config "$REPO_ROOT/kind-config.yaml" --name "$KIND_CLUSTER"
fi

log "docker build $RUNNER_IMAGE"
docker build -f "$REPO_ROOT/runner-image/Containerfile" -t "$RUNNER_IMAGE" "$REPO_ROOT"
log "docker build $OPERATOR_IMAGE"
docker build -f "$REPO_ROOT/runner-image/operator.Containerfile" -t "$OPERATOR_IMAGE" "$REPO_ROOT"

log "kind load docker-image into $KIND_CLUSTER"
kind load docker-image --name "$KIND_CLUSTER" "$RUNNER_IMAGE" "$OPERATOR_IMAGE"

cat <<NEXT

kind cluster "$KIND_CLUSTER" is ready (kubectl context kind-$KIND_CLUSTER), with
  $RUNNER_IMAGE
  $OPERATOR_IMAGE

Next (docs/kind.md, "Step by step"):
  kubectl apply -f crds/
  helm upgrade --install kubetask helm/kubetask --namespace kubetask-system --create-namespace \\
    --set postgresql.enabled=true --wait --timeout 5m
  kubectl create namespace kubetask-demo
  kubectl -n kubetask-demo apply -f examples/hello/task.yaml
  kubectl -n kubetask-demo create -f examples/hello/run.yaml
NEXT
