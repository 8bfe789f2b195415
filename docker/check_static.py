"""Static checks of docker/, for machines without a Docker engine (needs PyYAML only).

* compose.yaml, prometheus.yml and the Grafana provisioning files parse as YAML, and the
  dashboard as JSON;
* compose: every depends_on names a service, every network used is declared, every bind
  mount and build file exists, every relay runs a config from docker/config/, every port
  is published on 127.0.0.1 only, and every Redis runs with maxmemory and allkeys-lru;
* prometheus.yml scrapes exactly the relay services, on their admin port, which no service
  publishes;
* the dashboard: unique panel ids, no overlapping panels, every query on the provisioned
  data source, and a panel for each family in ``PLOTTED`` (subscriptions, filters, the
  feed, batches: a node exports them, an operator should see them).

    python3 docker/check_static.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
# The relays' admin listener (docker/config/*.toml): what Prometheus scrapes.
ADMIN_PORT = 9645
# Metric families the dashboard must plot, beside traffic, caches, upstreams and the head.
PLOTTED = (
    "chainrelay_subscriptions",
    "chainrelay_subscription_notifications_total",
    "chainrelay_filters",
    "chainrelay_feed_frames_total",
    "chainrelay_feed_last_latency_seconds",
    "chainrelay_feed_parents",
    "chainrelay_feed_children",
    "chainrelay_batch_pushes_total",
    "chainrelay_batch_ack_seconds_bucket",
    "chainrelay_batch_order_gaps_total",
)


def load_yaml(name: str) -> Any:
    return yaml.safe_load((HERE / name).read_text())


def check() -> list[str]:
    done: list[str] = []
    compose = load_yaml("compose.yaml")
    prom = load_yaml("prometheus.yml")
    sources = load_yaml("grafana/provisioning/datasources/prometheus.yml")
    providers = load_yaml("grafana/provisioning/dashboards/chainrelay.yml")
    dash = json.loads((HERE / "grafana/dashboards/chainrelay.json").read_text())
    done.append("YAML and JSON files parse")

    services: dict[str, Any] = compose["services"]
    networks = set(compose.get("networks", {}))
    relays = set()
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep in deps:
            assert dep in services, f"{name}: depends_on unknown service {dep}"
        for net in svc.get("networks", []):
            assert net in networks, f"{name}: network {net} is not declared"
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (HERE / src).exists(), f"{name}: mount source {src} does not exist"
        build = svc.get("build")
        if build:
            context = HERE / build.get("context", ".")
            assert (context / build["dockerfile"]).exists(), f"{name}: no {build['dockerfile']}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} not on loopback"
        command = svc.get("command", [])
        if str(svc.get("image", "")).startswith("chainrelay:") and "serve" in command:
            relays.add(name)
            config = command[command.index("--config") + 1]
            local = HERE / "config" / Path(config).name
            assert config.startswith("/etc/chainrelay/") and local.exists(), f"{name}: {config}"
        if str(svc.get("image", "")).startswith("redis"):
            args = svc["command"]
            assert args[args.index("--maxmemory") + 1], f"{name}: no maxmemory"
            assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru", name
    done.append(f"compose.yaml: {len(services)} services, {len(relays)} relays, references ok")

    targets = {
        t
        for job in prom["scrape_configs"]
        for static in job["static_configs"]
        for t in static["targets"]
    }
    assert targets == {f"{r}:{ADMIN_PORT}" for r in relays}, f"scrape targets {sorted(targets)}"
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert not str(port).endswith(f":{ADMIN_PORT}"), f"{name}: admin port published"
    done.append(f"prometheus.yml scrapes exactly the {len(relays)} relays")

    uid = sources["datasources"][0]["uid"]
    path = providers["providers"][0]["options"]["path"]
    mounts = [v for v in services["grafana"]["volumes"] if v.endswith(path + ":ro")]
    assert mounts, f"dashboards path {path} is not mounted into grafana"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    boxes = [p["gridPos"] for p in dash["panels"]]
    for i, a in enumerate(boxes):
        assert a["x"] + a["w"] <= 24
        for b in boxes[i + 1 :]:
            overlap = (
                a["x"] < b["x"] + b["w"]
                and b["x"] < a["x"] + a["w"]
                and a["y"] < b["y"] + b["h"]
                and b["y"] < a["y"] + a["h"]
            )
            assert not overlap, f"panels overlap: {a} {b}"
    queries = [t for p in dash["panels"] for t in p.get("targets", [])]
    assert all(t["datasource"]["uid"] == uid for t in queries), "a query on another source"
    done.append(f"dashboard: {len(ids)} panels, {len(queries)} queries on data source {uid!r}")
    exprs = " ".join(t["expr"] for t in queries)
    missing = [m for m in PLOTTED if re.search(re.escape(m) + r"\b", exprs) is None]
    assert not missing, f"dashboard: no panel plots {missing}"
    done.append(f"dashboard: plots all {len(PLOTTED)} subscription, filter, feed, batch families")
    return done


if __name__ == "__main__":
    try:
        lines = check()
    except AssertionError as exc:
        print(f"check_static: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print("\n".join(lines))
