"""deploy/observability: promtool accepts the Prometheus config and the alerting rules, every
metric the rules and the Grafana dashboard query is one the service really exports, and a real
Prometheus scrapes a running clipserve with that config and loads the rules healthy."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from PIL import Image

from clipserve.testing import FakeLoader
from clipserve.testing.servers import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
ALERTS_YML = DEPLOY / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "clipserve.json"

# Words of PromQL that are not metric names: functions, aggregations, operators, modifiers.
PROMQL_WORDS = frozenset(
    {
        "abs", "absent", "absent_over_time", "and", "avg", "avg_over_time", "bool", "bottomk",
        "by", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "count", "count_over_time",
        "count_values", "delta", "deriv", "floor", "group", "group_left", "group_right",
        "histogram_quantile", "idelta", "ignoring", "increase", "irate", "label_join",
        "label_replace", "last_over_time", "max", "max_over_time", "min", "min_over_time",
        "offset", "on", "or", "predict_linear", "quantile", "quantile_over_time", "rate",
        "resets", "round", "scalar", "sort", "sort_desc", "stddev", "stdvar", "sum",
        "sum_over_time", "time", "timestamp", "topk", "unless", "vector", "without",
    }
)  # fmt: skip
# Series Prometheus makes itself rather than scraping them.
PROMETHEUS_SERIES = frozenset({"up"})
# Families the service declares but only fills under conditions a CPU test cannot make.
DECLARED_ONLY = {
    "clipserve_gpu_memory_bytes": "set only on CUDA hosts (at each scrape)",
    "clipserve_gpu_utilization_ratio": "set only on CUDA hosts with pynvml (at each scrape)",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_LABEL_LIST = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_TOKEN = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names one PromQL expression selects (label names, label values, durations,
    Grafana variables, functions and keywords left out). A word followed by ``(`` must be a
    known function, so an unknown one fails the test rather than passing as a metric."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    text = _LABEL_LIST.sub(r"\1 ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        word, call = match.group(1), match.group(2)
        if word.lower() in PROMQL_WORDS:
            continue
        assert not call, f"{word!r} looks like a function PromQL does not have, in {expr!r}"
        names.add(word)
    return names


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS_YML.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def referenced_exprs() -> list[tuple[str, str]]:
    alerts = [(f"alert {rule['alert']}", str(rule["expr"])) for rule in alert_rules()]
    return alerts + [(f"panel {title!r}", expr) for title, expr in dashboard_exprs()]


def exported(exposition: str) -> tuple[set[str], set[str]]:
    """(names with samples, names of families declared without any) in a text exposition."""
    sampled = {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }
    declared = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            # text format 0.0.4: a counter's TYPE line already carries its _total name
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            declared |= {name + suffix for suffix in suffixes}
    return sampled, declared - sampled


def png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_extractor_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(x_bucket{job="a",le=~"b c"}'
        "[$__rate_interval]))) / ignoring (kind) y_total offset 5m > 2.5 and on() up"
    )
    assert metric_names(expr) == {"x_bucket", "y_total", "up"}
    with pytest.raises(AssertionError, match="function"):
        metric_names("made_up_function(x)")


def test_promtool_accepts_config_and_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for args in (["check", "config", str(PROMETHEUS_YML)], ["check", "rules", str(ALERTS_YML)]):
        done = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_queue_near_full_watches_each_queues_own_capacity(tmp_path: Path) -> None:
    """``promtool test rules``: ClipserveBatcherQueueNearFull fires for a queue at 80% or more of
    the capacity it exports (whatever that capacity is) once it has stayed there 2 minutes, for
    the fullest instance of a replicated queue, and not for a long queue that is far from full."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    queues = {  # (model, modality, instance): (size, capacity)
        ("fast", "text", "a"): (80, 100),
        ("fast", "image", "a"): (79, 100),
        ("small", "text", "a"): (9, 10),
        ("big", "text", "a"): (900, 2000),
        ("replicated", "text", "a"): (50, 100),
        ("replicated", "text", "b"): (85, 100),
    }
    series = []
    for (model, modality, instance), (size, capacity) in queues.items():
        labels = f'job="clipserve",instance="{instance}:8000",model="{model}",modality="{modality}"'
        series.append({"series": f"batcher_queue_size{{{labels}}}", "values": f"{size}x10"})
        series.append({"series": f"batcher_queue_capacity{{{labels}}}", "values": f"{capacity}x10"})
    (rule,) = [r for r in alert_rules() if r["alert"] == "ClipserveBatcherQueueNearFull"]

    def firing(model: str, modality: str, full: str) -> dict[str, Any]:
        return {
            "exp_labels": {**rule["labels"], "model": model, "modality": modality},
            "exp_annotations": {
                "summary": f"batcher queue {model}/{modality} is {full} full",
                "description": rule["annotations"]["description"],
            },
        }

    test = {
        "rule_files": [str(ALERTS_YML)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": rule["alert"], "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": rule["alert"],
                        "exp_alerts": [
                            firing("fast", "text", "80%"),
                            firing("small", "text", "90%"),
                            firing("replicated", "text", "85%"),
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "queue_near_full_test.yml"
    path.write_text(yaml.safe_dump(test))
    done = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"promtool test rules:\n{done.stdout}{done.stderr}"


async def test_every_queried_metric_is_exported(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(), FakeLoader())
    for model, status in (("fast", 200), ("fast", 200), ("broken", 503), ("nope", 404)):
        response = await client.post("/v1/embeddings", json={"model": model, "input": "hi"})
        assert response.status_code == status, response.text
    response = await client.post(
        "/v1/rank", json={"model": "fast", "query": "a cat", "documents": ["a dog", "a cat"]}
    )
    assert response.status_code == 200, response.text
    response = await client.post(
        "/evaluator/v1/evaluation/single",
        json={"image_input": png_data_uri(), "text_prompt": "red", "model_config_name": "fast"},
    )
    assert response.status_code == 200, response.text
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    sampled, declared_only = exported(metrics.text)

    exprs = referenced_exprs()
    assert exprs, "no expressions found in alerts.yml or the dashboard"
    used: dict[str, list[str]] = {}
    for where, expr in exprs:
        for name in metric_names(expr):
            used.setdefault(name, []).append(where)
    # the extractor did find the obvious ones
    assert {"http_requests_total", "http_request_duration_seconds_bucket"} <= set(used)

    missing = {
        name: places
        for name, places in used.items()
        if name not in sampled | PROMETHEUS_SERIES
        and not (name in declared_only and name in DECLARED_ONLY)
    }
    assert not missing, f"queried but not exported by the service: {missing}"
    # each declared-only exception is still a family the service declares
    for name in DECLARED_ONLY.keys() & used.keys():
        assert name in sampled | declared_only, name


# --- a real Prometheus -------------------------------------------------------------------------


def prometheus_config(target: str, tmp_path: Path) -> Path:
    """deploy/observability/prometheus.yml, scraping ``target`` every second, rules evaluated
    every second, no Alertmanager."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["clipserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    job["static_configs"] = [{"targets": [target], **_labels(job)}]
    config["scrape_configs"] = [job]
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s"}
    config["global"]["evaluation_interval"] = "1s"
    config.pop("alerting", None)
    assert config["rule_files"] == ["alerts.yml"], config["rule_files"]
    config["rule_files"] = [str(ALERTS_YML)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _labels(job: dict[str, Any]) -> dict[str, Any]:
    labels = job["static_configs"][0].get("labels")
    return {"labels": labels} if labels else {}


class Prometheus:
    """A running ``prometheus`` process: its ``url``, ``process`` and ``log`` file."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def poll(self, probe: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        """``probe()`` until it returns something truthy (connection errors count as not yet),
        within ``timeout`` seconds; fails at once if Prometheus exits."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    self.report(f"prometheus exited ({self.process.returncode}) before: {what}")
                )
            try:
                last = probe()
            except httpx.TransportError as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.2)
        pytest.fail(self.report(f"{what}: not within {timeout} s (last: {last!r})"))

    def report(self, message: str) -> str:
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return f"{message}\nprometheus log:\n{tail}"


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """``prometheus(target)`` -> a real Prometheus scraping ``target`` (host:port) with the
    deploy config and rules; stopped by its process id afterwards."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install prometheus)")
    processes: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "prometheus.log"

    def start(target: str) -> Prometheus:
        port = free_port()
        command = [
            binary,
            f"--config.file={prometheus_config(target, tmp_path)}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        with log.open("wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        processes.append(process)
        return Prometheus(f"http://127.0.0.1:{port}", process, log)

    try:
        yield start
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def test_real_prometheus_scrapes_the_service_and_loads_the_rules(
    serve: Callable[..., str],
    make_settings: Callable[..., Any],
    prometheus: Callable[[str], Prometheus],
) -> None:
    url = serve(make_settings(), FakeLoader())
    with httpx.Client(base_url=url, timeout=30) as service:
        for _ in range(3):
            response = service.post("/v1/embeddings", json={"model": "fast", "input": "hi"})
            assert response.status_code == 200, response.text
        response = service.post("/v1/embeddings", json={"model": "broken", "input": "hi"})
        assert response.status_code == 503, response.text

    server = prometheus(urlsplit(url).netloc)
    query = 'http_requests_total{job="clipserve",endpoint="/v1/embeddings",status="200"}'

    with httpx.Client(base_url=server.url, timeout=5) as api:

        def data(path: str, **params: str) -> Any:
            """The API's ``data``, or None while Prometheus is starting (503, not JSON)."""
            response = api.get(path, params=params)
            if response.status_code != 200:
                return None
            answer = response.json()
            assert answer["status"] == "success", answer
            return answer["data"]

        def served() -> list[Any] | None:
            answer = data("/api/v1/query", query=query)
            return answer["result"] if answer else None

        series = server.poll(served, f"Prometheus returning {query}")
        assert len(series) == 1, series
        assert float(series[0]["value"][1]) == 3.0
        assert series[0]["metric"]["method"] == "POST"
        assert series[0]["metric"]["service"] == "clipserve"  # the deploy config's label

        expected = {rule["alert"] for rule in alert_rules()}

        def rules_evaluated() -> list[dict[str, Any]] | None:
            answer = data("/api/v1/rules")
            if answer is None:
                return None
            groups = answer["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if {rule["name"] for rule in rules} != expected:
                return None
            if any(rule.get("lastEvaluation", "").startswith("0001-") for rule in rules):
                return None  # not evaluated yet
            failed: dict[str, Any] = next(
                (r for r in rules if r["name"] == "ClipserveModelFailed"), {}
            )
            if failed.get("state") == "inactive":
                return None  # evaluated before the first scrape landed
            return rules

        rules = server.poll(rules_evaluated, "every alerting rule evaluated")
        unhealthy = {
            r["name"]: (r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"
        }
        assert not unhealthy, unhealthy
        # The model that failed to load makes ClipserveModelFailed match (pending: `for: 1m`).
        failed = next(rule for rule in rules if rule["name"] == "ClipserveModelFailed")
        assert failed["state"] in ("pending", "firing"), failed
        assert {alert["labels"]["model"] for alert in failed["alerts"]} == {"broken"}
