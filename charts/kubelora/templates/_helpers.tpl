{{/* Names and labels. */}}
{{- define "kubelora.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubelora.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubelora.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kubelora.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kubelora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubelora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubelora.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubelora.fullname" .) .Values.serviceAccount.name -}}
{{- else if .Values.serviceAccount.name -}}
{{- .Values.serviceAccount.name -}}
{{- else if .Values.rbac.create -}}
{{- fail "serviceAccount.create=false with rbac.create=true needs serviceAccount.name: without it the operator's rights (create Jobs, read Secrets) would go to the namespace's default ServiceAccount, and with it to every pod there" -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{- define "kubelora.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) -}}
{{- end -}}

{{/*
RBAC: exactly the API calls the operator makes (tests/test_chart_rbac.py derives them by running the
operator against the emulated API server and compares). Namespaced resources go to the ClusterRole
(all namespaces) or to a Role in each watched namespace; cluster-scoped ones always to a ClusterRole.
*/}}
{{- define "kubelora.namespacedRules" -}}
- apiGroups: [kubelora.dev]
  resources: [loratrainingjobs]
  verbs: [get, list, watch, patch]
- apiGroups: [kubelora.dev]
  resources: [loratrainingjobs/status]
  verbs: [patch]
# the children's ownerReferences set blockOwnerDeletion: needs update on the owner's finalizers
# where OwnerReferencesPermissionEnforcement is on (e.g. OpenShift)
- apiGroups: [kubelora.dev]
  resources: [loratrainingjobs/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, watch, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, get, delete]
# a gang restart points the headless Service at the new Job's pods (patch)
- apiGroups: [""]
  resources: [services]
  verbs: [create, get, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
# the jobs' spec.storage.credentialsSecret (rbac.secretNames: only those)
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
  {{- with .Values.rbac.secretNames }}
  resourceNames: {{ toJson . }}
  {{- end }}
# events: the job's own (create); the Job controller's FailedCreate for pods refused by a quota or policy (list)
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
{{- if (.Values.networkPolicy | default dict).perJob }}
# networkPolicy.perJob: each job's NetworkPolicy (owned by the job: garbage-collected with it;
# deleted with the Job by runPolicy.ttlSecondsAfterFinished)
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, get, delete]
{{- end }}
{{- end -}}

{{- define "kubelora.clusterRules" -}}
# kopf: noticing the CRD being (re)installed
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
# a gang failure: is a pod's node Ready (a lost node's peers fail before its pod is marked
# DisruptionTarget); read-only, one get per node of the failed gang
- apiGroups: [""]
  resources: [nodes]
  verbs: [get]
{{- if .Values.watchNamespaces }}
# kopf: which of the watched namespaces exist (namespaced mode only)
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end -}}

{{/*
The pods' UID: runAsUser, "platform" (OpenShift assigns it), or 1000 when the value is missing
(helm upgrade --reuse-values over a release made before the value existed).
*/}}
{{- define "kubelora.runAsUser" -}}
{{- $v := .Values.runAsUser -}}
{{- if eq (toString $v) "platform" -}}platform{{- else -}}{{- int (default 1000 $v) -}}{{- end -}}
{{- end -}}

{{/*
operator.leaderElection with its defaults filled in: a release made before the value existed
(helm upgrade --reuse-values) gets the chart's defaults, election on; an explicit enabled: false stays.
*/}}
{{- define "kubelora.leaderElection" -}}
{{- $given := .Values.operator.leaderElection | default dict -}}
{{- toYaml (dict "enabled" (ternary $given.enabled true (hasKey $given "enabled"))
                 "leaseDurationSeconds" ($given.leaseDurationSeconds | default 15)
                 "renewDeadlineSeconds" ($given.renewDeadlineSeconds | default 10)
                 "retryPeriodSeconds" ($given.retryPeriodSeconds | default 2)) -}}
{{- end -}}


{{/*
The namespaces that get the trainers' NetworkPolicy (JSON list): networkPolicy.namespaces, else the
watched namespaces, else the release namespace only (a cluster-wide install: NOTES.txt warns that
the namespaces the jobs run in are not covered).
*/}}
{{- define "kubelora.networkPolicyNamespaces" -}}
{{- (.Values.networkPolicy | default dict).namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) | toJson -}}
{{- end }}
