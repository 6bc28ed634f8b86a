"""Issue 10: what the proxies show of themselves. ``--metrics`` (Prometheus
text at /metrics), ``--log-format json``, the summary line, and a log
without Twisted's start-up noise; the real daemons, scraped over HTTP."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

from tests.support import servers
from tests.support.clients import Client
from tests.support.env import Env
from tests.support.pattern import Pattern
from tests.support.ports import HOST
from tests.support.processes import REPO_ROOT, TWISTD, Proc, clean_env, curl, python_env
from tests.support.servers import was_reset
from tests.support.waiting import steady, until, within
from tm3.logs import RateLimit, event_as_json, plural
from tm3.lp import tap as lp_tap
from tm3.metrics import ProxyCollector
from tm3.rp import tap as rp_tap
from tm3.summary import rate

# "listening on IPv4Address(..., port=N) (WHAT)": group 1 the port.
LISTENING_ON = rb"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\) \(%s"


def child_env() -> dict[str, str]:
    """The checkout under test first on PYTHONPATH (not the venv's install)."""
    return {"PYTHONPATH": python_env()["PYTHONPATH"], "PYTHONUNBUFFERED": "1"}


async def port_of(proc: Proc, what: bytes) -> int:
    match = await within(proc.when_output(LISTENING_ON % re.escape(what)), 30, f"{what!r} to listen")
    return int(match.group(1))


async def scrape(env: Env, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics (curl: a real HTTP client): every sample by name and sorted labels."""
    out, err, code = await within(curl("-sS", "-D", "-", f"http://{HOST}:{port}/metrics"), 10, "a scrape")
    assert code == 0, err
    head, _, text = out.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "content-type: text/plain" in head.lower(), head
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def one(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def every(samples: dict[Any, float], name: str, role: str) -> list[float]:
    return [v for (n, labels), v in samples.items() if n == name and ("role", role) in labels]


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    lines = [line for line in proc.text.split("\n")[:-1] if line.strip()]  # whole lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


@pytest_twisted.ensureDeferred
async def test_metrics_json_log_and_summary_of_both_daemons(env: Env) -> None:
    echo = await env.server(servers.echo(env.reactor))
    refused = env.closed_port()
    rp = env.spawn(
        [
            TWISTD, "-n", "--pidfile=", "tm3rp", "--pipes", "2", "--listen", f"tcp:0:interface={HOST}",
            "--allow-to", HOST, "--metrics", f"tcp:0:interface={HOST}", "--summary-interval", "0.3",
        ],
        child_env(),
    )  # fmt: skip
    rp_port, rp_metrics = await port_of(rp, b"TM3 pipes"), await port_of(rp, b"metrics")
    lp = env.spawn(
        [
            TWISTD, "-n", "--pidfile=", "tm3lp", "--remote", f"{HOST}:{rp_port}", "--pipes", "2",
            "--forward", f"tcp:0:interface={HOST}:{HOST}:{echo.port}",
            "--forward", f"tcp:0:interface={HOST}:{HOST}:{refused}",
            "--metrics", f"tcp:0:interface={HOST}", "--log-format", "json",
        ],
        child_env(),
    )  # fmt: skip
    await within(lp.when_output(rb'"text": "session 1 up \(v1\): 2 pipes to the RP'), 30, "the LP's session")
    ports = {}
    for event in json_lines(lp):
        if event.get("text", "").startswith("listening on"):
            ports[event["what"]] = int(re.search(r"port=(\d+)", event["where"]).group(1))  # type: ignore[union-attr]
    lp_metrics = ports["metrics"]

    # One echo of 200 kB (ends "fin"), one connect the server refuses ("connect-failed").
    data = Pattern(7).bytes(200_000)
    client = await env.connect(ports[f"forward to {HOST}:{echo.port}"])
    client.write(data)
    client.shutdown_write()
    reason = await within(client.lost.wait(), 20, "the echo to end")
    assert not was_reset(reason) and client.data == data
    failing = await env.connect(ports[f"forward to {HOST}:{refused}"], Client())
    assert was_reset(await within(failing.lost.wait(), 20, "the refused connect to reset the client"))
    await until(lambda: len([e for e in json_lines(lp) if "how" in e]) == 2, 10, "the LP's lines for both ends")

    r = await scrape(env, rp_metrics)
    assert all(name.startswith("tm3_") and ("role", "rp") in labels for name, labels in r), sorted(r)
    assert one(r, "tm3_process_open_fds", role="rp") > 0
    assert one(r, "tm3_pipes_up", role="rp") == 2
    assert one(r, "tm3_sessions_up", role="rp") == 1
    assert one(r, "tm3_connections_closed_total", role="rp", how="fin") == 1
    assert one(r, "tm3_connections_closed_total", role="rp", how="connect-failed") == 1
    assert one(r, "tm3_connect_failures_total", role="rp") == 1
    assert one(r, "tm3_connections_open", role="rp") == 0
    assert one(r, "tm3_payload_bytes_total", role="rp", direction="from_pipes") == len(data)
    assert one(r, "tm3_payload_bytes_total", role="rp", direction="to_pipes") == len(data)
    assert one(r, "tm3_protocol_errors_total", role="rp") == 0
    # Framed bytes: the payload plus 8 bytes a message, spread over the pipes.
    assert sum(every(r, "tm3_pipe_sent_bytes_total", "rp")) > len(data)
    assert sum(every(r, "tm3_pipe_received_bytes_total", "rp")) > len(data)
    assert len(every(r, "tm3_pipe_rtt_seconds", "rp")) == 2
    assert all(0 <= v < 1 for v in every(r, "tm3_pipe_rtt_seconds", "rp"))
    assert all(v >= 1 for v in every(r, "tm3_pipe_cwnd_segments", "rp"))
    assert every(r, "tm3_pipe_blocked", "rp") and every(r, "tm3_pipe_retransmits_total", "rp")
    assert one(r, "tm3_reorder_held_bytes", role="rp") == 0
    assert one(r, "tm3_outbound_queued_bytes", role="rp") == 0

    lp_samples = await scrape(env, lp_metrics)
    assert one(lp_samples, "tm3_pipes_up", role="lp") == 2
    assert one(lp_samples, "tm3_payload_bytes_total", role="lp", direction="to_pipes") == len(data)
    assert one(lp_samples, "tm3_connections_closed_total", role="lp", how="fin") == 1
    assert one(lp_samples, "tm3_connections_opened_total", role="lp") == 2

    # The RP's summary line, then the exit summaries.
    await within(rp.when_output(rb"summary: 2 pipes up, 0 connections open"), 10, "the RP's summary line")
    lp.transport.signalProcess("TERM")
    await within(lp.ended.wait(), 15, "the LP to stop")
    rp.transport.signalProcess("TERM")
    await within(rp.ended.wait(), 15, "the RP to stop")
    assert "summary at exit: " in rp.text
    events = json_lines(lp)
    [end] = [e for e in events if e.get("how") == "fin"]
    assert {k: end[k] for k in ("conn_id", "host", "port", "how", "up", "down")} == {
        "conn_id": end["conn_id"],
        "host": HOST,
        "port": echo.port,
        "how": "fin",
        "up": len(data),
        "down": len(data),
    }
    assert isinstance(end["seconds"], float) and end["level"] == "info" and end["text"].startswith("conn ")
    [final] = [e for e in events if e.get("final") is True]
    assert final["text"].startswith("summary at exit: 2 connections in ")
    assert final["up"] == final["down"] == len(data)
    for proc in (rp, lp):
        assert "Traceback" not in proc.text, proc.text
        assert "Starting factory" not in proc.text and "Stopping factory" not in proc.text, proc.text
        assert " starting on " not in proc.text and " Closed)" not in proc.text, proc.text  # the ports' noise
        assert "#debug]" not in proc.text and '"level": "debug"' not in proc.text, proc.text


@pytest_twisted.ensureDeferred
async def test_tac_reads_the_observability_variables(env: Env) -> None:
    rp = env.spawn(
        [TWISTD, "-n", "--pidfile=", "-y", str(REPO_ROOT / "tm3rp.tac")],
        {
            **child_env(),
            "TM3_PIPES": "1",
            "TM3_LISTEN": f"tcp:0:interface={HOST}",
            "TM3_METRICS": f"tcp:0:interface={HOST}",
            "TM3_LOG_FORMAT": "json",
            "TM3_SUMMARY_INTERVAL": "0.2",
        },
    )
    metrics = await port_of(rp, b"metrics")
    samples = await scrape(env, metrics)
    assert one(samples, "tm3_sessions_up", role="rp") == 0
    await within(rp.when_output(rb'"text": "summary: 0 pipes up'), 10, "a summary line")
    rp.transport.signalProcess("TERM")
    await within(rp.ended.wait(), 15, "the RP to stop")
    events = json_lines(rp)
    assert any(e["text"].startswith("summary at exit: 0 connections in ") for e in events)
    assert not any(" starting on " in e["text"] for e in events)


# -- the parts ---------------------------------------------------------------------


def test_plural() -> None:
    assert [plural(n, "pipe") for n in (0, 1, 2)] == ["0 pipes", "1 pipe", "2 pipes"]


def test_rate_limit_counts_what_it_left_out() -> None:
    now = [0.0]
    lines = RateLimit(10.0, lambda: now[0])
    assert lines.allow()
    assert not lines.allow() and not lines.allow()
    now[0] = 10.0
    assert lines.allow() and lines.take_suppressed() == 2 and lines.take_suppressed() == 0


def test_rates() -> None:
    assert rate(0, 0) == "0 B/s"
    assert rate(500, 1) == "500 B/s"
    assert rate(12_345, 1) == "12.3 kB/s"
    assert rate(3e9, 1) == "3 GB/s"


def test_a_json_line_has_the_text_and_the_fields() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    event = {
        "log_format": "conn {conn_id} to {host}:{port} ended: {how}",
        "log_level": LogLevel.warn,
        "log_namespace": "tm3.x",
        "log_time": 0.0,
        "log_failure": failure,
        "conn_id": 7,
        "host": "10.0.0.1",
        "port": 80,
        "how": "rst",
        "thing": object(),  # not JSON: its repr
        "message": (),  # the legacy system's, not the event's
    }
    line = json.loads(event_as_json(event))
    assert line["time"] == "1970-01-01T00:00:00.000+00:00"
    assert line["level"] == "warn" and line["namespace"] == "tm3.x"
    assert line["text"] == "conn 7 to 10.0.0.1:80 ended: rst"
    assert (line["conn_id"], line["host"], line["port"], line["how"]) == (7, "10.0.0.1", 80, "rst")
    assert "ZeroDivisionError" in line["traceback"]
    assert line["thing"].startswith("<object") and "message" not in line


@pytest.mark.parametrize("module", [rp_tap, lp_tap])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--log-format", "xml"], "--log-format must be one of text, json, not 'xml'"),
        (["--summary-interval", "-1"], "--summary-interval must be a number of seconds in 0..86400"),
        (["--summary-interval", "soon"], "--summary-interval must be a number of seconds in 0..86400"),
        (["--metrics", "nonsense:1"], "--metrics: not a server endpoint string"),
    ],
)
def test_bad_observability_options(module: Any, argv: list[str], message: str) -> None:
    base = ["--pipes", "2"] if module is rp_tap else ["--remote", HOST, "--pipes", "2", "--socks", "tcp:0"]
    with pytest.raises(usage.UsageError, match=re.escape(message)):
        module.Options().parseOptions([*base, *argv])


@pytest.mark.parametrize("module", [rp_tap, lp_tap])
def test_observability_defaults_and_variables(module: Any) -> None:
    base = ["--pipes", "2"] if module is rp_tap else ["--remote", HOST, "--pipes", "2", "--socks", "tcp:0"]
    config = module.Options()
    config.parseOptions(base)
    assert (config["metrics"], config["log-format"], config["summary-interval"]) == (None, "text", 60.0)
    assert {"TM3_METRICS", "TM3_LOG_FORMAT", "TM3_SUMMARY_INTERVAL"} <= set(module.ENVIRONMENT)


@pytest.mark.parametrize("tap", ["tm3rp", "tm3lp"])
def test_a_taken_metrics_port_stops_the_proxy_with_one_line(tap: str) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--pipes", "1", "--listen", f"tcp:0:interface={HOST}"] if tap == "tm3rp" else []
        if tap == "tm3lp":
            argv = ["--remote", f"{HOST}:9", "--pipes", "1", "--socks", f"tcp:0:interface={HOST}"]
        out = subprocess.run(
            [TWISTD, "-n", "--pidfile=", tap, *argv, "--metrics", f"tcp:{port}:interface={HOST}"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env=clean_env(child_env()),
            timeout=60,
        )
    assert out.returncode == 1, out.stdout + out.stderr
    line = f"{tap}: cannot listen on tcp:{port}:interface={HOST} (--metrics): address already in use"
    assert line in out.stdout + out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


# -- the collector over live queues, in process -----------------------------------


def collect(collector: ProxyCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in collector.collect() for s in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_a_stalled_upload_shows_in_the_queues_and_pauses(env: Env, logs: Any) -> None:
    """v1: a server that reads nothing fills the RP's socket queue, which
    pauses the pipes; the metrics say so, and the pause is one debug line."""
    size = 6 * 1024 * 1024
    rp = await env.rp(2, "--conn-queue", "1MiB")
    collector = ProxyCollector("rp", rp.stats, rp.service.multiplexer.sessions.by_key.values)
    srv = await env.server(servers.never_read(env.reactor, rcvbuf=64 * 1024))
    lp = await env.lp_client(rp.port, 2)
    rx = lp.open(1, HOST, srv.port)
    proto = await within(srv.connection(0), 5, "the server's connection")
    upload = within(lp.upload(1, Pattern(12).chunks(size)), 60, "the upload")
    await steady(lambda: sum(p.bytes_sent for p in lp.pipes), what="the upload to stall")

    m = collect(collector)
    queued = one(m, "tm3_inbound_queued_bytes", role="rp")
    assert queued == rp.session.inbound.queued_total > 512 * 1024
    assert one(m, "tm3_upload_pauses_total", role="rp") >= 1
    assert one(m, "tm3_connections_open", role="rp") == 1
    assert sum(every(m, "tm3_pipe_received_bytes_total", "rp")) >= queued * 4096 // (4096 + 256)
    [pause] = [e for e in logs.events if "socket queues full" in e.get("log_format", "")]
    assert pause["log_level"] is LogLevel.debug

    proto.start_reading()
    assert await upload == size
    lp.fin(1)
    await within(proto.report.wait(), 30, "the server's report")
    await within(rx.when_fin(), 10, "the RP's FIN")
    m = collect(collector)
    assert one(m, "tm3_inbound_queued_bytes", role="rp") == 0
    assert one(m, "tm3_payload_bytes_total", role="rp", direction="from_pipes") == size


@pytest_twisted.ensureDeferred
async def test_the_exit_summary_waits_for_the_drain(env: Env, logs: Any) -> None:
    """Stopping drains the open connections first: the exit line's totals
    include what they carried meanwhile."""
    size = 2 * 1024 * 1024
    rp, _lp, client, _src = await env.download_in_progress(size)
    stopping = rp.service.stopService()
    rp.stopped = True
    assert not logs.matching("summary at exit")  # not while draining
    client.transport.resumeProducing()
    await until(lambda: client.received == size, 20, "the download to finish")
    client.transport.loseConnection()
    await within(stopping, 5, "the RP to stop once its connections are over")
    [final] = [e for e in logs.events if e.get("final") is True and e["log_namespace"] == "tm3.summary.SummaryService"]
    assert final["down"] == size and final["opened"] == 1


@pytest_twisted.ensureDeferred
async def test_pipe_counts_that_differ_are_named_on_both_sides(env: Env) -> None:
    """v1 pipes do not say how many they are. An LP with 8 pipes against an
    RP that expects 4 completes one set on the RP and at once a second, which
    replaces the first: both sides say which --pipes to check, over and over
    (the LP backs off)."""
    rp = await env.rp(4)
    await env.lp(rp.port, 8, wait=False)
    await until(lambda: "does the LP at 127.0.0.1 open more than --pipes 4 pipes?" in env.logged(), 10, "the RP's hint")
    await until(lambda: "does the RP expect --pipes 8?" in env.logged(), 10, "the LP's hint")
