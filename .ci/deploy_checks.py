#!/usr/bin/env python3
"""Structural checks of deploy/ that the real validators (promtool, hadolint, docker-compose, kubernetes-validate)
do not make, plus the dashboard's PromQL turned into a rules file for `promtool check rules`.

Usage: deploy_checks.py DASHBOARD_RULES_OUT
Writes every dashboard expression (Grafana variables substituted) as a recording rule to DASHBOARD_RULES_OUT and
exits non-zero with one line per problem found. Run from the repository root.
"""

import glob
import json
import re
import sys
import tomllib

import yaml

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


# --------------------------------------------------------------------------------------------------- grafana
# What Grafana substitutes at query time, with values that keep the expression valid PromQL.
GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "instance": ".+",
    "partner": ".+",
    "issuer": ".+",
    "prefix": "partner-bridge",
}
VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")


def substitute(expr, where):
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in GRAFANA_VARS:
            problem(where, f"uses ${name}, which the check does not know how to substitute")
            return m.group(0)
        return GRAFANA_VARS[name]

    return VAR_RE.sub(repl, expr)


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def check_dashboard(path, rules):
    where = path
    d = json.load(open(path))
    if d.get("schemaVersion", 0) < 36:
        problem(where, f"schemaVersion {d.get('schemaVersion')} < 36")
    if not d.get("uid"):
        problem(where, "no uid (provisioned dashboards need a stable one)")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problem(where, "needs a `datasource` variable of type datasource (query prometheus)")
    for name, label in (("partner", "partner"), ("issuer", "issuer")):
        v = variables.get(name)
        q = v and (v.get("definition") or v.get("query", {}).get("query", ""))
        if not v or v.get("type") != "query" or not q.startswith("label_values(") or f", {label})" not in q:
            problem(where, f"needs a `{name}` query variable using label_values(..., {label})")
    ids = set()
    exprs = 0
    for p in walk_panels(d.get("panels", [])):
        pw = f"{where}: panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            problem(pw, "duplicate panel id")
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        if not p.get("title"):
            problem(pw, "no title")
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            problem(pw, "datasource must be the ${datasource} variable")
        if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problem(pw, "no unit (fieldConfig.defaults.unit)")
        if not p.get("targets"):
            problem(pw, "no query")
        for t in p.get("targets", []):
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                problem(pw, f"target {t.get('refId')}: datasource must be the ${{datasource}} variable")
            expr = t.get("expr", "").strip()
            if not expr:
                problem(pw, f"target {t.get('refId')}: empty expr")
                continue
            exprs += 1
            rules.append(
                {
                    "record": f"dashboard:panel_{p.get('id')}:{t.get('refId')}",
                    "expr": substitute(expr, f"{pw} target {t.get('refId')}"),
                }
            )
    for v in variables.values():
        q = v.get("definition") or (v.get("query") if isinstance(v.get("query"), str) else "")
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q or "")
        if m:
            exprs += 1
            rules.append({"record": f"dashboard:variable:{v['name']}", "expr": substitute(m.group(1), f"{where}: ${v['name']}")})
    if exprs == 0:
        problem(where, "no PromQL expressions found")
    return exprs


def check_grafana_provisioning():
    for path in glob.glob("deploy/grafana/provisioning/datasources/*.y*ml"):
        doc = yaml.safe_load(open(path))
        for ds in doc.get("datasources", []):
            if ds.get("type") == "prometheus" and not ds.get("uid"):
                problem(path, f"datasource {ds.get('name')!r} needs a uid")
    found = False
    for path in glob.glob("deploy/grafana/provisioning/dashboards/*.y*ml"):
        doc = yaml.safe_load(open(path))
        for prov in doc.get("providers", []):
            found = True
            if not prov.get("options", {}).get("path"):
                problem(path, f"provider {prov.get('name')!r} has no options.path")
    if not found:
        problem("deploy/grafana/provisioning/dashboards", "no dashboard provider")


# --------------------------------------------------------------------------------------------------- alerts
def check_alert_tests():
    alerts = {}
    for path in sorted(glob.glob("deploy/prometheus/rules/*.yml")):
        for group in yaml.safe_load(open(path)).get("groups", []):
            for rule in group.get("rules", []):
                if "alert" in rule:
                    alerts[rule["alert"]] = path
                    ann = rule.get("annotations", {})
                    for key in ("summary", "description", "runbook"):
                        if not ann.get(key):
                            problem(path, f"alert {rule['alert']} has no {key} annotation")
                    if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                        problem(path, f"alert {rule['alert']} needs severity critical|warning|info")
    firing, quiet = set(), set()
    for path in sorted(glob.glob("deploy/prometheus/tests/*.yml")):
        for test in yaml.safe_load(open(path)).get("tests", []):
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    for name, path in alerts.items():
        if name not in firing:
            problem(path, f"alert {name} has no promtool test where it fires")
        if name not in quiet:
            problem(path, f"alert {name} has no promtool test where it stays quiet")
    return len(alerts)


# --------------------------------------------------------------------------------------------------- compose
def check_compose():
    path = "deploy/compose.yaml"
    doc = yaml.safe_load(open(path))
    services = doc.get("services", {})
    for name in ("rabbitmq", "sandbox", "keygen", "receiver-keygen", "issuer", "receiver", "prometheus", "grafana"):
        if name not in services:
            problem(path, f"no `{name}` service")
    for name, svc in services.items():
        # One-shot key generators run to completion (others wait on service_completed_successfully): no healthcheck.
        one_shot = (svc.get("command") or [None])[0] == "keygen" and svc.get("restart") == "no"
        if not one_shot and "test" not in (svc.get("healthcheck") or {}):
            problem(path, f"service {name} has no healthcheck")
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith("."):
                if not glob.glob(f"deploy/{src}"):
                    problem(path, f"service {name} mounts {src}, which does not exist")
    for kind in ("secrets", "configs"):
        for name, spec in (doc.get(kind) or {}).items():
            if "file" in spec and not glob.glob(f"deploy/{spec['file']}"):
                problem(path, f"{kind[:-1]} {name} points at {spec['file']}, which does not exist")


# --------------------------------------------------------------------------------------------------- k8s
def check_k8s():
    for path in sorted(glob.glob("deploy/k8s/*.yaml")):
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        configs = {}
        for d in docs:
            if d.get("kind") == "ConfigMap":
                for key, text in (d.get("data") or {}).items():
                    if key.endswith(".toml"):
                        try:
                            configs[d["metadata"]["name"]] = tomllib.loads(text)
                        except tomllib.TOMLDecodeError as e:
                            problem(path, f"ConfigMap {d['metadata']['name']} {key}: {e}")
        for d in docs:
            if d.get("kind") != "Deployment":
                continue
            name = d["metadata"]["name"]
            pod = d["spec"]["template"]
            spec = pod["spec"]
            ann = pod.get("metadata", {}).get("annotations", {})
            if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != "9464":
                problem(path, f"{name}: pod needs prometheus.io/scrape \"true\" and prometheus.io/port \"9464\"")
            sidecars = [c for c in spec.get("containers", []) if c["name"] == "partner-bridge"]
            if len(spec.get("containers", [])) < 2 or len(sidecars) != 1:
                problem(path, f"{name}: needs an application container and one `partner-bridge` container")
                continue
            c = sidecars[0]
            if (c.get("livenessProbe") or {}).get("httpGet", {}).get("path") != "/livez":
                problem(path, f"{name}: liveness probe must GET /livez")
            if (c.get("startupProbe") or {}).get("httpGet", {}).get("path") != "/livez":
                problem(path, f"{name}: startup probe must GET /livez")
            # A pod is Ready only when every container is: the sidecar's pipeline health (/readyz) must not take the
            # application's pod out of its Services.
            if "readinessProbe" in c and (c["readinessProbe"].get("httpGet") or {}).get("path") != "/livez":
                problem(path, f"{name}: the sidecar must have no readiness probe (or one on /livez), never /readyz")
            check_strategy(path, d, c, configs)
            check_metrics_service(path, d, docs)
            res = c.get("resources", {})
            if not res.get("requests", {}).get("memory") or not res.get("limits", {}).get("memory"):
                problem(path, f"{name}: sidecar needs memory requests and limits")
            sc = c.get("securityContext", {})
            if not (sc.get("runAsNonRoot") or spec.get("securityContext", {}).get("runAsNonRoot")):
                problem(path, f"{name}: sidecar must run as non-root")
            if not sc.get("readOnlyRootFilesystem"):
                problem(path, f"{name}: sidecar needs readOnlyRootFilesystem")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problem(path, f"{name}: sidecar must drop ALL capabilities")
            if sc.get("allowPrivilegeEscalation") is not False:
                problem(path, f"{name}: sidecar needs allowPrivilegeEscalation: false")
            # The drain must finish before the kubelet's SIGKILL.
            grace = 20
            for cm in spec.get("volumes", []):
                cfg = configs.get((cm.get("configMap") or {}).get("name"))
                if cfg:
                    grace = cfg.get("shutdown", {}).get("grace_s", 20)
            tgps = spec.get("terminationGracePeriodSeconds", 30)
            if tgps <= grace:
                problem(path, f"{name}: terminationGracePeriodSeconds {tgps} must exceed shutdown.grace_s {grace}")


def check_strategy(path, deployment, sidecar, configs):
    """Recreate exactly where the embedded SQLite ledger needs it: a ReadWriteOnce claim for state_dir and no
    ledger.url. With the ledger on PostgreSQL, the application's Deployment keeps its rolling updates."""
    name = deployment["metadata"]["name"]
    spec = deployment["spec"]["template"]["spec"]
    strategy = (deployment["spec"].get("strategy") or {}).get("type", "RollingUpdate")
    mounts = {m["name"]: m["mountPath"] for m in sidecar.get("volumeMounts", [])}
    config = {}
    for v in spec.get("volumes", []):
        config = configs.get((v.get("configMap") or {}).get("name")) or config
    state_dir = config.get("state_dir", "/var/lib/partner-bridge")
    on_postgres = str(config.get("ledger", {}).get("url", "")).startswith(("postgres://", "postgresql://"))
    state_on_claim = any(
        v.get("persistentVolumeClaim") and mounts.get(v["name"]) == state_dir for v in spec.get("volumes", [])
    )
    sqlite_on_claim = state_on_claim and not on_postgres
    if sqlite_on_claim and strategy != "Recreate":
        problem(path, f"{name}: the SQLite ledger is on a ReadWriteOnce claim: strategy must be Recreate")
    if not sqlite_on_claim and strategy == "Recreate":
        problem(path, f"{name}: strategy Recreate without an embedded ledger on a claim: use RollingUpdate")
    if sqlite_on_claim and deployment["spec"].get("replicas", 1) != 1:
        problem(path, f"{name}: the SQLite ledger allows one replica; use PostgreSQL for more")


def check_metrics_service(path, deployment, docs):
    """The headless Service that deploy/prometheus/prometheus-kubernetes.yml discovers the sidecar through."""
    name = deployment["metadata"]["name"]
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    services = [
        d
        for d in docs
        if d.get("kind") == "Service"
        and (d["spec"].get("selector") or {})
        and all(pod_labels.get(k) == v for k, v in d["spec"]["selector"].items())
        and any(p.get("targetPort") == "pb-admin" for p in d["spec"].get("ports", []))
    ]
    if len(services) != 1:
        problem(path, f"{name}: needs one Service selecting its pods on port pb-admin (for Prometheus), got {len(services)}")
        return
    svc = services[0]
    sname = svc["metadata"]["name"]
    if svc["spec"].get("clusterIP") != "None" or svc["spec"].get("publishNotReadyAddresses") is not True:
        problem(path, f"Service {sname}: must be headless (clusterIP: None) with publishNotReadyAddresses: true")
    if [p.get("name") for p in svc["spec"]["ports"]] != ["pb-admin"]:
        problem(path, f"Service {sname}: its only port must be named pb-admin (the SRV name uses it)")
    prom = yaml.safe_load(open("deploy/prometheus/prometheus-kubernetes.yml"))
    names = [
        n
        for job in prom.get("scrape_configs", [])
        if job.get("job_name") == "partner-bridge"
        for sd in job.get("dns_sd_configs", [])
        for n in sd.get("names", [])
    ]
    if not any(n.startswith(f"_pb-admin._tcp.{sname}.") for n in names):
        problem(path, f"Service {sname}: prometheus-kubernetes.yml's partner-bridge job does not discover it ({names})")


def check_k8s_optional():
    # CRD-based manifests kubernetes-validate cannot check: parse them and check what they point at.
    for path in sorted(glob.glob("deploy/k8s/optional/*.yaml")):
        for d in yaml.safe_load_all(open(path)):
            if d and d.get("kind") == "PodMonitor":
                ports = [e.get("port") for e in d["spec"].get("podMetricsEndpoints", [])]
                if ports != ["pb-admin"]:
                    problem(path, f"PodMonitor must scrape the pb-admin port only (got {ports})")


def main():
    out = sys.argv[1]
    rules = []
    n = 0
    for path in sorted(glob.glob("deploy/grafana/dashboards/*.json")):
        n += check_dashboard(path, rules)
    check_grafana_provisioning()
    alerts = check_alert_tests()
    check_compose()
    check_k8s()
    check_k8s_optional()
    with open(out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-expressions", "rules": rules}]}, f, sort_keys=False, width=1000)
    for p in problems:
        print(f"  PROBLEM {p}", file=sys.stderr)
    print(f"  {n} dashboard expressions written to {out}; {alerts} alerts each tested firing and quiet")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
