"""Draws docs/dashboard.png: the dashboard's main panels, from real data.

    python3 ops/grafana/render_preview.py [--output docs/dashboard.png] [--seconds 70]

Starts a ClickHouse server (behind a TCP proxy that can cut it off), `python -m clickpulse`
writing to it, and a Prometheus scraping clickpulse every second with ops/prometheus/prometheus.yml;
sends valid and invalid events (about 20 requests a second), makes ClickHouse unreachable for ten
seconds in the middle, then runs the queries of the dashboard's panels below through Prometheus's
HTTP API (`query_range`, one point a second, `$__rate_interval` = 5s as Grafana computes it for
1 s scrapes) and plots them with matplotlib, in the dashboard's layout and colours. Needs
clickhouse-server, prometheus (the binaries the integration tests use) and matplotlib
(`pip install -e '.[docs]'`). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.servers import TcpProxy, find_clickhouse_server, find_prometheus, start_clickhouse, start_prometheus  # noqa: E402
from tests.support import clean_environment, free_port, stop_process  # noqa: E402

DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "clickpulse.json"
RATE_INTERVAL = "5s"
# (panel title in the dashboard, what the picture calls it): the panels an operator looks at first.
PANELS = [
    "Accepted events/s and rejected requests/s",
    "Rows written/s",
    "Insert errors/s by kind",
    "Held events vs capacity",
    "Freshness: receipt → confirmed insert",
    "POST /events latency",
]
GRAFANA_COLOURS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]


def event(index: int, **fields: Any) -> dict[str, Any]:
    base = {"event_type": ("signup", "click", "view")[index % 3], "source": ("web", "ios")[index % 2],
            "created_at": "2024-05-01T12:00:00Z", "user_id": f"u-{index % 50}"}
    return {**base, **fields}


async def traffic(url: str, stop: asyncio.Event) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for index in itertools.count():
            if stop.is_set():
                return
            bodies = [(json.dumps([event(index * 100 + i) for i in range(1 + index % 20)]), "application/json")]
            if index % 4 == 0:
                bodies.append((json.dumps(event(index, created_at="yesterday")), "application/json"))
            if index % 10 == 0:
                bodies.append(("<event/>", "application/xml"))
            for body, content_type in bodies:
                async with http.post(url, data=body, headers={"Content-Type": content_type}) as response:
                    await response.read()
            await asyncio.sleep(0.05)


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"clickpulse at {url} did not become ready")


def query_range(prometheus_url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"})
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/query_range?{params}", timeout=30) as response:
        payload = json.load(response)
    assert payload["status"] == "success", payload
    return payload["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for name, value in labels.items():
        text = text.replace("{{" + name + "}}", value)
    return text or ", ".join(f"{name}={value}" for name, value in labels.items()) or "value"


def collect(prometheus_url: str, instance: str, start: float, end: float) -> dict[str, list[tuple[str, list[float], list[float]]]]:
    board = json.loads(DASHBOARD.read_text())
    panels = {panel["title"]: panel for panel in board["panels"]}
    series: dict[str, list[tuple[str, list[float], list[float]]]] = {}
    for title in PANELS:
        lines = []
        for target in panels[title]["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$instance", instance)
            for result in query_range(prometheus_url, expr, start, end):
                labels = {key: value for key, value in result["metric"].items() if key not in ("instance", "job")}
                xs = [float(point[0]) - start for point in result["values"]]
                ys = [float(point[1]) for point in result["values"]]
                name = legend(target.get("legendFormat", ""), labels)
                if title == "Held events vs capacity" and name == "capacity":
                    continue  # 100,000 would flatten what the outage holds; the fill is on the dashboard
                lines.append((name, xs, ys))
        series[title] = lines
    return series


def plot(series: dict[str, list[tuple[str, list[float], list[float]]]], outage: tuple[float, float], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads(DASHBOARD.read_text())
    units = {panel["title"]: panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "") for panel in board["panels"]}
    plt.rcParams.update({
        "figure.facecolor": "#111217", "axes.facecolor": "#181b1f", "axes.edgecolor": "#2c3235",
        "axes.labelcolor": "#ccccdc", "text.color": "#ccccdc", "xtick.color": "#8e8e8e", "ytick.color": "#8e8e8e",
        "grid.color": "#2c3235", "font.size": 9, "legend.frameon": False,
    })
    figure, axes = plt.subplots(2, 3, figsize=(15, 6.6), constrained_layout=True)
    for axis, title in zip(axes.flat, PANELS):
        axis.axvspan(*outage, color="#f2495c", alpha=0.12, lw=0)
        for index, (name, xs, ys) in enumerate(series[title]):
            scale, suffix = (1000.0, " ms") if units[title] == "s" and max(ys, default=0) < 1 else (1.0, "")
            axis.plot(xs, [y * scale for y in ys], color=GRAFANA_COLOURS[index % len(GRAFANA_COLOURS)], lw=1.6,
                      label=name + suffix)
        axis.set_title(title, loc="left", fontsize=10, color="#ccccdc")
        axis.grid(True, lw=0.6)
        axis.set_xlabel("seconds", fontsize=8)
        axis.legend(fontsize=7.5, loc="upper left")
        for side in ("top", "right"):
            axis.spines[side].set_visible(False)
    axes.flat[2].annotate("ClickHouse unreachable", xy=((outage[0] + outage[1]) / 2, 1), xycoords=("data", "axes fraction"),
                          xytext=(0, -12), textcoords="offset points", ha="center", fontsize=8, color="#f2495c")
    figure.suptitle(
        "clickpulse dashboard, main panels: a real Prometheus scraping a real clickpulse every second; "
        "ClickHouse cut off for 10 s (red band)", fontsize=10, color="#ccccdc",
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)


async def run(seconds: float, output: Path) -> None:
    clickhouse_command, prometheus_binary = find_clickhouse_server(), find_prometheus()
    if clickhouse_command is None or prometheus_binary is None:
        raise SystemExit("render_preview.py needs clickhouse-server and prometheus (apt-get install clickhouse-server prometheus)")
    with tempfile.TemporaryDirectory(prefix="clickpulse-preview-") as scratch:
        directory = Path(scratch)
        clickhouse = await asyncio.to_thread(start_clickhouse, directory / "clickhouse", clickhouse_command)
        proxy = TcpProxy(clickhouse.http_port)
        await proxy.restore()
        port = free_port()
        env = clean_environment(os.environ)
        env.update(PYTHONPATH=str(ROOT), HTTP_HOST="127.0.0.1", HTTP_PORT=str(port),
                   CLICKHOUSE_DSN=f"http://127.0.0.1:{proxy.port}/preview", FLUSH_INTERVAL="200ms", CLICKHOUSE_TIMEOUT="2s")
        log = open(directory / "clickpulse.log", "wb")
        service = subprocess.Popen([sys.executable, "-m", "clickpulse"], env=env, stdout=log, stderr=subprocess.STDOUT)
        prometheus = None
        try:
            url = f"http://127.0.0.1:{port}"
            await asyncio.to_thread(wait_ready, url, 30)
            config = json.loads(json.dumps(__import__("yaml").safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())))
            config["global"].update(scrape_interval="1s", evaluation_interval="1s")
            config["rule_files"] = []
            config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
            prometheus = await asyncio.to_thread(start_prometheus, directory / "prometheus", prometheus_binary, config, {})
            stop = asyncio.Event()
            sender = asyncio.create_task(traffic(url + "/events", stop))
            start = time.time()
            third = (seconds - 10) / 2
            await asyncio.sleep(third)
            outage_start = time.time() - start
            await proxy.cut()
            await asyncio.sleep(10)
            await proxy.restore()
            outage_end = time.time() - start
            await asyncio.sleep(third)
            stop.set()
            await sender
            await asyncio.sleep(2)  # the last scrape
            series = await asyncio.to_thread(collect, prometheus.url, f"127.0.0.1:{port}", start, time.time())
            plot(series, (outage_start, outage_end), output)
        finally:
            if prometheus is not None:
                prometheus.stop()
            stop_process(service)
            await proxy.cut()
            await asyncio.sleep(0.5)  # the proxy's connection handlers end
            clickhouse.stop()
    print(f"wrote {output}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--seconds", type=float, default=70.0, help="length of the run (ClickHouse is away for 10 s of it)")
    arguments = parser.parse_args()
    asyncio.run(run(arguments.seconds, arguments.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
