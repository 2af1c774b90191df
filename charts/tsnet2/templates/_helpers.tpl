{{/* Names: trunc 63 (DNS label), component names cut to 55 so "-<component>" still fits. */}}
{{- define "tsnet2.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tsnet2.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>": call with (list . "component"). */}}
{{- define "tsnet2.component" -}}
{{- printf "%s-%s" (include "tsnet2.fullname" (index . 0)) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tsnet2.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Stable selector labels: call with (list . "component"). */}}
{{- define "tsnet2.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tsnet2.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* All labels: call with (list . "component"). */}}
{{- define "tsnet2.labels" -}}
{{- $ctx := index . 0 -}}
{{ include "tsnet2.selectorLabels" . }}
app.kubernetes.io/part-of: tsnet2
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
helm.sh/chart: {{ include "tsnet2.chart" $ctx }}
{{- with $ctx.Values.global.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tsnet2.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "tsnet2.component" (list . "operator")) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tsnet2.peeringName" -}}
{{- default (printf "%s-%s" (include "tsnet2.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-") .Values.operator.peering.name -}}
{{- end -}}

{{/* repository[:tag][@digest]: call with (list image defaultRepository defaultTag). */}}
{{- define "tsnet2.imageRef" -}}
{{- $img := index . 0 -}}
{{- $repo := default (index . 1) $img.repository -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default (index . 2) $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "tsnet2.operatorImage" -}}
{{- include "tsnet2.imageRef" (list .Values.operator.image .Values.operator.image.repository .Chart.AppVersion) -}}
{{- end -}}

{{/* The sidecar image: its own repository (default: the operator's + "-sidecar", the
Containerfile's sidecar target), tag (default: the operator's, else appVersion) and digest
(never the operator's: another image). */}}
{{- define "tsnet2.sidecarImage" -}}
{{- $op := .Values.operator.image -}}
{{- include "tsnet2.imageRef" (list .Values.sidecar.image (printf "%s-sidecar" $op.repository) (default .Chart.AppVersion $op.tag)) -}}
{{- end -}}

{{/* Secrets holding the serving certificates (tls.crt, tls.key, ca.crt). */}}
{{- define "tsnet2.webhookSecretName" -}}
{{- include "tsnet2.component" (list . "webhook-tls") -}}
{{- end -}}
{{- define "tsnet2.controlSecretName" -}}
{{- include "tsnet2.component" (list . "control-tls") -}}
{{- end -}}

{{/* DNS names of a Service: call with (list . "service-name"). */}}
{{- define "tsnet2.serviceDNSNames" -}}
{{- $ctx := index . 0 -}}
{{- $svc := index . 1 -}}
{{- $ns := $ctx.Release.Namespace -}}
{{- toJson (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) -}}
{{- end -}}

{{/*
Self-signed TLS material, generated once per render and cached in .Values (templates render
from the same values map), reused from existing Secrets on upgrade via `lookup` (empty with
`helm template`, so a dry render always generates). Returns JSON:
{"webhook": {"ca","crt","key"}, "control": {"ca","crt","key"}} (base64-free PEM).
*/}}
{{- define "tsnet2.selfSignedTLS" -}}
{{- if not (hasKey .Values "__tsnet2TLS") -}}
{{- $days := int .Values.tls.validityDays -}}
{{- $out := dict -}}
{{- $ca := dict -}}
{{- range $part := list "webhook" "control" -}}
{{- $secretName := ternary (include "tsnet2.webhookSecretName" $) (include "tsnet2.controlSecretName" $) (eq $part "webhook") -}}
{{- $existing := lookup "v1" "Secret" $.Release.Namespace $secretName -}}
{{- if and $existing (hasKey ($existing.data | default dict) "ca.crt") (hasKey $existing.data "tls.crt") (hasKey $existing.data "tls.key") -}}
{{- $_ := set $out $part (dict "ca" (index $existing.data "ca.crt" | b64dec) "crt" (index $existing.data "tls.crt" | b64dec) "key" (index $existing.data "tls.key" | b64dec)) -}}
{{- else -}}
{{- if not (hasKey $ca "ca") -}}
{{- $_ := set $ca "ca" (genCA (printf "%s-ca" (include "tsnet2.fullname" $)) $days) -}}
{{- end -}}
{{- $svc := include "tsnet2.component" (list $ (ternary "webhook" "control" (eq $part "webhook"))) -}}
{{- $names := include "tsnet2.serviceDNSNames" (list $ $svc) | fromJsonArray -}}
{{- $cert := genSignedCert (index $names 2) nil $names $days $ca.ca -}}
{{- $_ := set $out $part (dict "ca" $ca.ca.Cert "crt" $cert.Cert "key" $cert.Key) -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values "__tsnet2TLS" $out -}}
{{- end -}}
{{- toJson (index .Values "__tsnet2TLS") -}}
{{- end -}}

{{/* The operator's configuration file: every key of tsnet2_operator.config except
     `namespace` (POD_NAMESPACE from the downward API). */}}
{{- define "tsnet2.operatorConfig" -}}
{{- $sc := .Values.sidecar -}}
{{- $controlScheme := ternary "https" "http" .Values.control.tls.enabled -}}
{{- $controlHost := printf "%s.%s.svc" (include "tsnet2.component" (list . "control")) .Release.Namespace -}}
{{- $defaultURL := printf "%s://%s:%d" $controlScheme $controlHost (int .Values.control.service.port) -}}
{{- $cfg := dict
  "image" (include "tsnet2.sidecarImage" .)
  "image_pull_policy" $sc.image.pullPolicy
  "control_url" (default $defaultURL $sc.controlURL)
  "backend" $sc.backend
  "cpu_request" (toString $sc.resources.requests.cpu)
  "memory_request" (toString $sc.resources.requests.memory)
  "cpu_limit" (toString $sc.resources.limits.cpu)
  "memory_limit" (toString $sc.resources.limits.memory)
  "traffic_log_default" $sc.trafficLog
  "traffic_log_sink" $sc.trafficLogSink
  "traffic_log_max_bytes" (int64 $sc.trafficLogRotation.maxBytes)
  "traffic_log_keep" (int $sc.trafficLogRotation.keep)
  "audit_bypass_policy" $sc.auditBypassPolicy
  "egress_port" (int .Values.egress.port)
  "dns_upstream" (toString .Values.dns.upstream)
  "dns_cluster_domain" .Values.dns.clusterDomain
  "native_sidecar" $sc.nativeSidecar
  "webhook_addr" "0.0.0.0"
  "webhook_port" (int .Values.webhook.port)
  "webhook_cert_file" "/etc/tsnet2/webhook-tls/tls.crt"
  "webhook_key_file" "/etc/tsnet2/webhook-tls/tls.key"
  "metrics_addr" (ternary (printf "0.0.0.0:%d" (int .Values.metrics.port)) "" .Values.metrics.enabled)
  "control_addr" (printf "0.0.0.0:%d" (int .Values.control.port))
  "control_tls_cert_file" (ternary "/etc/tsnet2/control-tls/tls.crt" "" .Values.control.tls.enabled)
  "control_tls_key_file" (ternary "/etc/tsnet2/control-tls/tls.key" "" .Values.control.tls.enabled)
  "cert_lifetime" .Values.control.certLifetime
  "domain" .Values.operator.domain
  "ephemeral_timeout" .Values.operator.ephemeralTimeout
  "sweep_interval" .Values.operator.sweepInterval
  "install_crds" (not .Values.crds.install)
-}}
{{- toPrettyJson $cfg -}}
{{- end -}}
