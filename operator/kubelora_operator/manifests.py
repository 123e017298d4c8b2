"""Pure builders: a LoRATrainingJob (name, uid, validated spec) -> the objects the operator
owns: a ConfigMap with the resolved trainer spec, a headless Service, an Indexed Job.

Rendezvous: static torchrun rendezvous with its TCPStore on completion index 0, reachable at
<job>-0.<service> through the Job's subdomain; node rank = completion index. The env names are
Kubeflow's (PET_*), so the same image also runs under Kubeflow's TrainJob.
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml

from kubelora_trainer.command import LAUNCHER, launcher_args
from kubelora_trainer.disk import CACHE_LIMIT_ENV
from kubelora_trainer.spec import GROUP, KIND, VERSION, LoRATrainingJobSpec, dump_spec, quantity

SPEC_MOUNT = "/etc/kubelora"
CACHE_MOUNT = "/var/cache/kubelora"
MASTER_PORT = 29500
CONTAINER = "trainer"
CONFIG_ERROR_EXIT_CODE = 2  # the trainer's exit code for bad input: retrying cannot help
# the trainer's exit code when its ranks stopped with a checkpoint because another pod's were told to
# stop (that pod preempted or evicted): retried like the disruption itself, without counting
PEER_STOPPED_EXIT_CODE = 3


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings (Helm values / environment)."""
    image: str = "ghcr.io/kubelora/trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    shm_size: str = "16Gi"
    # /tmp (HOME: torch's, Triton's and inductor's caches, temporary files) is an emptyDir of at most
    # this much: a runaway write evicts this pod, not the node's other tenants (DiskPressure); "": none
    tmp_size: str = "20Gi"
    run_as_user: int | None = 1000   # None: the platform assigns UID/GID/fsGroup (OpenShift restricted-v2)
    progress_interval_seconds: int = 30
    metrics_port: int = 9400             # the trainer's Prometheus endpoint (kubelora_trainer.metrics), on each pod
    metrics_addr: str = ""               # the address it binds ("": the trainer's 0.0.0.0; "::" on IPv6-only clusters)
    # a pod that ends right after its last step keeps serving until one scrape saw its final values
    # (Succeeded, the last loss): at least two scrape intervals of the PodMonitor
    metrics_linger_seconds: int = 60
    image_pull_secrets: tuple[str, ...] = ()  # Secrets in the job's namespace the trainer pods pull with
    # a NetworkPolicy per job: its pods admit only each other and, to the metrics port, the pods of
    # metrics_namespaces (None: any pod; (): none, as the chart's networkPolicy.metricsNamespaces: [])
    job_network_policy: bool = False
    metrics_namespaces: tuple[str, ...] | None = None


JOB_LABEL = f"{GROUP}/job"  # on every child and pod: the LoRATrainingJob's name
# on the pods and in the Service's selector: the LoRATrainingJob's uid (36 characters, a valid label
# value). A job deleted and made again under the same name has a new uid, so the new Service never
# lists the predecessor's pods still terminating (writing a checkpoint) under the same DNS names.
UID_LABEL = f"{GROUP}/job-uid"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"  # the Job controller puts its Job's uid on each pod


def labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kubelora", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/managed-by": "kubelora-operator", JOB_LABEL: name}


# Kueue (kueue.sigs.k8s.io) queues a batch/v1 Job that carries its queue-name label: it keeps the
# Job suspended until the Workload it makes for it is admitted, then unsuspends it (and suspends it
# again when it preempts it). The priority-class label names a WorkloadPriorityClass; without it
# Kueue takes the priority of the pod template's priorityClassName (resources.priorityClassName).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_LABELS = (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)


def queue_labels(owner_labels: dict | None) -> dict[str, str]:
    """The Kueue labels of a LoRATrainingJob, to copy to its trainer Job. Pure."""
    return {k: v for k, v in (owner_labels or {}).items() if k in KUEUE_LABELS and v}


def kueue_queue(owner_labels: dict | None) -> str | None:
    """The Kueue LocalQueue the job is submitted to, or None: then the operator owns
    Job.spec.suspend (runPolicy.suspend); with a queue, Kueue does. Pure."""
    return queue_labels(owner_labels).get(KUEUE_QUEUE_LABEL)


def owner_reference(name: str, uid: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _meta(name: str, job: str, uid: str, namespace: str) -> dict:
    return {"name": name, "namespace": namespace, "labels": labels(job), "ownerReferences": [owner_reference(job, uid)]}


def child_names(job: str) -> dict[str, str]:
    return {"configmap": f"{job}-spec", "service": f"{job}-workers", "job": job}


def network_policy_name(job: str) -> str:
    return f"{job}-peers"


def network_policy(job: str, uid: str, namespace: str, cfg: "OperatorConfig") -> dict:
    """The job's pods (this run's: its uid) admit connections only from each other (torchrun's
    rendezvous store, which takes any client without authentication, then gloo/NCCL on ephemeral
    ports) and, to the metrics port, from the pods of cfg.metrics_namespaces (any pod when none are
    named, none when the list is empty). Egress is left alone (S3, DNS, the image registry). Pure."""
    mine = {"matchLabels": {JOB_LABEL: job, UID_LABEL: uid}}
    ingress: list[dict] = [{"from": [{"podSelector": mine}]}]
    if cfg.metrics_port and cfg.metrics_namespaces != ():
        scrape: dict = {"ports": [{"port": cfg.metrics_port, "protocol": "TCP"}]}
        if cfg.metrics_namespaces:
            scrape["from"] = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
                              for ns in cfg.metrics_namespaces]
        ingress.append(scrape)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(network_policy_name(job), job, uid, namespace),
            "spec": {"podSelector": mine, "policyTypes": ["Ingress"], "ingress": ingress}}


def configmap(job: str, uid: str, namespace: str, spec: LoRATrainingJobSpec) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(child_names(job)["configmap"], job, uid, namespace),
            "data": {"spec.yaml": yaml.safe_dump({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                                                  "metadata": {"name": job}, "spec": dump_spec(spec)},
                                                 sort_keys=False)}}


def service(job: str, uid: str, namespace: str) -> dict:
    """Headless: gives each pod the DNS name <job>-<index>.<service>; only this job's pods (its uid),
    not those of a deleted job of the same name. A trainer Job made again (a gang restart) points
    it at its own pods (attempt_selector), not the previous attempt's, which can stay Terminating
    for ever on a lost node and, with publishNotReadyAddresses, keep their DNS records."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(child_names(job)["service"], job, uid, namespace),
            "spec": {"clusterIP": "None", "selector": {JOB_LABEL: job, UID_LABEL: uid}, "publishNotReadyAddresses": True,
                     "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}]}}


def attempt_selector(trainer_job: dict) -> dict[str, str]:
    """What the Service's selector adds to select only the pods of this trainer Job (the Job
    controller labels each pod with its Job's uid). Pure."""
    return {CONTROLLER_UID_LABEL: trainer_job["metadata"]["uid"]}


def _env(job: str, uid: str, spec: LoRATrainingJobSpec, namespace: str, cfg: "OperatorConfig") -> list[dict]:
    r = spec.resources
    master = f"{job}-0.{child_names(job)['service']}.{namespace}.svc"
    env = [
        {"name": "PET_NNODES", "value": str(r.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(max(1, r.gpusPerNode))},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "PET_MASTER_ADDR", "value": master},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "KUBELORA_JOB_NAME", "value": job},
        {"name": "KUBELORA_NAMESPACE", "value": namespace},
        # which run: the same for every attempt (preemptions, gang restarts), so each resumes its own
        # checkpoints whatever output.onExisting says (kubelora_trainer.progress.RUN_ID_ENV)
        {"name": "KUBELORA_RUN_ID", "value": uid},
        {"name": "KUBELORA_METRICS_PORT", "value": str(cfg.metrics_port)},
        *([{"name": "KUBELORA_METRICS_ADDR", "value": cfg.metrics_addr}] if cfg.metrics_addr else []),
        {"name": "KUBELORA_METRICS_LINGER_SECONDS", "value": str(cfg.metrics_linger_seconds)},
        {"name": "KUBELORA_CACHE_DIR", "value": CACHE_MOUNT},
        # the launcher gives the workers this long, less a margin, to write their checkpoint after a SIGTERM
        {"name": "KUBELORA_STOP_GRACE_SECONDS", "value": str(spec.runPolicy.terminationGracePeriodSeconds)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
    ]
    if r.gpusPerNode == 0:
        env.append({"name": "KUBELORA_FORCE_CPU", "value": "1"})
    if r.cacheSize and not r.cacheVolumeClaim:  # the emptyDir's sizeLimit, which statvfs in it does not show
        env.append({"name": CACHE_LIMIT_ENV, "value": str(int(quantity(r.cacheSize)))})
    if spec.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint})
    if spec.storage.region:
        env.append({"name": "AWS_REGION", "value": spec.storage.region})
    return env


# the keys of spec.storage.credentialsSecret the trainer gets (the operator reads the same ones)
SECRET_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))


def secret_env(secret: str) -> list[dict]:
    """The credentials Secret's keys as env entries, each named: not envFrom, which imports every
    key of the Secret, so a tenant who may write the Secret could set PYTHONPATH, LD_PRELOAD or
    HTTPS_PROXY in a trainer image operator.pods.allowedImages approved. A missing Secret or key
    (the session token may be absent) keeps the pod waiting with CreateContainerConfigError, as
    envFrom did for a missing Secret. Pure."""
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                         **({"optional": True} if optional else {})}}}
            for key, optional in SECRET_KEYS]


def ignored_secret_keys(data: dict) -> list[str]:
    """Keys of a credentials Secret the trainer does not get (secret_env). Pure."""
    return sorted(set(data) - {k for k, _ in SECRET_KEYS})


def tenancy_problem(spec: LoRATrainingJobSpec, job_credentials_only: bool, allowed_endpoints: tuple[str, ...],
                    allowed_images: tuple[str, ...] = (), allowed_service_accounts: tuple[str, ...] = ()
                    ) -> str | None:
    """What a shared cluster's operator settings refuse: a job without its own credentials when
    the operator may read buckets only with those (else a tenant could read another's bucket
    through the operator's keys), an S3 endpoint not on the allowed list (the operator sends
    requests there), a trainer image outside the allowed prefixes and a ServiceAccount not on the
    allowed list (the operator and the Job controller create the pods, so admission policies that
    look at who asked see them, not the tenant; a ServiceAccount can carry a cloud role through
    IRSA or Workload Identity). Pure."""
    image = spec.resources.image
    if allowed_images and image and not any(image == p or (p.endswith(("/", ":", "@")) and image.startswith(p))
                                            for p in allowed_images):
        return (f"spec.resources.image: {image!r} is not from a registry this cluster allows ({', '.join(allowed_images)};"
                " a prefix ending in '/' allows what is under it; chart value operator.pods.allowedImages), or leave "
                "it unset for the operator's trainer image")
    account = spec.resources.serviceAccountName
    if allowed_service_accounts and account and account not in allowed_service_accounts:
        return (f"spec.resources.serviceAccountName: {account!r} is not one this cluster lets jobs run as "
                f"({', '.join(allowed_service_accounts)}; chart value operator.pods.allowedServiceAccounts), or leave "
                "it unset for the namespace's default")
    if job_credentials_only and not spec.storage.credentialsSecret:
        return ("spec.storage.credentialsSecret is required on this cluster: the operator reads a job's output "
                "bucket only with the job's own credentials (operator setting KUBELORA_JOB_CREDENTIALS_ONLY, "
                "chart value operator.s3.jobCredentialsOnly); create a Secret with AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY and name it there")
    endpoint = (spec.storage.endpoint or "").rstrip("/")
    if allowed_endpoints and endpoint and endpoint not in {e.rstrip("/") for e in allowed_endpoints}:
        return (f"spec.storage.endpoint: {spec.storage.endpoint!r} is not one this cluster allows "
                f"({', '.join(allowed_endpoints)}; chart value operator.s3.allowedEndpoints)")
    return None


def cluster_problem(spec: LoRATrainingJobSpec) -> str | None:
    """A spec that validates but cannot work in pods: a local path is the pod's own disk, so an
    output written there is lost with the pod and an input is simply not there. Local inputs are
    fine only on the cache volume claim (mounted at CACHE_MOUNT); the output must be on S3, where
    the operator reads the run's progress and manifest.json. Pure."""
    def on_volume(uri: str) -> bool:
        path = uri.removeprefix("file://")
        return bool(spec.resources.cacheVolumeClaim) and (path == CACHE_MOUNT or path.startswith(CACHE_MOUNT + "/"))

    data = {**spec.dataset.uri_fields(), **(spec.evaluation.uri_fields() if spec.evaluation else {})}
    fields = {"output.uri": spec.output.uri, **data,
              **({"dataset.cacheUri": spec.dataset.cacheUri} if spec.dataset.cacheUri else {}),
              **spec.input_fields()}
    lost = {"output.uri": ", where the LoRA would be lost with the pod",
            "dataset.cacheUri": ", where the shared cache would be lost with the pod"}
    if not spec.output.uri.startswith("s3://") and on_volume(spec.output.uri):
        return (f"output.uri: {spec.output.uri!r} is on the cache volume claim, which the operator does not mount: "
                "it reads the run's progress and manifest.json from output.uri, so the job would never leave "
                "Exporting; use an s3:// URI (inputs may stay on the volume)")
    if spec.dataset.cacheOnly and not spec.resources.cacheVolumeClaim and not spec.dataset.cacheUri:
        return ("dataset.cacheOnly: the cache would be built in the pod's emptyDir and deleted with the pod; set "
                "dataset.cacheUri (an s3:// prefix runs read) or resources.cacheVolumeClaim to keep it")
    for field, uri in fields.items():
        if not uri.startswith("s3://") and not on_volume(uri):
            return (f"{field}: {uri!r} is a path inside the trainer pod" + lost.get(field, ", which it does not have")
                    + f"; use an s3:// URI, or a path under {CACHE_MOUNT} with resources.cacheVolumeClaim set")
    return None


def volume_problem(spec: LoRATrainingJobSpec, access_modes: list[str] | None) -> str | None:
    """Several nodes' pods all mount resources.cacheVolumeClaim, and they write to it: a claim
    that only one node can mount leaves every pod but the first in ContainerCreating with a
    Multi-Attach error the pod status never shows. Pure (access_modes: the claim's, None when
    unknown)."""
    claim, nodes = spec.resources.cacheVolumeClaim, spec.resources.nodes
    if not claim or nodes < 2 or access_modes is None or "ReadWriteMany" in access_modes:
        return None
    return (f"resources.cacheVolumeClaim: claim {claim!r} is {'/'.join(access_modes) or 'without access modes'}, "
            f"so the {nodes} nodes' pods cannot all mount it for writing (the volume attach fails with Multi-Attach "
            f"and the pods wait forever); use a ReadWriteMany claim, or leave it unset for a cache per pod")


def trainer_command() -> tuple[list[str], list[str]]:
    """(command, args) of the trainer container: the node command every launch of kubelora uses
    (kubelora_trainer.command, also the torchx component's), with the node rank from the
    completion index and the store on index 0 through the Kubeflow-style PET_* env."""
    return list(LAUNCHER), launcher_args("$(PET_NNODES)", "$(PET_NPROC_PER_NODE)", "$(PET_NODE_RANK)",
                                         "$(PET_MASTER_ADDR)", "$(PET_MASTER_PORT)", f"{SPEC_MOUNT}/spec.yaml")


def job(name: str, uid: str, namespace: str, spec: LoRATrainingJobSpec, cfg: OperatorConfig,
        owner_labels: dict | None = None) -> dict:
    """The Indexed Job. owner_labels: the LoRATrainingJob's labels; its Kueue labels go on the Job,
    and a Job submitted to a Kueue queue is always created suspended (Kueue starts it on admission;
    runPolicy.suspend does not apply then: see docs/kueue.md)."""
    r, rp = spec.resources, spec.runPolicy
    queued = queue_labels(owner_labels)
    names = child_names(name)
    requests, limits = dict(r.requests), dict(r.limits)
    if r.gpusPerNode:
        limits[r.gpuResource] = str(r.gpusPerNode)
        requests[r.gpuResource] = str(r.gpusPerNode)
    if r.cacheSize and not r.cacheVolumeClaim:  # the cache's disk: the scheduler finds a node with it
        requests["ephemeral-storage"] = r.cacheSize
    command, args = trainer_command()
    container = {
        "name": CONTAINER, "image": r.image or cfg.image, "imagePullPolicy": cfg.image_pull_policy,
        "command": command, "args": args, "env": _env(name, uid, spec, namespace, cfg),
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}]
        + ([{"name": "metrics", "containerPort": cfg.metrics_port}] if cfg.metrics_port else []),  # 0: off
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "volumeMounts": [{"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
                         {"name": "cache", "mountPath": CACHE_MOUNT},
                         {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "tmp", "mountPath": "/tmp"}],  # HOME: caches of torch, triton, HF
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True},
    }
    if spec.storage.credentialsSecret:
        container["env"] += secret_env(spec.storage.credentialsSecret)
    cache = ({"persistentVolumeClaim": {"claimName": r.cacheVolumeClaim}} if r.cacheVolumeClaim else
             {"emptyDir": {"sizeLimit": r.cacheSize} if r.cacheSize else {}})
    pod_spec = {
        "subdomain": names["service"],
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the trainer calls no Kubernetes API
        # SIGTERM -> the step finishes, the checkpoint is written: this long before SIGKILL
        "terminationGracePeriodSeconds": spec.runPolicy.terminationGracePeriodSeconds,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                            # OnRootMismatch: the kubelet chowns a cache claim's files only when its root is not
                            # the group's already, not at every pod start (minutes for a large latent cache)
                            **({"runAsUser": cfg.run_as_user, "runAsGroup": cfg.run_as_user, "fsGroup": cfg.run_as_user,
                                "fsGroupChangePolicy": "OnRootMismatch"}
                               if cfg.run_as_user is not None else {})},
        "containers": [container],
        "volumes": [{"name": "spec", "configMap": {"name": names["configmap"]}},
                    {"name": "cache", **cache},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": cfg.tmp_size} if cfg.tmp_size else {}}],
    }
    if cfg.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in cfg.image_pull_secrets]
    tolerations = [t.model_dump(exclude_none=True) for t in r.tolerations]
    for key, value in (("nodeSelector", r.nodeSelector), ("tolerations", tolerations),
                       ("priorityClassName", r.priorityClassName), ("schedulerName", r.schedulerName),
                       ("serviceAccountName", r.serviceAccountName)):
        if value:
            pod_spec[key] = value
    job_spec = {
        "completionMode": "Indexed", "completions": r.nodes, "parallelism": r.nodes,
        # torchrun nodes fail together (the peers of a crashed node exit too), so one failed
        # attempt of the run costs `nodes` pod failures: scale the budget to count runs.
        "backoffLimit": rp.backoffLimit * r.nodes,
        "suspend": True if KUEUE_QUEUE_LABEL in queued else rp.suspend,
        "podFailurePolicy": {"rules": [
            # preemption, node drain, eviction: retry without spending the backoff budget
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # bad input (spec, data, storage): fail now, retrying cannot help
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [CONFIG_ERROR_EXIT_CODE]}},
            # a peer of a disrupted pod, stopped at a step boundary with a checkpoint: not a failure
            {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                 "values": [PEER_STOPPED_EXIT_CODE]}},
        ]},
        "template": {"metadata": {"labels": {**labels(name), UID_LABEL: uid},
                                  **({"annotations": dict(r.podAnnotations)} if r.podAnnotations else {})},
                     "spec": pod_spec},
    }
    if rp.activeDeadlineSeconds:
        job_spec["activeDeadlineSeconds"] = rp.activeDeadlineSeconds
    meta = _meta(names["job"], name, uid, namespace)
    meta["labels"].update(queued)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def children(name: str, uid: str, namespace: str, spec: LoRATrainingJobSpec, cfg: OperatorConfig,
             owner_labels: dict | None = None) -> list[dict]:
    """In creation order: the Job last, so its pods find their ConfigMap and Service (and, with
    cfg.job_network_policy, start behind their NetworkPolicy)."""
    policy = [network_policy(name, uid, namespace, cfg)] if cfg.job_network_policy else []
    return [configmap(name, uid, namespace, spec), service(name, uid, namespace), *policy,
            job(name, uid, namespace, spec, cfg, owner_labels)]


EVENT_MESSAGE_MAX = 1024
REPORTING_COMPONENT = "kubelora-operator"


def event(involved: dict, type_: str, reason: str, message: str, now: str, instance: str) -> dict:
    """A core/v1 Event about `involved` (a LoRATrainingJob body), as `kubectl describe` shows it:
    the shape kopf posts for its own handlers, legacy timestamps (no eventTime), the message cut
    in the middle to the API server's 1024 characters. Pure."""
    meta = involved.get("metadata") or {}
    if len(message) > EVENT_MESSAGE_MAX:
        half = (EVENT_MESSAGE_MAX - 3) // 2
        message = f"{message[:half]}...{message[-(EVENT_MESSAGE_MAX - 3 - half):]}"
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'kubelora')}.", "namespace": meta.get("namespace") or "default"},
        "type": type_, "reason": reason, "message": message,
        "involvedObject": {"apiVersion": involved.get("apiVersion") or f"{GROUP}/{VERSION}",
                           "kind": involved.get("kind") or KIND, "name": meta.get("name"),
                           "namespace": meta.get("namespace"), "uid": meta.get("uid")},
        "source": {"component": REPORTING_COMPONENT},
        "reportingComponent": REPORTING_COMPONENT, "reportingInstance": instance[:128],
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }
