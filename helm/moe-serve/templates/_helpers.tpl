{{/* Names, labels, the Serve config and the pieces shared by the head and worker pod templates. */}}

{{- define "moe-serve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name; KubeRay appends suffixes to RayService names, so keep it short (<= 40). */}}
{{- define "moe-serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moe-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moe-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "moe-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "moe-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The API key Secret's name and key; empty name: no key configured. */}}
{{- define "moe-serve.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret -}}
{{- .Values.apiKey.existingSecret -}}
{{- else if .Values.apiKey.value -}}
{{- printf "%s-api-key" (include "moe-serve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "moe-serve.apiKeySecretKey" -}}
{{- if .Values.apiKey.existingSecret -}}{{ .Values.apiKey.existingSecretKey }}{{- else -}}api-key{{- end -}}
{{- end -}}

{{- define "moe-serve.redisHost" -}}
{{- printf "%s-redis.%s.svc" (include "moe-serve.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "moe-serve.redisUrl" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.url -}}
{{- else -}}
{{- printf "redis://%s:%d/%d" (include "moe-serve.redisHost" .) (int .Values.redis.port)
           (int .Values.redis.warmDb) -}}
{{- end -}}
{{- end -}}

{{- define "moe-serve.coldCacheUrl" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.coldUrl -}}
{{- else -}}
{{- printf "redis://%s:%d/%d" (include "moe-serve.redisHost" .) (int .Values.redis.port)
           (int .Values.redis.coldDb) -}}
{{- end -}}
{{- end -}}

{{/* Cross-field checks JSON schema cannot express; `helm template` and `helm install` fail with the message. */}}
{{- define "moe-serve.validate" -}}
{{- $auto := .Values.engine.autoscaling -}}
{{- if lt (int $auto.maxReplicas) (int $auto.minReplicas) -}}
{{- fail (printf "engine.autoscaling.maxReplicas (%d) must be >= minReplicas (%d)"
                 (int $auto.maxReplicas) (int $auto.minReplicas)) -}}
{{- end -}}
{{- $initial := $auto.initialReplicas -}}
{{- if and (not (kindIs "invalid" $initial))
           (or (lt (int $initial) (int $auto.minReplicas)) (gt (int $initial) (int $auto.maxReplicas))) -}}
{{- fail (printf "engine.autoscaling.initialReplicas (%d) must lie in [minReplicas, maxReplicas]" (int $initial)) -}}
{{- end -}}
{{- $w := .Values.workers -}}
{{- if lt (int $w.maxReplicas) (int $w.minReplicas) -}}
{{- fail (printf "workers.maxReplicas (%d) must be >= workers.minReplicas (%d)"
                 (int $w.maxReplicas) (int $w.minReplicas)) -}}
{{- end -}}
{{- if or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) -}}
{{- fail (printf "workers.replicas (%d) must lie in [minReplicas, maxReplicas]" (int $w.replicas)) -}}
{{- end -}}
{{- $gpus := mul (int $w.maxReplicas) (int $w.gpusPerWorker) -}}
{{- if and (not (kindIs "invalid" .Values.shards)) (gt (int .Values.shards) $gpus) -}}
{{- fail (printf "shards (%d) need one GPU each, but workers.maxReplicas x gpusPerWorker is %d"
                 (int .Values.shards) $gpus) -}}
{{- end -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.model.volume.mountPath)) .Values.model.dir) -}}
{{- fail (printf "model.dir (%s) must lie under model.volume.mountPath (%s)"
                 .Values.model.dir .Values.model.volume.mountPath) -}}
{{- end -}}
{{- if and .Values.model.makeTinyModel (eq .Values.model.volume.type "pvc") .Values.model.volume.pvc.readOnly -}}
{{- fail "model.makeTinyModel writes the model: set model.volume.pvc.readOnly to false or use emptyDir" -}}
{{- end -}}
{{- end -}}

{{/* The Serve config (ServeDeploySchema): the same document as ray_configs/serve.yaml for the default values. */}}
{{- define "moe-serve.serveConfig" -}}
{{- $e := .Values.engine -}}
{{- $a := $e.autoscaling -}}
{{- $l := $e.limits -}}
{{- $autoscaling := dict
      "min_replicas" (int $a.minReplicas)
      "max_replicas" (int $a.maxReplicas)
      "target_ongoing_requests" $a.targetOngoingRequests
      "upscale_delay_s" $a.upscaleDelaySeconds
      "downscale_delay_s" $a.downscaleDelaySeconds
      "metrics_interval_s" $a.metricsIntervalSeconds
      "look_back_period_s" $a.lookBackPeriodSeconds
      "llm_policy" $a.llmPolicy -}}
{{- if not (kindIs "invalid" $a.initialReplicas) -}}
{{- $_ := set $autoscaling "initial_replicas" (int $a.initialReplicas) -}}
{{- end -}}
{{- if not (kindIs "invalid" $a.downscaleToZeroDelaySeconds) -}}
{{- $_ := set $autoscaling "downscale_to_zero_delay_s" $a.downscaleToZeroDelaySeconds -}}
{{- end -}}
{{- $limits := dict
      "max_body_bytes" (int64 $l.maxBodyBytes)
      "max_prompt_tokens" (int $l.maxPromptTokens)
      "max_tokens" (int $l.maxTokens)
      "max_n" (int $l.maxN)
      "max_queued_requests" (int $l.maxQueuedRequests) -}}
{{- $args := dict
      "model_dir" .Values.model.dir
      "quantize" .Values.model.quantize
      "dtype" .Values.model.dtype
      "kv_cache_bytes" (int64 $e.kvCacheBytes)
      "max_num_seqs" (int $e.maxNumSeqs)
      "replica_num_cpus" $e.replicaNumCpus
      "prefix_affinity" $e.prefixAffinity
      "limits" $limits
      "autoscaling" $autoscaling -}}
{{- if .Values.model.name -}}
{{- $_ := set $args "model_name" .Values.model.name -}}
{{- end -}}
{{- /* Passed only when set, so the app's defaults apply otherwise. */ -}}
{{- if not (kindIs "invalid" $e.maxStepMs) -}}
{{- $_ := set $args "max_step_ms" $e.maxStepMs -}}
{{- end -}}
{{- if not (kindIs "invalid" .Values.shards) -}}
{{- $_ := set $args "shards" (int .Values.shards) -}}
{{- end -}}
{{- if .Values.shardPlacement -}}
{{- $_ := set $args "placement" .Values.shardPlacement -}}
{{- end -}}
{{- $c := .Values.cache -}}
{{- $cache := dict -}}
{{- if not (kindIs "invalid" $c.hotBytes) -}}{{- $_ := set $cache "hot_bytes" (int64 $c.hotBytes) -}}{{- end -}}
{{- if not (kindIs "invalid" $c.warmTtlSeconds) -}}{{- $_ := set $cache "warm_ttl_s" $c.warmTtlSeconds -}}{{- end -}}
{{- if not (kindIs "invalid" $c.coldTtlSeconds) -}}{{- $_ := set $cache "cold_ttl_s" $c.coldTtlSeconds -}}{{- end -}}
{{- if $cache -}}
{{- $_ := set $args "cache" $cache -}}
{{- end -}}
{{- $app := dict
      "name" "moe-serve"
      "route_prefix" "/"
      "import_path" "moe_serve.replicas.app:app_builder"
      "runtime_env" (dict "env_vars" (dict "TOKENIZERS_PARALLELISM" "false"))
      "args" $args -}}
{{- $config := dict
      "proxy_location" "EveryNode"
      "http_options" (dict "host" "0.0.0.0" "port" 8000 "request_timeout_s" 600)
      "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Environment of every Ray container: the replicas and shards read these. */}}
{{- define "moe-serve.rayEnv" -}}
- name: MOE_SERVE_REDIS_URL
  value: {{ include "moe-serve.redisUrl" . | quote }}
- name: MOE_SERVE_COLD_CACHE_URL
  value: {{ include "moe-serve.coldCacheUrl" . | quote }}
- name: TOKENIZERS_PARALLELISM
  value: "false"
{{- with .Values.redis.external.auth.existingSecret }}
- name: MOE_SERVE_REDIS_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $.Values.redis.external.auth.usernameKey }}, optional: true}
- name: MOE_SERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $.Values.redis.external.auth.passwordKey }}, optional: true}
{{- end }}
{{- if .Values.redis.external.tls.existingSecret }}
- name: MOE_SERVE_REDIS_CA_CERT
  value: /etc/moe-serve/redis-tls/ca.crt
{{- if .Values.redis.external.tls.clientAuth }}
- name: MOE_SERVE_REDIS_CLIENT_CERT
  value: /etc/moe-serve/redis-tls/tls.crt
- name: MOE_SERVE_REDIS_CLIENT_KEY
  value: /etc/moe-serve/redis-tls/tls.key
{{- end }}
{{- end }}
{{- with (include "moe-serve.apiKeySecretName" .) }}
- name: MOE_SERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "moe-serve.apiKeySecretKey" $ }}
{{- end }}
{{- end -}}

{{- define "moe-serve.podAnnotations" -}}
{{- if .Values.metrics.prometheusAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.rayMetricsPort | int | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{- define "moe-serve.volumes" -}}
- name: model
{{- if eq .Values.model.volume.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.pvc.claimName }}
    readOnly: {{ .Values.model.volume.pvc.readOnly }}
{{- else if eq .Values.model.volume.type "hostPath" }}
  hostPath:
    path: {{ .Values.model.volume.hostPath.path }}
    type: {{ .Values.model.volume.hostPath.type }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: dshm  # Ray's object store lives in /dev/shm
  emptyDir:
    medium: Memory
{{- with .Values.redis.external.tls.existingSecret }}
- name: redis-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "moe-serve.volumeMounts" -}}
- name: model
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: {{ and (eq .Values.model.volume.type "pvc") .Values.model.volume.pvc.readOnly }}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.redis.external.tls.existingSecret }}
- name: redis-tls
  mountPath: /etc/moe-serve/redis-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* Writes the tiny random model into model.dir when asked (the same seed gives the same weights in every pod). */}}
{{- define "moe-serve.podCommon" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- if .Values.model.makeTinyModel }}
# Writes the tiny random model into model.dir (the same seed gives the same weights in every pod).
initContainers:
  - name: make-tiny-model
    image: {{ include "moe-serve.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["/bin/sh", "-c"]
    args:
      - test -f {{ .Values.model.dir }}/config.json || moe-serve make-tiny-model {{ .Values.model.dir }}
    volumeMounts:
      - name: model
        mountPath: {{ .Values.model.volume.mountPath }}
{{- end }}
volumes:
{{ include "moe-serve.volumes" . | indent 2 }}
{{- end -}}
