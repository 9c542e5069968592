"""deploy/ recipes are checked, not just written: Kubernetes manifests against the API schemas, the
compose file and Helm values as YAML with what Bide needs, the systemd units as unit files."""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.30"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("name", ["bide-worker.yaml", "bide-api.yaml"])
def test_kubernetes_manifests_are_valid_against_the_api_schemas(name: str) -> None:
    docs = documents(DEPLOY / "kubernetes" / name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_worker_deployment_probes_its_health_port_and_drains_longer_than_its_turns() -> None:
    deployment, pdb = documents(DEPLOY / "kubernetes" / "bide-worker.yaml")
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert "--health-port" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert spec["terminationGracePeriodSeconds"] > 20  # the host's shutdown grace for turns in flight
    env = {e["name"]: e for e in container["env"]}
    assert "valueFrom" in env["BIDE_NATS_PASSWORD"]  # a secret, not a literal
    assert pdb["kind"] == "PodDisruptionBudget"


def test_the_api_takes_its_token_from_a_secret_never_its_arguments() -> None:
    deployment, _service = documents(DEPLOY / "kubernetes" / "bide-api.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--token" not in container["args"] and "--no-auth" not in container["args"]
    assert {e["name"]: e for e in container["env"]}["BIDE_API_TOKEN"]["valueFrom"]["secretKeyRef"]


def test_the_helm_values_make_a_three_node_jetstream_cluster_with_users() -> None:
    values = yaml.safe_load((DEPLOY / "kubernetes" / "nats-values.yaml").read_text())
    assert values["config"]["cluster"]["enabled"] and values["config"]["cluster"]["replicas"] == 3
    assert values["config"]["jetstream"]["enabled"]
    users = values["config"]["merge"]["accounts"]["BIDE"]["users"]
    publisher = next(u for u in users if u["user"] == "publisher")
    assert publisher["permissions"]["publish"]["allow"] == ["bide.events.>"]


def test_compose_runs_three_nats_nodes_two_hosts_the_api_and_jaeger_at_three_replicas() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"nats", "nats-2", "nats-3", "worker", "worker-2", "api", "jaeger"} <= set(services)
    for name in ("worker", "worker-2", "api"):
        env = services[name]["environment"]
        assert env["BIDE_REPLICAS"] == "3" and env["BIDE_NATS_URL"].count("nats://") == 3
    for node in ("nats", "nats-2", "nats-3"):
        assert "--routes" in services[node]["command"]


@pytest.mark.parametrize("unit", ["nats-server@.service", "bide-worker.service"])
def test_systemd_units_restart_and_are_hardened(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / unit).read_text())
    service = parser["Service"]
    assert service["ExecStart"] and service["Restart"] == "on-failure"
    assert service["EnvironmentFile"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert hardening in service, hardening
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def _conf_user_permissions(user: str) -> dict[str, set[str]]:
    """The quoted subjects of one user's allow and deny lists in deploy/nats/accounts.conf."""
    import re

    text = (DEPLOY / "nats" / "accounts.conf").read_text()
    block = text[text.index(f"user: {user}"):]
    block = block[:block.index("subscribe:")]
    allow = block[block.index("allow:"):block.index("]", block.index("allow:"))]
    deny = block[block.index("deny:"):block.index("]", block.index("deny:"))] if "deny:" in block else ""
    return {"allow": set(re.findall(r'"([^"]+)"', allow)), "deny": set(re.findall(r'"([^"]+)"', deny))}


@pytest.mark.parametrize("user", ["publisher", "api"])
def test_the_helm_values_give_each_user_the_permissions_of_accounts_conf(user: str) -> None:
    """The two copies of the users (the server config the tests run, the Helm values) never drift."""
    values = yaml.safe_load((DEPLOY / "kubernetes" / "nats-values.yaml").read_text())
    helm = next(u for u in values["config"]["merge"]["accounts"]["BIDE"]["users"] if u["user"] == user)
    publish = helm["permissions"]["publish"]
    assert {"allow": set(publish["allow"]), "deny": set(publish.get("deny", []))} == _conf_user_permissions(user)
