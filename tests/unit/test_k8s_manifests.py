"""infra/k8s/: every Kubernetes object valid against the Kubernetes schemas (offline), the KEDA
objects against a schema of their own, and every name the manifests share with the code
(RTPIPE_* settings, consumer groups, topics, metrics ports, Secret keys) the code's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from stages.shared.settings import Settings
from stages.shared.topology import STAGES, stage_groups

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
K8S_VERSION = "1.33.0"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}

_KAFKA_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata", "authenticationRef"],
    "properties": {
        "type": {"const": "kafka"},
        "metadata": {
            "type": "object",
            "required": ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"],
            "properties": {
                "bootstrapServers": {"type": "string", "minLength": 1},
                "consumerGroup": {"type": "string", "minLength": 1},
                "topic": {"type": "string", "minLength": 1},
                "lagThreshold": {"type": "string", "pattern": "^[0-9]+$"},
                "offsetResetPolicy": {"enum": ["earliest", "latest"]},
            },
            "additionalProperties": {"type": "string"},
        },
        "authenticationRef": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}},
        },
    },
}


def _keda_object(spec: dict[str, Any]) -> dict[str, Any]:
    """The schema of a KEDA 2.x object (keda.sh/v1alpha1) whose ``spec`` is ``spec``."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "keda.sh/v1alpha1"}, "spec": spec},
    }


# The subset of KEDA 2.x's CRDs these manifests use.
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": _keda_object(
        {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {"type": "array", "minItems": 1, "items": _KAFKA_TRIGGER},
            },
        }
    ),
    "TriggerAuthentication": _keda_object(
        {
            "type": "object",
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "properties": {
                            "parameter": {"enum": ["sasl", "username", "password", "tls", "ca"]}
                        },
                    },
                }
            },
        }
    ),
}


def _docs() -> list[dict[str, Any]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _docs() if d["kind"] == kind}


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize(
    "doc", [d for d in _docs() if d["kind"] not in KEDA_KINDS], ids=lambda d: d["kind"]
)
def test_kubernetes_objects_match_the_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_keda_objects_match_their_schema() -> None:
    docs = [d for d in _docs() if d["kind"] in KEDA_KINDS]
    assert {d["kind"] for d in docs} == KEDA_KINDS
    for doc in docs:
        jsonschema.validate(doc, KEDA_SCHEMAS[doc["kind"]])


def test_an_invalid_deployment_is_rejected() -> None:
    # The validator can fail: a misspelt field of a real manifest is caught.
    doc = _by_kind("Deployment")["prediction"]
    bad = yaml.safe_load(yaml.safe_dump(doc))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _is_setting(name: str) -> bool:
    """Whether ``RTPIPE_A__B`` names a field of Settings (nested groups by ``__``)."""
    model: type[BaseModel] = Settings
    parts = name.removeprefix("RTPIPE_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            sub = field.annotation
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                return False
            model = sub
    return True


def test_every_rtpipe_variable_is_a_setting() -> None:
    config = _by_kind("ConfigMap")["rtpipe-config"]["data"]
    secret = _by_kind("Secret")["rtpipe-secrets"]["stringData"]
    names = [k for k in (*config, *secret) if k.startswith("RTPIPE_")]
    for dep in _by_kind("Deployment").values():
        for env in dep["spec"]["template"]["spec"]["containers"][0].get("env", []):
            names.append(env["name"])
    assert names
    assert [n for n in names if not _is_setting(n)] == []
    # The settings really parse from them (types included).
    env = {k: str(v) for k, v in config.items()}
    env.update({k: v for k, v in secret.items() if k.startswith("RTPIPE_")})
    monkey = pytest.MonkeyPatch()
    try:
        for k, v in env.items():
            monkey.setenv(k, v)
        parsed = Settings()
    finally:
        monkey.undo()
    assert parsed.redis.cluster and len(parsed.redis.nodes()) == 3
    assert parsed.topics.replication_factor == 3
    assert parsed.kafka.sasl_password is not None


def test_each_stage_deployment_scales_on_its_own_group_and_serves_metrics() -> None:
    settings = Settings()
    deployments = _by_kind("Deployment")
    scaled = _by_kind("ScaledObject")
    services = _by_kind("Service")
    secret_keys = set(_by_kind("Secret")["rtpipe-secrets"]["stringData"])
    partitions = int(_by_kind("ConfigMap")["rtpipe-config"]["data"]["RTPIPE_TOPICS__PARTITIONS"])
    assert set(deployments) == set(STAGES) == set(scaled)
    for stage in STAGES:
        dep = deployments[stage]
        pod = dep["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert container["command"] == ["rtpipe", "run", stage]
        port = settings.metrics.port(stage)
        # Every process of the stage serves metrics on its own port (enrichment: the labels
        # process on enrichment_labels_port too), each named in the pod and in the env.
        ports = settings.metrics.ports(stage)
        names = ("metrics", "labels-metrics")[: len(ports)]
        assert container["ports"] == [
            {"name": n, "containerPort": p} for n, p in zip(names, ports, strict=True)
        ]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        env = {e["name"]: e.get("value") for e in container["env"]}
        if stage == "enrichment":
            assert env["RTPIPE_METRICS__ENRICHMENT_LABELS_PORT"] == str(ports[1])
        # ... and every one of those ports is scraped: a headless Service per port, annotated
        # with it, selecting the stage's pods.
        scraped = [
            svc
            for svc in services.values()
            if svc["spec"]["selector"] == {"app.kubernetes.io/name": stage}
            and svc["metadata"]["annotations"].get("prometheus.io/scrape") == "true"
        ]
        assert sorted(
            int(svc["metadata"]["annotations"]["prometheus.io/port"]) for svc in scraped
        ) == sorted(ports)
        for svc in scraped:
            [svc_port] = svc["spec"]["ports"]
            assert str(svc_port["port"]) == svc["metadata"]["annotations"]["prometheus.io/port"]
            assert svc_port["targetPort"] in names
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
        assert {r["key"] for r in refs} == {"RTPIPE_KAFKA__SASL_PASSWORD", "RTPIPE_REDIS__PASSWORD"}
        assert {r["key"] for r in refs} <= secret_keys
        assert services[f"{stage}-metrics"]["spec"]["selector"] == {"app.kubernetes.io/name": stage}

        so = scaled[stage]["spec"]
        assert so["scaleTargetRef"]["name"] == stage
        assert so["maxReplicaCount"] <= partitions
        groups = stage_groups(settings, stage)
        # Scaled on the lag of every consumer group its pods are members of.
        assert {t["metadata"]["consumerGroup"] for t in so["triggers"]} == set(groups), stage
        for trigger in so["triggers"]:
            meta = trigger["metadata"]
            assert meta["consumerGroup"] in groups, (stage, meta)
            assert meta["topic"] in groups[meta["consumerGroup"]], (stage, meta)
    auth = _by_kind("TriggerAuthentication")["rtpipe-kafka"]["spec"]["secretTargetRef"]
    assert {a["key"] for a in auth} <= secret_keys
