"""``tm3-demo``: the original TM3 experiment 1 on one machine.

Starts, as real processes on loopback: an RP with ``--pipes`` pipes
(``twistd tm3rp``), an LP with as many pipes forwarding a local port to the
test server (``twistd tm3lp --forward``), and ``tm3-testserver``; then runs
``tm3-testclient`` once directly against the server and once through the LP,
prints both timings and the LP's and RP's log lines for the connections, so a
newcomer sees the traffic cross the pipes. Everything it started is stopped
on the way out, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from tm3.cli import version_line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} exited early:\n{read(log)}")  # type: ignore[arg-type]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s:\n{read(log)}")


def wait_for_line(text: str, proc: subprocess.Popen[bytes], log: str, timeout: float = 20.0) -> None:
    """Wait for a log line rather than probing the port: a probe would itself
    be taken for a pipe by the RP, or carried as a connection by the LP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in read(log):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} exited early:\n{read(log)}")  # type: ignore[arg-type]
        time.sleep(0.1)
    raise RuntimeError(f"no {text!r} in {log} after {timeout:.0f} s:\n{read(log)}")


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def twistd(log: str, *args: str) -> list[str]:
    # The twistd beside this interpreter: the one that sees our plugins.
    return [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "-l", log, *args]


def interesting(text: str) -> list[str]:
    keys = ("session", "conn ", "pipe", "listening on", "connect to")
    return [line for line in text.splitlines() if any(k in line for k in keys) and "Stopping factory" not in line]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tm3-demo",
        description="Run TM3 experiment 1 on this machine: test client -> LP -> N pipes -> RP -> test server.",
    )
    parser.add_argument("--version", action="version", version=version_line("tm3-demo"))
    parser.add_argument("--pipes", type=int, default=4, help="pipes between LP and RP (default 4)")
    parser.add_argument("--count", type=int, default=10, help="requests per run (default 10)")
    parser.add_argument("--request", type=int, default=4096, help="request size in bytes (default 4096)")
    parser.add_argument("--response", type=int, default=4096, help="response size in bytes (default 4096)")
    parser.add_argument("--parallel", type=int, default=1, help="parallel client connections (default 1)")
    return parser


def rp_argv(log: str, pipes: int, rp_port: int, srv_port: int) -> list[str]:
    listen = f"tcp:{rp_port}:interface=127.0.0.1"
    # The test server is on loopback, which an RP refuses unless allowed.
    return twistd(log, "tm3rp", "--pipes", str(pipes), "--listen", listen, "--allow-to", f"127.0.0.1:{srv_port}")


def lp_argv(log: str, pipes: int, rp_port: int, lp_port: int, srv_port: int) -> list[str]:
    forward = f"tcp:{lp_port}:interface=127.0.0.1:127.0.0.1:{srv_port}"
    return twistd(log, "tm3lp", "--pipes", str(pipes), "--remote", f"127.0.0.1:{rp_port}", "--forward", forward)


def print_logs(lp_log: str, rp_log: str) -> None:
    for name, log in (("LP", lp_log), ("RP", rp_log)):
        print(f"{name} log:")
        for line in interesting(read(log)):
            print("  " + line)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.pipes <= 1024:
        parser.error("--pipes must be in 1..1024")

    workdir = tempfile.mkdtemp(prefix="tm3-demo-")
    rp_log, lp_log, srv_log = (os.path.join(workdir, n) for n in ("rp.log", "lp.log", "server.log"))
    rp_port, lp_port, srv_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def start(argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(log, "ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        procs.append(proc)
        return proc

    client = [sys.executable, "-m", "tm3.tools.testclient"]
    sizes = [str(args.count), str(args.request), str(args.response), "--parallel", str(args.parallel)]
    status = 1
    try:
        print(f"TM3 demo: {args.pipes} pipes; logs in {workdir}")
        srv = start([sys.executable, "-m", "tm3.tools.testserver", str(srv_port), "--interface", "127.0.0.1"], srv_log)
        wait_for_port(srv_port, srv, srv_log)
        print(f"  test server  127.0.0.1:{srv_port}")
        rp = start(rp_argv(rp_log, args.pipes, rp_port, srv_port), rp_log)
        wait_for_line("listening on", rp, rp_log)
        print(f"  RP           127.0.0.1:{rp_port}  (twistd tm3rp --pipes {args.pipes})")
        lp = start(lp_argv(lp_log, args.pipes, rp_port, lp_port, srv_port), lp_log)
        wait_for_line("session 1 up", lp, lp_log)
        print(f"  LP           127.0.0.1:{lp_port} -> 127.0.0.1:{srv_port} over the pipes\n")

        print(f"$ tm3-testclient 127.0.0.1 {srv_port} {' '.join(sizes)}    # direct, for comparison")
        direct = subprocess.run(client + ["127.0.0.1", str(srv_port), *sizes], env=env, timeout=120)
        print(f"\n$ tm3-testclient 127.0.0.1 {lp_port} {' '.join(sizes)}    # through TM3")
        through = subprocess.run(client + ["127.0.0.1", str(lp_port), *sizes], env=env, timeout=120)
        time.sleep(0.5)  # let both proxies log the connections' ends
        print()
        print_logs(lp_log, rp_log)
        status = 0 if direct.returncode == 0 and through.returncode == 0 else 1
        print("\nresult:", "every byte verified, direct and through TM3" if status == 0 else "FAILED (see above)")
        if status == 0:
            print(
                "\nOn loopback TM3 is slower than direct: there is no delay or loss for its pipes to\n"
                "hide, only two more processes to cross. Its gain shows on a wide-area path: see the\n"
                "README's head-of-line experiment (benchmarks/hol.py, bench/results/hol/)."
            )
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"tm3-demo: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("tm3-demo: interrupted", file=sys.stderr)
    finally:
        stop(procs)
    return status


if __name__ == "__main__":
    sys.exit(main())
