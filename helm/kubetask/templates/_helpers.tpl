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

{{- define "kubetask.databaseSecretKey" -}}
{{- if .Values.database.existingSecret -}}
{{- default "url" .Values.database.existingSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{/* The URL runner pods use to reach the API. */}}
{{- define "kubetask.apiUrl" -}}
{{- if .Values.api.url -}}
{{- .Values.api.url -}}
{{- else -}}
{{- printf "http://%s.%s.svc:%d" (include "kubetask.apiServiceName" .) .Release.Namespace (int .Values.api.port) -}}
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
