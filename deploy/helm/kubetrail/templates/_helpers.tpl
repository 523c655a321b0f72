{{/* Names and labels. A "part" is one of: logs, events, audit-webhook, audit-file, aggregator. */}}
{{- define "kubetrail.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetrail.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains (include "kubetrail.name" .) .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kubetrail.name" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* dict "root" $ "part" "logs" */}}
{{- define "kubetrail.partName" -}}
{{- printf "%s-%s" (include "kubetrail.fullname" .root) .part -}}
{{- end -}}

{{- define "kubetrail.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetrail.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .part }}
{{- end -}}

{{- define "kubetrail.labels" -}}
{{ include "kubetrail.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kubetrail.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create -}}
{{- include "kubetrail.partName" . -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .root.Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetrail.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The state directory of a node part on the host, one per release. */}}
{{- define "kubetrail.hostState" -}}
{{- printf "%s/%s-%s" (trimSuffix "/" .Values.hostStatePath) .Release.Namespace .Release.Name -}}
{{- end -}}

{{/* [SERVICE] of every part: monitoring server, filesystem buffers under DIR. */}}
{{- define "kubetrail.serviceSection" -}}
[SERVICE]
    flush        1
    grace        10
    log_level    {{ .root.Values.config.logLevel }}
    http_server  on
    http_listen  0.0.0.0
    http_port    {{ .root.Values.metrics.port }}
    storage.path {{ .dir }}/buffer
{{- with .root.Values.config.service }}
{{ . | trim | indent 4 }}
{{- end }}
{{- end -}}

{{/* "key value" lines of an option map, indented as a section body. */}}
{{- define "kubetrail.optionLines" -}}
{{- range $key, $value := . }}
    {{ $key }} {{ $value }}
{{- end -}}
{{- end -}}

{{/* User filters, parsers and the part's outputs (or config.outputs). */}}
{{- define "kubetrail.tail" -}}
{{- with .root.Values.config.filters }}
{{ . | trim }}
{{- end }}
{{- with .root.Values.config.parsers }}
{{ . | trim }}
{{- end }}
{{ default .root.Values.config.outputs .outputs | trim }}
{{- end -}}

{{/* Each part's whole config: rendered once, used by its ConfigMap, its checksum and the check hook. */}}
{{- define "kubetrail.config.logs" -}}
{{ include "kubetrail.serviceSection" (dict "root" . "dir" "/var/lib/kubetrail/state") }}

[INPUT]
    name             tail
    alias            logs
    tag              kube.*
    path             {{ .Values.logs.path }}
    multiline.parser {{ .Values.logs.multilineParser }}
    db               /var/lib/kubetrail/state/tail.db
    mem_buf_limit    {{ .Values.logs.memBufLimit }}
    storage.type     filesystem
{{- with .Values.config.extraInputs }}

{{ . | trim }}
{{- end }}

[FILTER]
    name      kubernetes
    alias     kubernetes
    match     kube.*
    node_name ${NODE_NAME}
{{- include "kubetrail.optionLines" .Values.logs.kubernetesFilter }}
{{ include "kubetrail.tail" (dict "root" . "outputs" .Values.logs.outputs) }}
{{- end -}}

{{- define "kubetrail.config.events" -}}
{{ include "kubetrail.serviceSection" (dict "root" . "dir" "/var/lib/kubetrail") }}

[INPUT]
    name                            kubernetes_events
    alias                           events
    tag                             kube.events
    kube_api                        {{ .Values.events.api }}
{{- with .Values.events.namespaces }}
    kube_namespace                  {{ join "," . }}
{{- end }}
    kube_retention_time             {{ .Values.events.retentionTime }}
    db                              /var/lib/kubetrail/events.db
    storage.type                    filesystem
    leader_election                 on
    leader_election.lease_name      {{ include "kubetrail.partName" (dict "root" . "part" "events") }}
    leader_election.lease_namespace {{ .Release.Namespace }}
    leader_election.identity        ${POD_NAME}
{{ include "kubetrail.tail" (dict "root" . "outputs" .Values.events.outputs) }}
{{- end -}}

{{- define "kubetrail.config.audit-webhook" -}}
{{- $w := .Values.audit.webhook -}}
{{ include "kubetrail.serviceSection" (dict "root" . "dir" "/var/lib/kubetrail") }}

[INPUT]
    name              kubernetes_audit
    alias             audit-webhook
    tag               kube.audit
    port              {{ $w.port }}
    path              {{ $w.path }}
    tls.crt_file      /etc/kubetrail/tls/tls.crt
    tls.key_file      /etc/kubetrail/tls/tls.key
{{- if $w.clientCASecret }}
    tls.ca_file       /etc/kubetrail/client-ca/ca.crt
{{- end }}
{{- if $w.tokenSecret }}
    bearer_token_file /etc/kubetrail/token/token
{{- end }}
    storage.type      filesystem

[FILTER]
    name  kubernetes_audit
    alias audit
    match kube.audit
{{- include "kubetrail.optionLines" $w.filter }}
{{ include "kubetrail.tail" (dict "root" . "outputs" $w.outputs) }}
{{- end -}}

{{- define "kubetrail.config.audit-file" -}}
{{- $f := .Values.audit.file -}}
{{ include "kubetrail.serviceSection" (dict "root" . "dir" "/var/lib/kubetrail/state") }}

[INPUT]
    name         tail
    alias        audit-file
    tag          kube.audit.file
    path         {{ $f.path }}
    parser       k8s_audit
    db           /var/lib/kubetrail/state/audit-file.db
    rotate_wait  {{ $f.rotateWait }}
    storage.type filesystem
{{- if $f.webhook.enabled }}
{{- $w := .Values.audit.webhook }}

[INPUT]
    name              kubernetes_audit
    alias             audit-webhook
    tag               kube.audit.webhook
    port              {{ $f.webhook.port }}
    path              {{ $w.path }}
    tls.crt_file      /etc/kubetrail/tls/tls.crt
    tls.key_file      /etc/kubetrail/tls/tls.key
{{- if $w.clientCASecret }}
    tls.ca_file       /etc/kubetrail/client-ca/ca.crt
{{- end }}
{{- if $w.tokenSecret }}
    bearer_token_file /etc/kubetrail/token/token
{{- end }}
    storage.type      filesystem
{{- end }}

[FILTER]
    name  kubernetes_audit
    alias audit
    match kube.audit.*
{{- if and $f.webhook.enabled (not (hasKey $f.filter "db")) }}
{{- /* Both paths' keys outlive a restart (the webhook re-sends what was not answered 2xx, the
     log is read again from its checkpoint): the filter keeps them in the node's state dir. */}}
    db    /var/lib/kubetrail/state/audit-keys.db
{{- end }}
{{- include "kubetrail.optionLines" $f.filter }}
{{ include "kubetrail.tail" (dict "root" . "outputs" $f.outputs) }}
{{- end -}}

{{/* With a cluster to ask (helm install/upgrade, template --dry-run=server), a missing webhook
     Secret fails now, not as a pod stuck in ContainerCreating. */}}
{{- define "kubetrail.checkWebhookSecrets" -}}
{{- $w := .Values.audit.webhook -}}
{{- if lookup "v1" "Namespace" "" .Release.Namespace }}
{{- range $key := list "tlsSecret" "clientCASecret" "tokenSecret" }}
{{- $name := get $w $key }}
{{- if and $name (not (lookup "v1" "Secret" $.Release.Namespace $name)) }}
{{- fail (printf "audit.webhook.%s: Secret %q not found in namespace %q" $key $name $.Release.Namespace) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* "true" when the part (dict "root" $ "part" NAME) serves the audit webhook and so needs its Secrets. */}}
{{- define "kubetrail.receivesWebhook" -}}
{{- if or (eq .part "audit-webhook") (and (eq .part "audit-file") .root.Values.audit.file.enabled .root.Values.audit.file.webhook.enabled) -}}
true
{{- end -}}
{{- end -}}

{{- define "kubetrail.config.aggregator" -}}
{{- $a := .Values.aggregator -}}
{{ include "kubetrail.serviceSection" (dict "root" . "dir" "/var/lib/kubetrail") }}

[INPUT]
    name         kafka
    alias        aggregator
    tag          kafka
    brokers      {{ required "aggregator.brokers is required with aggregator.enabled (host:port of the Kafka brokers)" $a.brokers }}
    topics       {{ if $a.topics }}{{ join "," $a.topics }}{{ else }}{{ fail "aggregator.topics is required with aggregator.enabled (the topics to consume)" }}{{ end }}
    group_id     {{ $a.groupId }}
    format       {{ $a.format }}
    poll_ms      {{ $a.pollMs }}
    client_id    ${POD_NAME}
{{- range $key, $value := $a.rdkafka }}
    rdkafka.{{ $key }} {{ $value }}
{{- end }}
{{ include "kubetrail.tail" (dict "root" . "outputs" $a.outputs) }}
{{- end -}}

{{/* The parts that are on, in a fixed order. */}}
{{- define "kubetrail.enabledParts" -}}
{{- $parts := list -}}
{{- if .Values.logs.enabled }}{{ $parts = append $parts "logs" }}{{ end -}}
{{- if .Values.events.enabled }}{{ $parts = append $parts "events" }}{{ end -}}
{{- if .Values.audit.webhook.enabled }}{{ $parts = append $parts "audit-webhook" }}{{ end -}}
{{- if .Values.audit.file.enabled }}{{ $parts = append $parts "audit-file" }}{{ end -}}
{{- if .Values.aggregator.enabled }}{{ $parts = append $parts "aggregator" }}{{ end -}}
{{- join " " $parts -}}
{{- end -}}

{{/* Pod-level settings every part shares: dict "root" $ "part" NAME "values" PART_VALUES */}}
{{- define "kubetrail.podCommon" -}}
{{- $v := .root.Values -}}
serviceAccountName: {{ include "kubetrail.serviceAccountName" . }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  {{- /* credentialSecrets: their files are group-readable by the non-root user (0440), not world-readable. */}}
  {{- $credentials := ternary (dict "fsGroup" 65532) (dict) (not (empty $v.credentialSecrets)) }}
  {{- toYaml (merge (dict) $v.podSecurityContext (.podSecurity | default dict) $credentials) | nindent 2 }}
{{- with (default $v.nodeSelector .values.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.tolerations .values.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The container's settings every part shares (image, env, probes, resources). */}}
{{- define "kubetrail.containerCommon" -}}
{{- $v := .root.Values -}}
image: {{ include "kubetrail.image" .root }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args: ["run", "-c", "/etc/kubetrail/config/kubetrail.conf"]
env:
  - name: POD_NAME
    valueFrom: {fieldRef: {fieldPath: metadata.name}}
  - name: POD_NAMESPACE
    valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
  - name: NODE_NAME
    valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
{{- with $v.env }}
  {{- toYaml . | nindent 2 }}
{{- end }}
ports:
  - name: metrics
    containerPort: {{ $v.metrics.port }}
    protocol: TCP
{{- range .extraPorts }}
  - name: {{ .name }}
    containerPort: {{ .port }}
    protocol: TCP
{{- end }}
livenessProbe:
  httpGet: {path: /api/v1/health, port: metrics}
  periodSeconds: 10
  failureThreshold: 6
readinessProbe:
  httpGet: {path: /api/v1/health, port: metrics}
  periodSeconds: 5
resources:
  {{- toYaml (default $v.resources .values.resources) | nindent 2 }}
{{- end -}}

{{/* Security context of the node parts: uid 0 for the kubelet's root-owned 0640 log files, and
     of root's powers only DAC_READ_SEARCH (read any file, list any directory). */}}
{{- define "kubetrail.nodeSecurityContext" -}}
runAsUser: 0
runAsGroup: 0
runAsNonRoot: false
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
  add: [DAC_READ_SEARCH]
{{- end -}}

{{/* Mounts and volumes every part has: its config, writable /tmp, user extras. */}}
{{- define "kubetrail.commonMounts" -}}
- name: config
  mountPath: /etc/kubetrail/config
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- include "kubetrail.credentialMounts" . }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The API token as the kubelet would mount it, but with the lifetime the values set
     (serviceAccount.tokenExpirationSeconds): the kubelet renews it at 80% of that, and kubetrail
     re-reads the file when it changes. Only for the parts that call the API server. */}}
{{- define "kubetrail.apiTokenMount" -}}
- name: kube-api-token
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end -}}
{{- define "kubetrail.apiTokenVolume" -}}
- name: kube-api-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: {{ .Values.serviceAccount.tokenExpirationSeconds }}
      - configMap:
          name: kube-root-ca.crt
          items: [{key: ca.crt, path: ca.crt}]
      - downwardAPI:
          items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]
{{- end -}}
{{- define "kubetrail.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "kubetrail.partName" . }}
- name: tmp
  emptyDir: {sizeLimit: 64Mi}
{{- include "kubetrail.credentialVolumes" .root }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* credentialSecrets: the outputs' (and kafka inputs') credentials as files, each Secret at
     /etc/kubetrail/secrets/<name>/, named in the config as ${file:/etc/kubetrail/secrets/<name>/<key>}
     and re-read by kubetrail when the kubelet rotates them (never environment variables). Every
     part, the config check hook and the helm test pods mount them all. With a cluster to ask, a
     Secret that does not exist fails the install naming it. */}}
{{- define "kubetrail.credentialMounts" -}}
{{- $seen := dict }}
{{- range $i, $c := .Values.credentialSecrets }}
{{- if hasKey $seen $c.name }}
{{- fail (printf "credentialSecrets[%d].name: %q is used twice (each Secret needs its own directory)" $i $c.name) }}
{{- end }}
{{- $_ := set $seen $c.name true }}
- {name: credentials-{{ $c.name }}, mountPath: /etc/kubetrail/secrets/{{ $c.name }}, readOnly: true}
{{- end }}
{{- end -}}

{{- define "kubetrail.credentialVolumes" -}}
{{- $root := . }}
{{- $names := list }}
{{- range .Values.credentialSecrets }}{{ $names = append $names .name }}{{ end }}
{{- /* A config naming a directory no credentialSecrets entry mounts would fail in every pod: fail here. */}}
{{- range $ref := regexFindAll `\$\{file:\s*/etc/kubetrail/secrets/[^/}]*` (toYaml .Values) -1 | uniq }}
{{- $name := regexReplaceAll "^.*/etc/kubetrail/secrets/" $ref "" }}
{{- if not (has $name $names) }}
{{- fail (printf "the config names %s/...}, but credentialSecrets has no entry named %q to mount there" $ref $name) }}
{{- end }}
{{- end }}
{{- $ask := lookup "v1" "Namespace" "" .Release.Namespace }}
{{- range $i, $c := .Values.credentialSecrets }}
{{- $secret := default $c.name $c.secretName }}
{{- if and $ask (not (lookup "v1" "Secret" $root.Release.Namespace $secret)) }}
{{- fail (printf "credentialSecrets[%d]: Secret %q not found in namespace %q" $i $secret $root.Release.Namespace) }}
{{- end }}
- name: credentials-{{ $c.name }}
  secret: {secretName: {{ $secret }}, defaultMode: 0440}
{{- end }}
{{- end -}}

{{/* The audit webhook's Secrets as files (never environment variables: kubetrail reloads them
     when they rotate). Used by its Deployment, the config check hook and its helm test pod. */}}
{{- define "kubetrail.webhookSecretMounts" -}}
{{- $w := .Values.audit.webhook -}}
- {name: tls, mountPath: /etc/kubetrail/tls, readOnly: true}
{{- if $w.clientCASecret }}
- {name: client-ca, mountPath: /etc/kubetrail/client-ca, readOnly: true}
{{- end }}
{{- if $w.tokenSecret }}
- {name: token, mountPath: /etc/kubetrail/token, readOnly: true}
{{- end }}
{{- end -}}

{{- define "kubetrail.webhookSecretVolumes" -}}
{{- $w := .Values.audit.webhook -}}
- name: tls
  secret: {secretName: {{ $w.tlsSecret }}, defaultMode: 0440}
{{- if $w.clientCASecret }}
- name: client-ca
  secret: {secretName: {{ $w.clientCASecret }}, items: [{key: ca.crt, path: ca.crt}]}
{{- end }}
{{- if $w.tokenSecret }}
- name: token
  secret: {secretName: {{ $w.tokenSecret }}, items: [{key: token, path: token}], defaultMode: 0440}
{{- end }}
{{- end -}}
