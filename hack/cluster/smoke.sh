#!/usr/bin/env bash
# Smoke test of the running local cluster: a pod resolves kubernetes.default and a
# Service name through CoreDNS and reaches that Service's ClusterIP; kubectl logs and
# exec work (apiserver -> kubelet). Uses the busybox toolbox image (hack/toolbox-image.sh).
# Cleans up after itself (namespace kubetask-smoke).
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "$0")/../lib.sh"

ns=kubetask-smoke
img="$("$HACK_DIR/toolbox-image.sh")"
cleanup() { kc delete namespace "$ns" --wait=false --ignore-not-found >/dev/null 2>&1 || true; }
trap cleanup EXIT
fail() {
  kc -n "$ns" get pods -o wide >&2 || true
  die "smoke: $*"
}

# A namespace left Terminating by an earlier run cannot take new objects.
kc delete namespace "$ns" --ignore-not-found --timeout=60s >/dev/null
kc apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: $ns
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: $ns
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: web
          image: $img
          imagePullPolicy: Never
          command: [sh, -c, 'mkdir -p /tmp/www && echo kubetask-smoke-ok > /tmp/www/index.html && exec httpd -f -v -p 8080 -h /tmp/www']
          ports: [{containerPort: 8080}]
          readinessProbe:
            tcpSocket: {port: 8080}
            periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: $ns
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
YAML
kc -n "$ns" rollout status deploy/web --timeout=60s >/dev/null || fail "deployment web not ready"
web_ip="$(kc -n "$ns" get svc web -o jsonpath='{.spec.clusterIP}')"

# shellcheck disable=SC2016 # expanded in the pod
script='set -e
nslookup kubernetes.default.svc.'"$CLUSTER_DOMAIN"'
ip=$(nslookup web.'"$ns"'.svc.'"$CLUSTER_DOMAIN"' | awk "/^Address: /{a=\$2} END{print a}")
echo "web resolves to $ip"
# (busybox-static wget segfaults with -T: timeout instead)
timeout 5 wget -q -O- "http://$ip/"'
kc -n "$ns" run client --image="$img" --image-pull-policy=Never --restart=Never \
  --command -- sh -c "$script" >/dev/null
wait_until 60 bash -c "[[ \$(kubectl --kubeconfig '$KUBECONFIG_ADMIN' -n $ns get pod client -o jsonpath='{.status.phase}') == @(Succeeded|Failed) ]]" ||
  fail "client pod did not finish"
out="$(kc -n "$ns" logs client)"
printf '%s\n' "$out"
phase="$(kc -n "$ns" get pod client -o jsonpath='{.status.phase}')"
[[ $phase == Succeeded ]] || fail "client pod $phase"
grep -q "Address: $KUBERNETES_SVC_IP" <<<"$out" || fail "kubernetes.default did not resolve to $KUBERNETES_SVC_IP"
grep -q "web resolves to $web_ip" <<<"$out" || fail "web.$ns did not resolve to its ClusterIP $web_ip"
grep -q kubetask-smoke-ok <<<"$out" || fail "no answer from the web Service's ClusterIP"
[[ "$(kc -n "$ns" exec deploy/web -- cat /tmp/www/index.html)" == kubetask-smoke-ok ]] || fail "kubectl exec"
log "smoke: DNS, ClusterIP, kubectl logs and exec OK"
