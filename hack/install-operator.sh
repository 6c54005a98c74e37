#!/usr/bin/env bash
# Installs (or upgrades) kubetask, CRDs and operator, with the Helm chart helm/kubetask
# into namespace kubetask-system, configured for the local stack (hack/lib.sh):
#   database.url = $DATABASE_URL_PODS, image = $OPERATOR_IMAGE, runnerImage = $RUNNER_IMAGE
# `make install` runs it. Steps:
#   1. make helm-crds (the chart's crds/ are copies of crds/)
#   2. kubectl apply --server-side of crds/ (Helm installs CRDs once and never upgrades them)
#   3. helm upgrade --install --wait; the operator image's digest in the cluster's containerd
#      is a pod annotation, so re-importing the image under the same tag restarts the operator
#   4. wait for the Deployment to be Available, print the API URL
#
# Cluster: $KUBECONFIG if set, else the local stack's admin kubeconfig.
# Overrides: KUBETASK_DATABASE_URL_PODS (database URL as the operator's pod sees it),
# KUBETASK_OPERATOR_IMAGE_ID (the annotation's value, when containerd is not local).
# Extra arguments go to `helm upgrade` (e.g. --set logLevel=DEBUG).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

NAMESPACE=kubetask-system
RELEASE=kubetask
DEPLOYMENT=kubetask-operator
OPERATOR_PODS="app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=operator"
CHART="$REPO_ROOT/helm/kubetask"
TIMEOUT=3m

for c in helm kubectl; do
  command -v "$c" >/dev/null || die "$c not found (make binaries)"
done
export KUBECONFIG="${KUBECONFIG:-$KUBECONFIG_ADMIN}"
[[ -r $KUBECONFIG ]] || die "no cluster: $KUBECONFIG is missing (make cluster-up)"
LOCAL_STACK=0
[[ $KUBECONFIG == "$KUBECONFIG_ADMIN" ]] && LOCAL_STACK=1
kubectl version --request-timeout=10s >/dev/null 2>&1 ||
  die "the cluster of $KUBECONFIG does not answer (make cluster-up)"

# What the operator's pod is like when it does not come up.
diagnose() {
  {
    printf '\n---- kubectl -n %s get pods,deploy,svc ----\n' "$NAMESPACE"
    kubectl -n "$NAMESPACE" get pods,deploy,svc -o wide 2>&1 || true
    printf '\n---- kubectl -n %s describe deployment/%s pods ----\n' "$NAMESPACE" "$DEPLOYMENT"
    kubectl -n "$NAMESPACE" describe "deployment/$DEPLOYMENT" 2>&1 | tail -25 || true
    kubectl -n "$NAMESPACE" describe pods -l "$OPERATOR_PODS" 2>&1 | tail -40 || true
    # Every replica's (the Deployment runs 2), each line prefixed with its pod.
    printf '\n---- operator logs (last 60 lines of each pod) ----\n'
    kubectl -n "$NAMESPACE" logs -l "$OPERATOR_PODS" --prefix --tail=60 --all-containers 2>&1 || true
    kubectl -n "$NAMESPACE" logs -l "$OPERATOR_PODS" --prefix --tail=60 --previous 2>/dev/null || true
    printf -- '---- end ----\n'
  } >&2
}

# 1. The chart's CRDs are copies of crds/.
make -s -C "$REPO_ROOT" helm-crds

# 2. CRDs first, and every time: Helm's crds/ directory is applied on the first install only.
log "applying the CRDs (server-side)"
kubectl apply --server-side --force-conflicts -f "$REPO_ROOT/crds/" >/dev/null
kubectl wait --for=condition=Established --timeout=60s \
  crd/tasks.kubetask.dev crd/runs.kubetask.dev crd/queues.kubetask.dev >/dev/null

# 3. The chart.
image_repo="${OPERATOR_IMAGE%:*}"
image_tag="${OPERATOR_IMAGE##*:}"
image_id="${KUBETASK_OPERATOR_IMAGE_ID:-}"
if [[ -z $image_id && $LOCAL_STACK == 1 && -S $CONTAINERD_SOCK ]]; then
  image_present "$OPERATOR_IMAGE" || die "$OPERATOR_IMAGE is not in the cluster's containerd (make images)"
  image_present "$RUNNER_IMAGE" || die "$RUNNER_IMAGE is not in the cluster's containerd (make images)"
  image_id="$(ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls "name==$OPERATOR_IMAGE" | awk 'NR == 2 {print $3}')"
fi
database_url="${KUBETASK_DATABASE_URL_PODS:-$DATABASE_URL_PODS}"

# The values in a file, not --set: the URL's characters (',', '=') mean things to --set, and
# the password stays off the command line.
values="$(mktemp)"
trap 'rm -f "$values"' EXIT
python3 - "$values" "$database_url" "$image_repo" "$image_tag" "$RUNNER_IMAGE" "$image_id" <<'PY'
import json, sys
path, url, repo, tag, runner, image_id = sys.argv[1:]
values = {
    "database": {"url": url},
    "image": {"repository": repo, "tag": tag, "pullPolicy": "IfNotPresent"},
    "runnerImage": runner,
    # A new digest under the same tag changes the pod template: Helm rolls the operator.
    "podAnnotations": {"kubetask.dev/image-id": image_id} if image_id else {},
}
with open(path, "w") as f:
    json.dump(values, f)  # JSON is YAML
PY

log "helm upgrade --install $RELEASE (namespace $NAMESPACE, image $OPERATOR_IMAGE${image_id:+ ${image_id:0:19}}, database ${database_url##*@})"
if ! helm upgrade --install "$RELEASE" "$CHART" \
  --namespace "$NAMESPACE" --create-namespace \
  --values "$values" \
  --wait --timeout "$TIMEOUT" "$@" >/dev/null; then
  diagnose
  die "helm upgrade --install failed (helm -n $NAMESPACE history $RELEASE)"
fi

# 4. Available (helm --wait also waits; this makes the contract explicit, and holds when
# something scaled the Deployment since).
replicas="$(kubectl -n "$NAMESPACE" get "deployment/$DEPLOYMENT" -o 'jsonpath={.spec.replicas}')"
if [[ $replicas == 0 ]]; then
  log "note: deployment/$DEPLOYMENT is scaled to 0 (the end-to-end tests pause it)"
elif ! kubectl -n "$NAMESPACE" wait --for=condition=Available --timeout=180s "deployment/$DEPLOYMENT" >/dev/null ||
  ! kubectl -n "$NAMESPACE" rollout status "deployment/$DEPLOYMENT" --timeout=180s >/dev/null; then
  diagnose
  die "deployment/$DEPLOYMENT did not become Available"
fi
revision="$(helm -n "$NAMESPACE" status "$RELEASE" -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["version"])')"
log "kubetask is installed (release $RELEASE revision $revision, deployment/$DEPLOYMENT Available)"

if [[ $LOCAL_STACK == 1 ]]; then
  api_url="$("$HACK_DIR/print.sh" api-url)"
  log "API: $api_url (from the host); attempt pods call http://kubetask-runner.$NAMESPACE.svc:8081"
  echo "$api_url"
else
  log "API: service kubetask-api in $NAMESPACE, port 8080 (kubectl port-forward to reach it from here); attempt pods call service kubetask-runner, port 8081"
fi
