{{/* The prefix of every object's name (values: fullnameOverride, default "kubetask"). */}}
{{- define "kubetask.fullname" -}}
{{- default "kubetask" .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetask.operatorName" -}}
{{- printf "%s-operator" (include "kubetask.fullname" .) -}}
{{- end -}}

{{- define "kubetask.apiServiceName" -}}
{{- printf "%s-api" (include "kubetask.fullname" .) -}}
{{- end -}}

{{/* The Service of the runner listener (/runner/v1), which attempt pods call. */}}
{{- define "kubetask.runnerServiceName" -}}
{{- printf "%s-runner" (include "kubetask.fullname" .) -}}
{{- end -}}

{{- define "kubetask.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetask.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the database URL, and its key. */}}
{{- define "kubetask.databaseSecretName" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- printf "%s-database" (include "kubetask.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "kubetask.postgresqlName" -}}
{{- printf "%s-postgresql" (include "kubetask.fullname" .) -}}
{{- end -}}

{{/* Labels of the bundled PostgreSQL's objects (kubetask.labels but component=database:
     the operator's selectors never match them). */}}
{{- define "kubetask.databaseSelectorLabels" -}}
app.kubernetes.io/name: kubetask
app.kubernetes.io/component: database
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubetask.databaseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: kubetask
{{ include "kubetask.databaseSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubetask.databaseSecretKey" -}}
{{- if .Values.database.existingSecret -}}
{{- default "url" .Values.database.existingSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{/* The URL runner pods use to reach the runner listener. */}}
{{- define "kubetask.publicUrl" -}}
{{- if .Values.api.publicUrl -}}
{{- .Values.api.publicUrl -}}
{{- else -}}
{{- printf "http://%s.%s.svc:%d" (include "kubetask.apiServiceName" .) .Release.Namespace (int .Values.api.port) -}}
{{- end -}}
{{- end -}}

{{- define "kubetask.apiUrl" -}}
{{- if .Values.api.url -}}
{{- .Values.api.url -}}
{{- else -}}
{{- printf "http://%s.%s.svc:%d" (include "kubetask.runnerServiceName" .) .Release.Namespace (int .Values.api.runnerPort) -}}
{{- end -}}
{{- end -}}

{{- define "kubetask.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}

{{- define "kubetask.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: kubetask
{{ include "kubetask.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of the operator's pods. Not app.kubernetes.io/managed-by=kubetask:
     that label marks the attempt pods the operator watches. */}}
{{- define "kubetask.selectorLabels" -}}
app.kubernetes.io/name: kubetask
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The leader-election Lease, in the release namespace: one per release, so that two
     releases sharing a namespace do not elect one leader between them. */}}
{{- define "kubetask.leaseName" -}}
{{- include "kubetask.operatorName" . -}}
{{- end -}}

{{/* A number >= 0 (seconds, days) as an environment variable's value, from
     (list "<value's name>" value). Numbers in values files are float64 in Helm; their
     printed form (10, 0.5, 1e+06) is what Python's float() reads. */}}
{{- define "kubetask.number" -}}
{{- $name := index . 0 -}}
{{- $value := index . 1 | toString -}}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(e[+-]?[0-9]+)?$" $value) -}}
{{- fail (printf "%s must be a number >= 0, not %q" $name $value) -}}
{{- end -}}
{{- $value -}}
{{- end -}}

{{/* An integer >= 0 as an environment variable's value, from (list "<name>" value):
     printed in full (a float64 such as 1209600 would print as 1.2096e+06, which the
     operator does not read as an integer). */}}
{{- define "kubetask.integer" -}}
{{- $name := index . 0 -}}
{{- $number := include "kubetask.number" . | float64 -}}
{{- $integer := int64 $number -}}
{{- if ne $number (float64 $integer) -}}
{{- fail (printf "%s must be an integer, not %v" $name (index . 1)) -}}
{{- end -}}
{{- $integer | toString -}}
{{- end -}}

{{/* Settings that would make the operator unsafe or fail at start-up, refused at
     install time. */}}
{{- define "kubetask.validate" -}}
{{- if and .Values.postgresql.enabled (or .Values.database.url .Values.database.existingSecret) -}}
{{- fail "postgresql.enabled=true and database.url/database.existingSecret are both set: choose the bundled PostgreSQL or your own, not both" -}}
{{- end -}}
{{- $le := .Values.leaderElection -}}
{{- if and (not $le.enabled) (gt (int .Values.replicaCount) 1) -}}
{{- fail "leaderElection.enabled=false needs replicaCount 1: without an elected leader every replica would reconcile and create pods" -}}
{{- end -}}
{{- if $le.enabled -}}
{{- $lease := include "kubetask.number" (list "leaderElection.leaseDurationSeconds" $le.leaseDurationSeconds) | float64 -}}
{{- $renew := include "kubetask.number" (list "leaderElection.renewDeadlineSeconds" $le.renewDeadlineSeconds) | float64 -}}
{{- $retry := include "kubetask.number" (list "leaderElection.retryPeriodSeconds" $le.retryPeriodSeconds) | float64 -}}
{{- if not (lt $renew $lease) -}}
{{- fail (printf "leaderElection.renewDeadlineSeconds (%v) must be less than leaseDurationSeconds (%v): a leader that cannot renew must stop before another replica may take over" $le.renewDeadlineSeconds $le.leaseDurationSeconds) -}}
{{- end -}}
{{- if not (and (lt $retry $renew) (gt $retry 0.0)) -}}
{{- fail (printf "leaderElection.retryPeriodSeconds (%v) must be more than 0 and less than renewDeadlineSeconds (%v): the leader needs more than one try to renew" $le.retryPeriodSeconds $le.renewDeadlineSeconds) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's rights on namespaced resources: a ClusterRole's rules (the whole
     cluster) or a Role's in each of watchNamespaces. Every verb is one the operator's
     code uses (docs/security.md, "The operator's rights"). */}}
{{- define "kubetask.namespacedRules" -}}
# kopf watches Tasks, Runs, Queues and Schedules; the controller and the public API read them.
- apiGroups: [kubetask.dev]
  resources: [runs, tasks, queues, schedules]
  verbs: [get, list, watch]
# The public API pauses and resumes a Schedule (a patch of spec.paused) for callers allowed to.
- apiGroups: [kubetask.dev]
  resources: [schedules]
  verbs: [patch]
# The public API creates Runs (trigger, batch, replay, a durable run's children) and
# cancels them (a patch of spec.cancel); the controller deletes finished Runs past their
# TTL, the API a Run that lost its idempotencyKey to another (both with a uid precondition).
- apiGroups: [kubetask.dev]
  resources: [runs]
  verbs: [create, patch, delete]
# The public API's queue PATCH (pause, limits): a patch, or a create when the Queue is missing.
- apiGroups: [kubetask.dev]
  resources: [queues]
  verbs: [create, patch]
# The public API reads a Webhook to verify a delivery (and, below, its Secret).
- apiGroups: [kubetask.dev]
  resources: [webhooks]
  verbs: [get]
# The controller writes the status of Runs, Tasks, Queues and Schedules (merge patches).
- apiGroups: [kubetask.dev]
  resources: [runs/status, tasks/status, queues/status, schedules/status]
  verbs: [patch]
# Attempt pods: created, watched (label-selected), read, deleted.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
# Token Secrets, one per attempt (create, or update a stale one); the resync lists them
# (label-selected) and deletes those of attempts that are over. `get`: a Webhook's Secret.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, create, update, delete]
# The ConfigMap of an inline Task's source (created once, owned by the Task).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create]
{{- if .Values.networkPolicy.enabled }}
# The runner NetworkPolicy (networkPolicy.enabled) of each namespace with attempt pods:
# created, or replaced when the operator starts with other settings.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, update]
{{- end }}
{{- if .Values.runner.serviceAccountName }}
# The runner ServiceAccount (runner.serviceAccountName), created where it is missing: no
# token, no binding.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [create]
{{- end }}
# kopf reports handler errors as Events of the object.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}


{{/* The spec of the NetworkPolicy the operator keeps in each namespace with attempt pods
     (KUBETASK_RUNNER_NETWORK_POLICY): nothing comes in; out, only the operator's runner
     port, DNS and networkPolicy.runnerEgress. */}}
{{- define "kubetask.runnerNetworkPolicy" -}}
podSelector:
  matchLabels:
    app.kubernetes.io/managed-by: kubetask
  matchExpressions:
    - key: kubetask.dev/run-id
      operator: Exists
policyTypes: [Ingress, Egress]
ingress: []
egress:
  - to:
      - namespaceSelector:
          matchLabels:
            kubernetes.io/metadata.name: {{ .Release.Namespace }}
        podSelector:
          matchLabels:
            {{- include "kubetask.selectorLabels" . | nindent 12 }}
    ports:
      - protocol: TCP
        port: {{ .Values.api.runnerPort }}
  - ports:
      - protocol: UDP
        port: 53
      - protocol: TCP
        port: 53
    {{- with .Values.networkPolicy.dnsTo }}
    to:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  {{- with .Values.networkPolicy.runnerEgress }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}
