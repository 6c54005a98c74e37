#!/usr/bin/env bash
# Prints one value of the local stack's contract (hack/lib.sh), for `make -s <target>`
# and for scripts: kubeconfig | runner-image | operator-image | postgres-image | state-dir |
# pause-image | database-url | api-url
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

usage() { die "usage: $0 kubeconfig|runner-image|operator-image|postgres-image|pause-image|state-dir|database-url|api-url"; }
(($# == 1)) || usage

case $1 in
kubeconfig) echo "$KUBECONFIG_ADMIN" ;;
runner-image) echo "$RUNNER_IMAGE" ;;
operator-image) echo "$OPERATOR_IMAGE" ;;
postgres-image) echo "$POSTGRES_IMAGE" ;;
pause-image) echo "$PAUSE_IMAGE" ;;
state-dir) echo "$KUBETASK_STATE" ;;
database-url) echo "$DATABASE_URL_HOST" ;;
api-url)
  [[ -r $KUBECONFIG_ADMIN ]] || die "no cluster: $KUBECONFIG_ADMIN is missing (make cluster-up)"
  command -v kubectl >/dev/null || die "kubectl not found (make binaries)"
  if ! out="$(kc -n kubetask-system get service kubetask-api --request-timeout=5s \
    -o 'jsonpath={.spec.clusterIP}' 2>&1)"; then
    if [[ $out == *NotFound* || $out == *"not found"* ]]; then
      die "service kubetask-api does not exist in namespace kubetask-system (make install)"
    fi
    die "cannot read service kubetask-system/kubetask-api: $out"
  fi
  [[ -n $out && $out != None ]] || die "service kubetask-system/kubetask-api has no ClusterIP"
  echo "http://$out:8080"
  ;;
*) usage ;;
esac
