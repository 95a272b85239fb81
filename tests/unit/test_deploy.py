"""The deployment files name only commands and settings that exist, so they cannot rot unnoticed.

No Docker engine or Kubernetes cluster runs here; this is what can be checked without one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser
from services.core.settings import Settings
from services.core.settings_doc import env_example

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {f"RELAIS_{name.upper()}" for name in Settings.model_fields}
OWN_PARSER_COMMANDS = {"demo-target", "dev-kafka", "dlq", "ledger", "targets", "status"}


def check_command(argv: list[str]) -> None:
    """The argv is a `relais` command line the CLI accepts."""
    assert argv, "empty command"
    if argv[0] in OWN_PARSER_COMMANDS:
        commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        assert argv[0] in commands
        if argv[0] == "demo-target":
            from devtools.demotarget.__main__ import _parser as demo_parser

            demo_parser().parse_args(argv[1:])
        return
    build_parser().parse_args(argv)


def relais_env(env: Any) -> set[str]:
    if isinstance(env, dict):
        return {k for k in env if k.startswith("RELAIS_")}
    return {e["name"] for e in env or [] if e["name"].startswith("RELAIS_")}


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def k8s_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/relais.yaml").read_text()) if d]


def test_compose_services_run_real_commands_with_real_settings() -> None:
    services = compose()["services"]
    relais_services = {n: s for n, s in services.items() if s.get("image", "").startswith("relais")}
    assert {"ingress", "validator", "router", "delivery", "tracker", "demo-target"} <= set(relais_services)
    for name, service in relais_services.items():
        check_command(service["command"])
        unknown = relais_env(service.get("environment")) - SETTINGS
        assert not unknown, f"{name}: unknown settings {unknown}"
        assert "healthcheck" in service, name


def test_compose_stages_wait_for_healthy_dependencies() -> None:
    services = compose()["services"]
    for name in ("ingress", "validator", "router", "delivery", "tracker"):
        depends = services[name]["depends_on"]
        assert depends == {"kafka": {"condition": "service_healthy"}, "postgres": {"condition": "service_healthy"}}
    for name in ("kafka", "postgres"):
        assert "healthcheck" in services[name]


def test_compose_config_files_exist_and_load() -> None:
    from services.core.targets import load_targets
    from services.ingress.producers import load_producers

    env = compose()["services"]["ingress"]["environment"]
    [(host, inside)] = [v.split(":")[:2] for v in compose()["x-relais"]["volumes"] if v.startswith("./")]
    files = {var: ROOT / host / Path(env[var]).relative_to(inside)
             for var in ("RELAIS_PRODUCERS_FILE", "RELAIS_TARGETS_FILE", "RELAIS_OPERATORS_FILE")}
    assert all(f.is_file() for f in files.values()), files
    assert load_producers(files["RELAIS_PRODUCERS_FILE"]).authenticate("demo-token") is not None
    assert load_targets(files["RELAIS_TARGETS_FILE"]).get("demo") is not None


def test_kubernetes_deployments() -> None:
    docs = k8s_docs()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {f"relais-{s}" for s in ("ingress", "validator", "router", "delivery", "tracker",
                                                          "alerts")}
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        [container] = pod["containers"]
        check_command(container["args"])
        env = {e["name"]: e for e in container["env"]}
        assert not (relais_env(container["env"]) - SETTINGS), name
        grace = float(env["RELAIS_SHUTDOWN_GRACE_S"]["value"])
        assert pod["terminationGracePeriodSeconds"] > grace, name  # the stage finishes before the kill
        ports = {p["name"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in ports, (name, probe)
        assert pod["securityContext"]["runAsNonRoot"] is True
    kinds = {d["kind"] for d in docs}
    assert {"Secret", "ConfigMap", "Service", "HorizontalPodAutoscaler"} <= kinds


def test_hpa_scales_on_a_metric_relais_exports() -> None:
    from services.core import metrics

    [hpa] = [d for d in k8s_docs() if d["kind"] == "HorizontalPodAutoscaler"]
    metric = hpa["spec"]["metrics"][0]["external"]["metric"]["name"]
    exported = {getattr(m, "_name", None) for m in vars(metrics).values()}
    assert metric in exported


def test_dockerfile_runs_relais_as_non_root() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["relais"\]$', text, re.M)
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user and user.group(1) != "root"
    assert "HEALTHCHECK" in text
    assert set(re.findall(r"RELAIS_[A-Z_]+", text)) <= SETTINGS


def test_env_example_is_current() -> None:
    assert (ROOT / ".env.example").read_text() == env_example() + "\n", (
        "regenerate with: python -m services.core.settings_doc --env > .env.example")


def test_demo_producer_file_loads() -> None:
    from services.ingress.producers import load_producers

    assert load_producers(ROOT / "deploy/dev/producers.yaml").authenticate("demo-token") is not None


def test_demo_operator_file_loads() -> None:
    from services.ops.auth import load_operators

    directory = load_operators(Settings(operators_file=ROOT / "deploy/dev/operators.yaml"))
    operator, viewer = directory.authenticate("demo-operator-token"), directory.authenticate("demo-viewer-token")
    assert operator is not None and operator.may("operator")
    assert viewer is not None and viewer.may("viewer") and not viewer.may("operator")


def _exported_metrics() -> set[str]:
    from prometheus_client import REGISTRY

    import services.core.metrics  # noqa: F401 - registers every Relais metric

    names = set()
    for family in REGISTRY.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        names |= {s.name for s in family.samples}
    return {n for n in names if n.startswith("relais_")}


def _metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\brelais_[a-z_]+", expr))


def test_prometheus_rules_use_only_metrics_relais_exports() -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/relais-alerts.yaml").read_text(encoding="utf-8"))
    exported = _exported_metrics()
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {"RelaisDeadLettersWaiting", "RelaisTargetDown",
                                            "RelaisOldestWaitingRecordTooOld"}
    for alert in alerts:
        used = _metrics_in(alert["expr"])
        assert used and used <= exported, (alert["alert"], used - exported)
    by_name = {a["alert"]: a["expr"] for a in alerts}
    defaults = Settings()
    assert by_name["RelaisOldestWaitingRecordTooOld"].endswith(f"> {defaults.alert_waiting_age_s:g}")
    assert by_name["RelaisTargetBacklog"].endswith(f"> {defaults.alert_waiting_max}")
    assert by_name["RelaisStageLag"].endswith(f"> {defaults.alert_lag_max}")


def test_grafana_dashboard_plots_only_metrics_relais_exports() -> None:
    import json

    dashboard = json.loads((ROOT / "deploy/grafana/relais-dashboard.json").read_text(encoding="utf-8"))
    exported = _exported_metrics()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        used = _metrics_in(expr)
        assert used and used <= exported, (expr, used - exported)


def _compose_value(text: str, given: dict[str, str]) -> str:
    """What compose makes of `${VAR:?message}` / `${VAR:-default}` given the shell's variables."""
    def sub(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if name in given:
            return given[name]
        assert op == ":-", f"compose would stop: {rest}"
        return rest
    return re.sub(r"\$\{(\w+)(:\?|:-)([^}]*)\}", sub, text)


def test_every_compose_process_gets_the_audit_key_a_postgresql_ledger_requires() -> None:
    from services.core.errors import ConfigurationError
    from services.tracker.auditkey import load_audit_key, new_audit_key

    key = new_audit_key()
    services = compose()["services"]
    for name in ("ingress", "validator", "router", "delivery", "tracker", "alerts"):
        env = services[name]["environment"]
        assert env["RELAIS_DATABASE_URL"].startswith("postgresql"), name
        with pytest.raises(ConfigurationError):  # what the process would do without the key
            load_audit_key(Settings(database_url=env["RELAIS_DATABASE_URL"], audit_key=None, audit_key_file=None))
        given = _compose_value(env["RELAIS_AUDIT_KEY"], {"RELAIS_AUDIT_KEY": key})
        assert load_audit_key(Settings(database_url=env["RELAIS_DATABASE_URL"], audit_key=given)).secret
    with pytest.raises(AssertionError, match="32 random bytes"):  # unset: compose stops and says what to do
        _compose_value(services["tracker"]["environment"]["RELAIS_AUDIT_KEY"], {})


def test_every_kubernetes_pod_gets_the_audit_key_from_the_secret() -> None:
    docs = k8s_docs()
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    assert "audit-key" in secret["stringData"]
    for d in (d for d in docs if d["kind"] == "Deployment"):
        [container] = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        ref = env["RELAIS_AUDIT_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "relais-secrets", "key": "audit-key"}, d["metadata"]["name"]
