{{/* Names and labels shared by every template. */}}

{{- define "rko.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rko.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rko.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rko.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rko.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "rko.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "rko.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rko.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rko.keySecretName" -}}
{{- default (printf "%s-keys" (include "rko.fullname" .)) .Values.keySecret.name }}
{{- end }}

{{/* The namespaces watched in the namespaced modes, as a list; empty means every namespace. */}}
{{- define "rko.watchNamespaces" -}}
{{- if .Values.singleNamespace }}
{{- list .Release.Namespace | toJson }}
{{- else }}
{{- .Values.watchNamespaces | default list | toJson }}
{{- end }}
{{- end }}

{{/* Refuse combinations that cannot work, with what to change. */}}
{{- define "rko.validate" -}}
{{- $namespaces := include "rko.watchNamespaces" . | fromJsonArray }}
{{- if and .Values.singleNamespace .Values.watchNamespaces }}
{{- fail "Set singleNamespace or watchNamespaces, not both: singleNamespace means the release namespace only." }}
{{- end }}
{{- if and $namespaces .Values.kernels.perKernelNamespace }}
{{- fail "kernels.perKernelNamespace makes and deletes namespaces, a cluster-wide right: it cannot be combined with singleNamespace or watchNamespaces." }}
{{- end }}
{{- if and $namespaces .Values.kernels.checkNodes }}
{{- fail "kernels.checkNodes reads Nodes, a cluster-wide right: set it to false with singleNamespace or watchNamespaces." }}
{{- end }}
{{- if eq .Values.kernels.clusterRole "cluster-admin" }}
{{- fail "kernels.clusterRole=cluster-admin would give every kernel full control of the cluster; name a role with only what kernels need." }}
{{- end }}
{{- if not (has .Values.ssh.loadBalancing (list "round-robin" "least-connection")) }}
{{- fail "ssh.loadBalancing must be round-robin or least-connection." }}
{{- end }}
{{- if not (has .Values.kernels.transportEncryption (list "disabled" "auto" "required")) }}
{{- fail "kernels.transportEncryption must be disabled, auto or required." }}
{{- end }}
{{- range .Values.customObjects.kinds }}
{{- if not (and .group .resources) }}
{{- fail "Each customObjects.kinds entry needs group and resources (a list of plural names), e.g. {group: example.com, resources: [notebookjobs]}." }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The rules of the application block: what the operator does to RemoteKernels and to the
objects it makes for them. Used by the ClusterRole (every namespace) and by each Role (the
namespaced modes) alike, so the two can never differ.
*/}}
{{- define "rko.applicationRules" -}}
# kopf watches RemoteKernels and RemoteKernelPools, patches their finalizers and annotations;
# idle culling and the time to live delete; a deletion reads the status the API server holds
# now; pools create their kernels, and a claim swaps a pooled kernel's claim label.
- apiGroups: [kernel-operator.io]
  resources: [remotekernels, remotekernelpools]
  verbs: [get, list, watch, create, patch, delete]
# The phase, connection info and lastActivity; a pool's counts.
- apiGroups: [kernel-operator.io]
  resources: [remotekernels/status, remotekernelpools/status]
  verbs: [patch]
# The kubernetes backend's kernel pods, followed by one watch (not one read per kernel).
- apiGroups: [""]
  resources: [pods]
  verbs: [create, get, list, watch, delete]
# Each kernel's Secret (its connection key and sealed launcher key), made and removed with it.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, get, patch, delete]
{{- if .Values.customObjects.sparkApplications }}
# The sparkApplication backend's SparkApplications.
- apiGroups: [sparkoperator.k8s.io]
  resources: [sparkapplications]
  verbs: [create, get, delete]
{{- end }}
{{- range .Values.customObjects.kinds }}
# A customResource kind named in values.
- apiGroups: [{{ .group | quote }}]
  resources: {{ toJson .resources }}
  verbs: [create, get, delete]
{{- end }}
{{- end }}

{{/* The framework block: what kopf itself needs. */}}
{{- define "rko.frameworkRules" -}}
# An Event for each phase change and handler failure.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}
