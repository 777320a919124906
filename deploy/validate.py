#!/usr/bin/env python3
"""Offline checks of the rendered deploy/ manifests, proxy.toml, the alert rules and the dashboard.

Called by deploy/validate.sh, which renders the kustomization first. Needs Python >= 3.11
(tomllib), PyYAML and kubernetes-validate (which ships the Kubernetes JSON schemas, so nothing is
downloaded). Writes the PromQL it finds into --promql-dir for `promtool check rules`.

Every check prints one line: `ok   <what>` or `FAIL <what>: <why>`; the exit code is 1 if any
check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import yaml

try:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError
except ImportError:  # validate.sh checks this first; keep the message clear anyway
    sys.exit("missing Python package kubernetes-validate (pip install kubernetes-validate)")

PASSED = 0
FAILED = 0
WARNED = 0


def check(what: str, ok: bool, why: str = "") -> bool:
    global PASSED, FAILED
    if ok:
        PASSED += 1
        print(f"ok   {what}")
    else:
        FAILED += 1
        print(f"FAIL {what}: {why}")
    return ok


def warn(what: str) -> None:
    global WARNED
    WARNED += 1
    print(f"WARN {what}")


# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_HUMAN_UNITS = {"ms": 1e-3, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def go_duration(text: str) -> float:
    """Seconds in a Go duration such as `8760h` or `2h30m` (cert-manager's format)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def human_duration(text: str) -> float:
    """Seconds in a humantime duration as proxy.toml uses them (`5s`, `1m`, `7d`)."""
    parts = re.findall(r"(\d+)\s*(ms|min|s|m|h|d)", text)
    if not parts:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * _HUMAN_UNITS[u] for n, u in parts)


# --------------------------------------------------------------------------------------------
# proxy.toml against proxy.toml.example
# --------------------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*$")
_KEY = re.compile(r"^\s*#?\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=")


def example_key_paths(text: str) -> set[str]:
    """Every key path in proxy.toml.example, set or commented out (`# key = default`)."""
    paths: set[str] = set()
    table = ""
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            table = m.group(2)
            paths.add(table)
            continue
        m = _KEY.match(line)
        if m:
            paths.add(f"{table}.{m.group(1)}" if table else m.group(1))
    return paths


def toml_key_paths(data: dict, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            paths.add(path)
            paths |= toml_key_paths(value, path)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            paths.add(path)  # array of tables: [[tenants]]
            for item in value:
                paths |= toml_key_paths(item, path)
        else:
            paths.add(path)
    return paths


def check_proxy_toml(proxy_path: Path, example_path: Path) -> dict:
    try:
        cfg = tomllib.loads(proxy_path.read_text())
    except tomllib.TOMLDecodeError as e:
        check(f"{proxy_path.name} parses as TOML", False, str(e))
        return {}
    check(f"{proxy_path.name} parses as TOML", True)
    known = example_key_paths(example_path.read_text())
    unknown = sorted(toml_key_paths(cfg) - known)
    check(f"{proxy_path.name} uses only keys listed in {example_path.name}", not unknown,
          f"unknown key(s): {', '.join(unknown)}")

    def get(path: str):
        node = cfg
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    expect = {
        "auth.environment": "production",
        "listener.address": "127.0.0.1:8080",
        "admin.address": "0.0.0.0:9901",
        "client_cert.cert_file": "/var/run/secrets/finhub-mtls/tls.crt",
        "client_cert.key_file": "/var/run/secrets/finhub-mtls/tls.key",
        "headers.origin_ip": "${POD_IP}",
        "log.format": "json",
    }
    for path, want in expect.items():
        check(f"proxy.toml {path} = {want!r}", get(path) == want, f"is {get(path)!r}")
    base = get("upstream.base_url") or ""
    check("proxy.toml upstream.base_url is https without a path",
          re.fullmatch(r"https://[A-Za-z0-9.-]+(:\d+)?/?", base) is not None, f"is {base!r}")
    tenants = cfg.get("tenants") or []
    check("proxy.toml has at least one [[tenants]]", len(tenants) > 0, "none")
    for t in tenants:
        tid = t.get("id")
        for key in ("password", "customer_secret"):
            check(f"proxy.toml tenant {tid}: {key} is not inline",
                  key not in t or re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", str(t[key])) is not None,
                  "secrets must come from a file or ${ENV}")
        check(f"proxy.toml tenant {tid}: password_file under /var/run/secrets/finhub/",
              str(t.get("password_file", "")).startswith("/var/run/secrets/finhub/"),
              f"is {t.get('password_file')!r}")
        if "customer_secret_file" in t:
            check(f"proxy.toml tenant {tid}: customer_secret_file under /var/run/secrets/finhub/",
                  str(t["customer_secret_file"]).startswith("/var/run/secrets/finhub/"),
                  f"is {t['customer_secret_file']!r}")
    return cfg


# --------------------------------------------------------------------------------------------
# Kubernetes resources
# --------------------------------------------------------------------------------------------

CRD_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def kn(res: dict) -> str:
    return f"{res.get('kind')}/{res.get('metadata', {}).get('name')}"


def check_core_schemas(resources: list[dict], k8s_version: str) -> None:
    for res in resources:
        key = (res.get("apiVersion"), res.get("kind"))
        if key in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(res, k8s_version, strict=True)
            check(f"{kn(res)} valid against Kubernetes {k8s_version} schema (strict)", True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            check(f"{kn(res)} valid against Kubernetes {k8s_version} schema (strict)", False,
                  f"{path}: {e.message}")
        except SchemaNotFoundError as e:
            check(f"{kn(res)} has a Kubernetes {k8s_version} schema", False, e.message)


def by_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r.get("kind") == kind]


def named(items: list[dict] | None, name: str) -> dict | None:
    return next((i for i in items or [] if i.get("name") == name), None)


def check_deployment(resources: list[dict], cfg: dict) -> dict | None:
    deps = by_kind(resources, "Deployment")
    if not check("one Deployment rendered", len(deps) == 1, f"found {len(deps)}"):
        return None
    dep = deps[0]
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    check("pod label app=legacy-payments", labels.get("app") == "legacy-payments", f"labels {labels}")
    side = named(pod.get("initContainers"), "finhub-sidecar")
    if not check("finhub-sidecar is an init container", side is not None, "not in initContainers"):
        return None
    check("finhub-sidecar is a native sidecar (restartPolicy: Always)",
          side.get("restartPolicy") == "Always", f"restartPolicy {side.get('restartPolicy')!r}")
    check("finhub-sidecar args run --config /etc/finhub/proxy.toml",
          side.get("args") == ["run", "--config", "/etc/finhub/proxy.toml"], f"args {side.get('args')}")

    ports = {p.get("name"): p.get("containerPort") for p in side.get("ports", [])}
    listen_port = int(cfg.get("listener", {}).get("address", "127.0.0.1:8080").rsplit(":", 1)[1])
    admin_port = int(cfg.get("admin", {}).get("address", "127.0.0.1:9901").rsplit(":", 1)[1])
    check(f"port 'proxy' = listener port {listen_port}", ports.get("proxy") == listen_port, f"ports {ports}")
    check(f"port 'admin' = admin port {admin_port}", ports.get("admin") == admin_port, f"ports {ports}")

    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        get = (side.get(probe) or {}).get("httpGet") or {}
        check(f"{probe} GET {path} on port admin", get.get("path") == path and get.get("port") in ("admin", admin_port),
              f"httpGet {get}")

    res = side.get("resources", {})
    want_res = {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}}
    check("sidecar resources requests 50m/32Mi, limits 500m/128Mi", res == want_res, f"resources {res}")

    sc = side.get("securityContext", {})
    check("sidecar securityContext: non-root 65532, read-only root fs, no privilege escalation, "
          "drop ALL, RuntimeDefault seccomp",
          sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 65532
          and sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
          and (sc.get("capabilities") or {}).get("drop") == ["ALL"]
          and (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"securityContext {sc}")

    env = named(side.get("env"), "POD_IP") or {}
    check("env POD_IP from the Downward API (status.podIP)",
          ((env.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") == "status.podIP", f"env {env}")

    # Every file proxy.toml names is on a read-only mount of the sidecar.
    mounts = {m["mountPath"]: m for m in side.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = [cfg.get("client_cert", {}).get("cert_file"), cfg.get("client_cert", {}).get("key_file"),
             cfg.get("upstream", {}).get("ca_file")]
    for t in cfg.get("tenants", []):
        files += [t.get("password_file"), t.get("customer_secret_file")]
    shared = cfg.get("auth", {}).get("shared", {})
    files += [shared.get("encryption_key_file")] + list(shared.get("previous_key_files", []))
    for f in filter(None, files):
        d, base = os.path.split(f)
        m = mounts.get(d)
        if not check(f"{f} is on a read-only volume mount", m is not None and m.get("readOnly") is True,
                     f"no readOnly mount at {d}"):
            continue
        vol = volumes.get(m["name"], {})
        src = vol.get("secret") or vol.get("configMap") or {}
        items = src.get("items")
        if items is not None:
            check(f"{f}: volume {m['name']} projects {base}", any(i.get("path") == base for i in items),
                  f"items {items}")
        # Non-optional Secret keys must exist in the rendered Secret, if it is rendered here.
        key = base
        if items is not None:
            key = next((i["key"] for i in items if i.get("path") == base), base)
        if "secretName" in src:
            sec = next((r for r in by_kind(resources, "Secret") if r["metadata"]["name"] == src["secretName"]), None)
            if sec is not None:
                keys = set((sec.get("stringData") or {}) | (sec.get("data") or {}))
                check(f"{f}: Secret {src['secretName']} has key {key}", key in keys, f"keys {sorted(keys)}")
        if "name" in src and "secretName" not in src:
            cm = next((r for r in by_kind(resources, "ConfigMap") if r["metadata"]["name"] == src["name"]), None)
            if check(f"{f}: ConfigMap {src['name']} is rendered", cm is not None, "not in the output"):
                check(f"{f}: ConfigMap {src['name']} has key {key}", key in (cm.get("data") or {}),
                      f"keys {sorted(cm.get('data') or {})}")
    cm_mount = mounts.get("/etc/finhub")
    if check("proxy.toml ConfigMap mounted at /etc/finhub", cm_mount is not None, "no mount"):
        cm_name = volumes[cm_mount["name"]].get("configMap", {}).get("name", "")
        cm = next((r for r in by_kind(resources, "ConfigMap") if r["metadata"]["name"] == cm_name), None)
        check(f"ConfigMap {cm_name} (hash-suffixed by kustomize) holds proxy.toml",
              cm is not None and "proxy.toml" in cm.get("data", {}) and re.search(r"-[a-z0-9]{10}$", cm_name),
              "missing, or the name has no content hash")

    # The drain (and the logout after it) must fit in the grace period.
    grace = pod.get("terminationGracePeriodSeconds", 30)
    sd = cfg.get("shutdown", {})
    drain = human_duration(sd.get("drain_delay", "5s")) + human_duration(sd.get("deadline", "20s"))
    auth = cfg.get("auth", {})
    if auth.get("logout_on_shutdown", True):
        drain += human_duration(auth.get("logout_timeout", "2s"))
    check(f"terminationGracePeriodSeconds {grace} >= drain_delay + deadline + logout_timeout ({drain:g}s)", grace >= drain,
          "the kubelet would SIGKILL the sidecar mid-drain")

    app = named(pod.get("containers"), "app") or {}
    app_env = {e["name"]: e.get("value") for e in app.get("env", [])}
    want_url = f"http://127.0.0.1:{listen_port}"
    check(f"app env FINHUB_BASE_URL and HTTP_PROXY = {want_url}",
          app_env.get("FINHUB_BASE_URL") == want_url and app_env.get("HTTP_PROXY") == want_url, f"env {app_env}")
    return dep


def check_certificate(resources: list[dict], dep: dict | None) -> None:
    certs = by_kind(resources, "Certificate")
    if not check("one cert-manager Certificate rendered", len(certs) == 1, f"found {len(certs)}"):
        return
    c = certs[0]
    spec = c.get("spec") or {}
    check("Certificate apiVersion cert-manager.io/v1", c.get("apiVersion") == "cert-manager.io/v1", c.get("apiVersion"))
    check("Certificate spec.secretName = finhub-mtls", spec.get("secretName") == "finhub-mtls", spec.get("secretName"))
    if dep is not None:
        secrets = {v.get("secret", {}).get("secretName") for v in dep["spec"]["template"]["spec"].get("volumes", [])}
        check("Deployment mounts the Certificate's Secret", spec.get("secretName") in secrets, f"secrets {secrets}")
    issuer = spec.get("issuerRef") or {}
    check("Certificate issuerRef has name and kind Issuer/ClusterIssuer",
          bool(issuer.get("name")) and issuer.get("kind") in ("Issuer", "ClusterIssuer"), f"issuerRef {issuer}")
    check("Certificate names a subject (commonName, dnsNames, uris, ...)",
          any(spec.get(k) for k in ("commonName", "dnsNames", "uris", "emailAddresses", "ipAddresses",
                                    "otherNames", "literalSubject")), "cert-manager needs one")
    check("Certificate subject.organizations set", bool((spec.get("subject") or {}).get("organizations")), "missing")
    try:
        duration = go_duration(spec["duration"])
        renew = go_duration(spec["renewBefore"])
        check(f"Certificate duration {spec['duration']} <= 8760h (FinHub: at most one year)",
              duration <= 8760 * 3600, "too long")
        check(f"Certificate renewBefore {spec['renewBefore']} < duration and > 7d expiry alert",
              7 * 86400 < renew < duration, "renewal must happen before the 7-day alert")
    except (KeyError, ValueError) as e:
        check("Certificate duration and renewBefore are Go durations", False, str(e))
    known_usages = {"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
                    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
                    "server auth", "client auth", "code signing", "email protection", "s/mime",
                    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
                    "microsoft sgc", "netscape sgc"}
    usages = spec.get("usages") or []
    check("Certificate usages include 'client auth'", "client auth" in usages, f"usages {usages}")
    check("Certificate usages are cert-manager usage names", set(usages) <= known_usages,
          f"unknown: {sorted(set(usages) - known_usages)}")
    pk = spec.get("privateKey") or {}
    ok_key = (pk.get("algorithm") == "RSA" and int(pk.get("size", 0)) >= 2048) or \
             (pk.get("algorithm") == "ECDSA" and int(pk.get("size", 0)) in (256, 384))
    check(f"Certificate privateKey {pk.get('algorithm')} {pk.get('size')} meets FinHub's rules", ok_key,
          "need RSA >= 2048 or ECDSA 256/384")


def check_podmonitor(resources: list[dict], dep: dict | None) -> None:
    pms = by_kind(resources, "PodMonitor")
    if not check("one PodMonitor rendered", len(pms) == 1, f"found {len(pms)}"):
        return
    spec = pms[0].get("spec") or {}
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    eps = spec.get("podMetricsEndpoints") or []
    check("PodMonitor has podMetricsEndpoints with port admin, path /metrics",
          any(e.get("port") == "admin" and e.get("path", "/metrics") == "/metrics" for e in eps), f"endpoints {eps}")
    if dep is not None:
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        check("PodMonitor selector matches the pod labels",
              bool(sel) and all(labels.get(k) == v for k, v in sel.items()), f"selector {sel}, labels {labels}")
        pod = dep["spec"]["template"]["spec"]
        names = {p.get("name") for c in pod.get("initContainers", []) + pod.get("containers", [])
                 for p in c.get("ports", [])}
        check("PodMonitor port 'admin' is a named container port", "admin" in names, f"ports {names}")


def check_networkpolicy(resources: list[dict], dep: dict | None) -> None:
    nps = by_kind(resources, "NetworkPolicy")
    if not check("one NetworkPolicy rendered", len(nps) == 1, f"found {len(nps)}"):
        return
    spec = nps[0]["spec"]
    check("NetworkPolicy restricts Ingress and Egress", set(spec.get("policyTypes", [])) == {"Ingress", "Egress"},
          f"policyTypes {spec.get('policyTypes')}")
    if dep is not None:
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        sel = (spec.get("podSelector") or {}).get("matchLabels") or {}
        check("NetworkPolicy selects the app pods", bool(sel) and all(labels.get(k) == v for k, v in sel.items()),
              f"podSelector {sel}")
    allowed = set()
    dns_ok = False
    for rule in spec.get("egress", []):
        ports = {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports", [])}
        if not ports:
            check("every egress rule names its ports", False, f"rule {rule} allows all ports")
        allowed |= ports
        for peer in rule.get("to", []):
            ns = ((peer.get("namespaceSelector") or {}).get("matchLabels") or {})
            pods = ((peer.get("podSelector") or {}).get("matchLabels") or {})
            if ns.get("kubernetes.io/metadata.name") == "kube-system" and pods.get("k8s-app") == "kube-dns" \
                    and {("UDP", 53), ("TCP", 53)} <= ports:
                dns_ok = True
        if not rule.get("to"):
            check("every egress rule names its peers", False, f"rule {rule} allows every destination")
    check("NetworkPolicy egress only TCP 443 and DNS 53", allowed <= {("TCP", 443), ("UDP", 53), ("TCP", 53)},
          f"ports {sorted(allowed, key=str)}")
    check("NetworkPolicy egress allows DNS (UDP+TCP 53) to kube-dns in kube-system", dns_ok, "missing")


def check_prometheusrule(resources: list[dict], out_dir: Path) -> None:
    rules = by_kind(resources, "PrometheusRule")
    if not check("one PrometheusRule rendered", len(rules) == 1, f"found {len(rules)}"):
        return
    spec = rules[0].get("spec") or {}
    groups = spec.get("groups") or []
    ok = bool(groups) and all(g.get("name") and g.get("rules") for g in groups) and all(
        (r.get("alert") or r.get("record")) and r.get("expr") for g in groups for r in g["rules"])
    check("PrometheusRule groups have names, rules have alert/record and expr", ok, "malformed spec.groups")
    exprs = " ".join(r.get("expr", "") for g in groups for r in g.get("rules", []))
    for metric, what in (("finhub_sidecar_client_cert_expiration_timestamp_seconds", "client cert expiry"),
                         ("finhub_sidecar_cert_reloads_total", "rejected cert reloads"),
                         ("finhub_sidecar_auth_requests_total", "login/refresh failures"),
                         ("finhub_sidecar_session_expiration_timestamp_seconds", "session expiry"),
                         ("finhub_sidecar_requests_total", "503 session_unavailable ratio")):
        check(f"an alert covers {what} ({metric})", metric in exprs, "no rule uses it")
    # The spec is a Prometheus rule file: promtool checks it.
    (out_dir / "prometheus-rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))


def check_resources(rendered: Path, cfg: dict, k8s_version: str, out_dir: Path) -> None:
    resources = [r for r in yaml.safe_load_all(rendered.read_text()) if r]
    kinds = sorted(kn(r) for r in resources)
    print(f"     rendered {len(resources)} resources: {', '.join(kinds)}")
    for r in resources:
        check(f"{kn(r)} has no namespace (namespace-agnostic)", "namespace" not in r.get("metadata", {}),
              f"namespace {r['metadata'].get('namespace')!r}")
    check_core_schemas(resources, k8s_version)
    dep = check_deployment(resources, cfg)
    check_certificate(resources, dep)
    check_podmonitor(resources, dep)
    check_networkpolicy(resources, dep)
    check_prometheusrule(resources, out_dir)
    sas = by_kind(resources, "ServiceAccount")
    if sas:
        check("ServiceAccount automountServiceAccountToken: false",
              all(s.get("automountServiceAccountToken") is False for s in sas), "token is mounted")


# --------------------------------------------------------------------------------------------
# Grafana dashboard
# --------------------------------------------------------------------------------------------

DASHBOARD_METRICS = [
    "finhub_sidecar_requests_total",
    "finhub_sidecar_request_duration_seconds",
    "finhub_sidecar_upstream_duration_seconds",
    "finhub_sidecar_requests_in_flight",
    "finhub_sidecar_upstream_connections_total",
    "finhub_sidecar_session_expiration_timestamp_seconds",
    "finhub_sidecar_auth_requests_total",
    "finhub_sidecar_upstream_401_replays_total",
    "finhub_sidecar_client_cert_expiration_timestamp_seconds",
    "finhub_sidecar_cert_reloads_total",
    "finhub_sidecar_rate_limited_total",
    "finhub_sidecar_build_info",
]


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana variables so promtool can parse the expression."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?", ".*", expr)


def check_dashboard(path: Path, out_dir: Path) -> None:
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        check(f"{path.name} is JSON", False, str(e))
        return
    check(f"{path.name} is JSON", True)
    check("dashboard schemaVersion 39", dash.get("schemaVersion") == 39, f"is {dash.get('schemaVersion')}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS") or {}
    check("dashboard has datasource variable DS_PROMETHEUS (prometheus)",
          ds.get("type") == "datasource" and ds.get("query") == "prometheus", f"variable {ds}")
    tenant = variables.get("tenant") or {}
    tq = tenant.get("query")
    tq = tq.get("query") if isinstance(tq, dict) else tq
    check("dashboard tenant variable = label_values(finhub_sidecar_requests_total, tenant)",
          tenant.get("type") == "query" and tq == "label_values(finhub_sidecar_requests_total, tenant)", f"query {tq!r}")

    panels = list(dash.get("panels") or [])
    for p in list(panels):
        panels += p.get("panels") or []  # collapsed rows
    ids = [p.get("id") for p in panels]
    check("dashboard panel ids are unique", len(ids) == len(set(ids)), f"ids {ids}")
    check("every panel has a gridPos", all("gridPos" in p for p in panels), "missing gridPos")
    cells: dict[tuple[int, int], str] = {}
    overlaps = set()
    for p in panels:
        g = p.get("gridPos") or {}
        if g.get("x", 0) + g.get("w", 0) > 24:
            overlaps.add(f"{p.get('title')} is wider than the 24-column grid")
        for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                if (x, y) in cells:
                    overlaps.add(f"{p.get('title')} overlaps {cells[(x, y)]}")
                cells[(x, y)] = p.get("title")
    check("dashboard panels do not overlap", not overlaps, "; ".join(sorted(overlaps)))
    exprs = []
    bad_ds = []
    for p in panels:
        for t in p.get("targets") or []:
            if "expr" in t:
                exprs.append((p.get("title"), t["expr"]))
            for obj in (p.get("datasource"), t.get("datasource")):
                if obj is not None and (obj.get("uid") != "${DS_PROMETHEUS}"):
                    bad_ds.append(p.get("title"))
    for v in variables.values():
        if v.get("type") == "query" and (v.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
            bad_ds.append(f"variable {v.get('name')}")
    check("every query uses datasource ${DS_PROMETHEUS}", not bad_ds, f"others in {sorted(set(bad_ds))}")
    text = " ".join(e for _, e in exprs)
    for metric in DASHBOARD_METRICS:
        check(f"dashboard shows {metric}", metric in text, "no panel queries it")
    rules = [{"record": f"dashboard:panel_{i}", "expr": grafana_to_promql(e)} for i, (_, e) in enumerate(exprs)]
    (out_dir / "dashboard-exprs.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]},
                                                                 sort_keys=False))
    print(f"     {len(exprs)} dashboard queries written for promtool")


# --------------------------------------------------------------------------------------------
# Metric names against src/ (each component defines its own)
# --------------------------------------------------------------------------------------------

def check_metric_names(metrics_rs: Path, dashboard: Path, out_dir: Path, strict: bool) -> None:
    if not metrics_rs.exists():
        warn(f"{metrics_rs} not found: metric names not cross-checked")
        return
    # Each component defines its own metrics (`src/metrics.rs` holds them together): a
    # directory is read whole.
    sources = sorted(metrics_rs.rglob("*.rs")) if metrics_rs.is_dir() else [metrics_rs]
    defined = set()
    for source in sources:
        defined |= set(re.findall(r'"(finhub_sidecar_[a-z0-9_]+)"', source.read_text()))
    used = set(re.findall(r"finhub_sidecar_[a-z0-9_]+", dashboard.read_text()))
    rules_file = out_dir / "prometheus-rules.yaml"
    if rules_file.exists():
        used |= set(re.findall(r"finhub_sidecar_[a-z0-9_]+", rules_file.read_text()))
    base = {re.sub(r"_(bucket|sum|count)$", "", m) if re.sub(r"_(bucket|sum|count)$", "", m) in defined else m
            for m in used}
    missing = sorted(base - defined)
    what = "metric names used by the dashboard and alerts are defined in src/"
    if not missing:
        check(what, True)
    elif strict:
        check(what, False, f"not defined: {', '.join(missing)}")
    else:
        warn(f"{what}: not (yet) defined: {', '.join(missing)} (FINHUB_METRICS_STRICT=1 makes this a failure)")


def check_component(rendered: Path, proxy_path: Path, example_path: Path, k8s_version: str, name: str) -> None:
    """The base rendered with one component of deploy/components/: schemas, its proxy.toml, and
    every file that proxy.toml names on a read-only mount of the sidecar."""
    try:
        cfg = tomllib.loads(proxy_path.read_text())
    except tomllib.TOMLDecodeError as e:
        check(f"{name}: proxy.toml parses as TOML", False, str(e))
        return
    unknown = sorted(toml_key_paths(cfg) - example_key_paths(example_path.read_text()))
    check(f"{name}: proxy.toml uses only keys listed in {example_path.name}", not unknown,
          f"unknown key(s): {', '.join(unknown)}")
    resources = [r for r in yaml.safe_load_all(rendered.read_text()) if r]
    print(f"     {name}: rendered {len(resources)} resources")
    check_core_schemas(resources, k8s_version)
    deps = by_kind(resources, "Deployment")
    if not check(f"{name}: one Deployment rendered", len(deps) == 1, f"found {len(deps)}"):
        return
    pod = deps[0]["spec"]["template"]["spec"]
    side = named(pod.get("initContainers"), "finhub-sidecar") or {}
    mounts = {m["mountPath"]: m for m in side.get("volumeMounts", [])}
    cc, up = cfg.get("client_cert", {}), cfg.get("upstream", {})
    files = [cc.get("cert_file"), cc.get("key_file"), cc.get("pin_file"), cc.get("pkcs11_module"),
             up.get("ca_file"), up.get("egress_proxy_password_file")]
    for t in cfg.get("tenants", []):
        files += [t.get("password_file"), t.get("customer_secret_file")]
    for f in filter(None, files):
        d = os.path.dirname(f)
        m = mounts.get(d)
        check(f"{name}: {f} is on a read-only volume mount of the sidecar",
              m is not None and m.get("readOnly") is True, f"no readOnly mount at {d}")
    cm = next((r for r in by_kind(resources, "ConfigMap")
               if r["metadata"]["name"].startswith("finhub-sidecar-config")), None)
    check(f"{name}: the rendered proxy.toml is the component's",
          cm is not None and cm.get("data", {}).get("proxy.toml") == proxy_path.read_text(), "it is not")
    if "key_uri" in cc:
        check(f"{name}: no key file and no cert-manager Certificate (the key stays in the token)",
              "key_file" not in cc and not by_kind(resources, "Certificate"), "a key file or Certificate remains")
        check(f"{name}: the PKCS#11 module is copied before the sidecar starts",
              [c.get("name") for c in pod.get("initContainers", [])][:2] == ["pkcs11-module", "finhub-sidecar"],
              f"init containers {[c.get('name') for c in pod.get('initContainers', [])]}")
    if "egress_proxy" in up:
        port = int(up["egress_proxy"].rsplit(":", 1)[1].strip("/"))
        nps = by_kind(resources, "NetworkPolicy")
        allowed = {(p.get("protocol", "TCP"), p.get("port"))
                   for np in nps for rule in np["spec"].get("egress", []) for p in rule.get("ports", [])}
        check(f"{name}: NetworkPolicy egress only to the proxy port {port} and DNS",
              allowed <= {("TCP", port), ("UDP", 53), ("TCP", 53)} and ("TCP", port) in allowed,
              f"ports {sorted(allowed, key=str)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rendered", type=Path, required=True, help="output of kustomize build deploy/")
    ap.add_argument("--proxy-toml", type=Path, required=True)
    ap.add_argument("--example", type=Path, required=True, help="proxy.toml.example")
    ap.add_argument("--dashboard", type=Path, required=True)
    ap.add_argument("--metrics-rs", type=Path, required=True)
    ap.add_argument("--k8s-version", required=True)
    ap.add_argument("--promql-dir", type=Path, required=True, help="where to write rule files for promtool")
    ap.add_argument("--component", help="validate the base rendered with this deploy/components/ entry only")
    args = ap.parse_args()

    if args.component:
        print(f"== component {args.component}")
        check_component(args.rendered, args.proxy_toml, args.example, args.k8s_version, args.component)
        print(f"     validate.py: {PASSED} ok, {FAILED} failed, {WARNED} warnings")
        (args.promql_dir / "counts").write_text(f"{PASSED} {FAILED}\n")
        return 1 if FAILED else 0

    print(f"== proxy.toml ({args.proxy_toml})")
    cfg = check_proxy_toml(args.proxy_toml, args.example)
    print(f"== Kubernetes resources (kubernetes-validate {kubernetes_validate.__version__}, "
          f"Kubernetes {args.k8s_version})")
    check_resources(args.rendered, cfg, args.k8s_version, args.promql_dir)
    print(f"== Grafana dashboard ({args.dashboard})")
    check_dashboard(args.dashboard, args.promql_dir)
    print("== metric names")
    check_metric_names(args.metrics_rs, args.dashboard, args.promql_dir,
                       os.environ.get("FINHUB_METRICS_STRICT") == "1")
    print(f"     validate.py: {PASSED} ok, {FAILED} failed, {WARNED} warnings")
    (args.promql_dir / "counts").write_text(f"{PASSED} {FAILED}\n")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
