#!/usr/bin/env bash
# The hello example end to end, against the operator `make install` put in the cluster
# (`make demo` runs `make up` first):
#   1. examples/hello/task.yaml into namespace kubetask-demo (created if missing)
#   2. a Run from examples/hello/run.yaml, waited for until its phase is terminal
#   3. prints the Run's phase, output and attempts, then the run as PostgreSQL has it
#      (`kubetask runs get`) and its logs (`kubetask runs logs`), through the API
# Exits non-zero unless the run Succeeded. DEMO_TIMEOUT (seconds, default 180) bounds the
# wait. Cluster: $KUBECONFIG if set, else the local stack's; API: $KUBETASK_API_URL if
# set, else `hack/print.sh api-url`.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

DEMO_NS=kubetask-demo
SYSTEM_NS=kubetask-system
DEPLOYMENT=kubetask-operator
TIMEOUT="${DEMO_TIMEOUT:-180}"
KUBETASK="$REPO_ROOT/.venv/bin/kubetask"

command -v kubectl >/dev/null || die "kubectl not found (make binaries)"
[[ -x $KUBETASK ]] || die "$KUBETASK is missing (make venv)"
export KUBECONFIG="${KUBECONFIG:-$KUBECONFIG_ADMIN}"
[[ -r $KUBECONFIG ]] || die "no cluster: $KUBECONFIG is missing (make cluster-up)"
k() { kubectl --request-timeout=20s "$@"; }

operator_logs() {
  printf '\n---- operator logs (kubectl -n %s logs deploy/%s --tail=60) ----\n' "$SYSTEM_NS" "$DEPLOYMENT" >&2
  k -n "$SYSTEM_NS" logs "deploy/$DEPLOYMENT" --tail=60 >&2 2>&1 || true
  printf -- '---- end of operator logs ----\n' >&2
}

# The operator must be there and ready, or the Run would wait for ever.
if ! ready="$(k -n "$SYSTEM_NS" get "deployment/$DEPLOYMENT" -o 'jsonpath={.spec.replicas}/{.status.readyReplicas}' 2>&1)"; then
  die "no operator: deployment/$DEPLOYMENT in $SYSTEM_NS: $ready (make install)"
fi
case $ready in
0/*) die "deployment/$DEPLOYMENT is scaled to 0 (the end-to-end tests pause it while they run): kubectl -n $SYSTEM_NS scale deployment/$DEPLOYMENT --replicas=1, or make install" ;;
*/ | */0)
  log "waiting for deployment/$DEPLOYMENT to be Available ($ready ready)"
  if ! kubectl -n "$SYSTEM_NS" wait --for=condition=Available --timeout=120s "deployment/$DEPLOYMENT" >/dev/null; then
    operator_logs
    die "deployment/$DEPLOYMENT is not Available (kubectl -n $SYSTEM_NS describe deployment/$DEPLOYMENT)"
  fi
  ;;
esac

if ! k get namespace "$DEMO_NS" >/dev/null 2>&1; then
  log "creating namespace $DEMO_NS"
  k create namespace "$DEMO_NS" >/dev/null
fi
log "applying examples/hello/task.yaml in $DEMO_NS"
k -n "$DEMO_NS" apply -f "$REPO_ROOT/examples/hello/task.yaml" >/dev/null
run="$(k -n "$DEMO_NS" create -f "$REPO_ROOT/examples/hello/run.yaml" -o 'jsonpath={.metadata.name}')"
log "created run $DEMO_NS/$run; waiting up to ${TIMEOUT}s for it to finish"

phase="" last=""
deadline=$((SECONDS + TIMEOUT))
while :; do
  phase="$(k -n "$DEMO_NS" get "runs.kubetask.dev/$run" -o 'jsonpath={.status.phase}' 2>/dev/null || true)"
  if [[ $phase != "$last" ]]; then
    log "  phase: ${phase:-<none yet>} (${SECONDS}s)"
    last=$phase
  fi
  case $phase in Succeeded | Failed | Canceled | TimedOut) break ;; esac
  if ((SECONDS >= deadline)); then
    printf '\n---- kubectl -n %s describe runs.kubetask.dev/%s ----\n' "$DEMO_NS" "$run" >&2
    k -n "$DEMO_NS" describe "runs.kubetask.dev/$run" >&2 || true
    printf '\n---- kubectl -n %s get pods ----\n' "$DEMO_NS" >&2
    k -n "$DEMO_NS" get pods -o wide >&2 || true
    operator_logs
    die "run $DEMO_NS/$run did not finish within ${TIMEOUT}s (phase: ${phase:-none})"
  fi
  sleep 1
done

# The Run as Kubernetes has it.
run_json="$(k -n "$DEMO_NS" get "runs.kubetask.dev/$run" -o json)"
run_id="$(python3 -c 'import json, sys; print(json.load(sys.stdin)["status"]["runId"])' <<<"$run_json")"
python3 - "$run_json" <<'PY'
import json, sys
run = json.loads(sys.argv[1])
meta, st = run["metadata"], run.get("status") or {}
print(f"\n== Run {meta['namespace']}/{meta['name']} (kubectl get runs.kubetask.dev)")
print(f"phase:    {st.get('phase')}" + (f" ({st['reason']}: {st.get('message')})" if st.get("reason") else ""))
print(f"runId:    {st.get('runId')}")
print(f"output:   {json.dumps(st.get('output')) if 'output' in st else st.get('outputRef') or '-'}")
attempts = st.get("attempts") or []
print(f"attempts: {len(attempts)}")
print(f"  {'#':<3} {'POD':<28} {'EXIT':<5} REASON")
for a in attempts:
    exit_code = "-" if a.get("exitCode") is None else a["exitCode"]
    err = a.get("error")
    extra = f"  ({err.get('type', '')}: {err.get('message', '')})" if isinstance(err, dict) else ""
    print(f"  {a.get('number', '?'):<3} {a.get('pod') or '-':<28} {exit_code!s:<5} {a.get('reason') or '-'}{extra}")
PY

# The run as PostgreSQL has it, through the API (the CLI).
api_url="${KUBETASK_API_URL:-$("$HACK_DIR/print.sh" api-url)}"
printf '\n== kubetask runs get %s --api-url %s\n' "$run_id" "$api_url"
"$KUBETASK" runs get "$run_id" --api-url "$api_url"
printf '\n== kubetask runs logs %s --api-url %s\n' "$run_id" "$api_url"
"$KUBETASK" runs logs "$run_id" --api-url "$api_url"

if [[ $phase != Succeeded ]]; then
  operator_logs
  die "run $DEMO_NS/$run ended $phase, not Succeeded"
fi
printf '\n'
log "demo succeeded: run $DEMO_NS/$run ($run_id)"
