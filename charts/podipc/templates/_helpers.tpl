{{/*
Names. The cluster-scoped objects and the webhook's Service and Secret have fixed names
(docs/design.md §3.2), because the controller finds them by name and there is one podipc per cluster.
*/}}
{{- define "podipc.webhookConfigName" -}}podipc-injector{{- end -}}
{{- define "podipc.webhookServiceName" -}}podipc-webhook{{- end -}}
{{- define "podipc.webhookSecretName" -}}podipc-webhook-tls{{- end -}}
{{- define "podipc.controllerName" -}}podipc-controller{{- end -}}
{{- define "podipc.identityServiceName" -}}podipc-identity{{- end -}}
{{- define "podipc.identitySecretName" -}}podipc-identity{{- end -}}
{{- define "podipc.identityTrustName" -}}podipc-identity-trust{{- end -}}
{{- define "podipc.sealSecretName" -}}podipc-seal{{- end -}}
{{- define "podipc.certificateName" -}}podipc-webhook{{- end -}}
{{- define "podipc.testName" -}}podipc-test-injection{{- end -}}

{{/* The image reference, digest winning over tag, tag defaulting to appVersion. */}}
{{- define "podipc.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "podipc.sidecarImage" -}}
{{- .Values.sidecar.image | default (include "podipc.image" .) -}}
{{- end -}}

{{/* Labels on every object the chart creates. */}}
{{- define "podipc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: podipc
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: podipc
{{- end -}}

{{/* Selector labels of the controller pods; never change them (Deployment selectors are immutable). */}}
{{- define "podipc.controllerSelectorLabels" -}}
app.kubernetes.io/name: podipc
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/* The restricted container securityContext (Pod Security Standards "restricted"). */}}
{{- define "podipc.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "podipc.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}
