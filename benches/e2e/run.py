#!/usr/bin/env python3
"""End-to-end benchmark: finhub-sidecar vs nginx vs HAProxy in the same proxy role.

Everything runs on 127.0.0.1 with free ports and a temp dir; every process started here is
stopped on exit, Ctrl-C or error. Python 3.11 standard library only. See benches/e2e/README.md.

    python3 benches/e2e/run.py [--rounds 3] [--duration 10] [--connections 32,256]
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import json
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TEMPLATES = HERE / "templates"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_PATH = "/api/v2/accounts"
TENANT = "tenant-demo"
SYSTEMS = ("sidecar", "pingora-minimal", "nginx", "haproxy")
# Report order: the sidecar, the framework floor, the peers doing its work, their cheapest configs.
VARIANTS = ("sidecar", "pingora-minimal", "nginx-equal", "haproxy-equal", "nginx", "haproxy")
FIXED_RATE_CONNS = 32


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class SkipSystem(Exception):
    """A proxy could not be made to work; it is left out of the run."""


# --------------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(template: str, dest: Path, values: dict[str, str]) -> Path:
    text = (TEMPLATES / template).read_text()
    for k, v in values.items():
        text = text.replace(f"@@{k}@@", v)
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise RuntimeError(f"{template}: unfilled placeholders {sorted(set(left))}")
    dest.write_text(text)
    return dest


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt() -> str:
    """Unsigned-but-well-formed HS256-looking JWT (random signature bytes)."""
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    payload = {
        "sub": "bench",
        "iat": now,
        "exp": now + 3600,
        "internalTokenKey": "bench-" + secrets.token_hex(8),
    }
    return ".".join(
        [
            b64url(json.dumps(header, separators=(",", ":")).encode()),
            b64url(json.dumps(payload, separators=(",", ":")).encode()),
            b64url(secrets.token_bytes(32)),
        ]
    )


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def version_of(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    out = (p.stdout + p.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


def gen_pki(tmp: Path) -> None:
    """Throwaway CA, server cert (SAN localhost + 127.0.0.1), client cert (EKU clientAuth)."""
    def ossl(*args: str) -> None:
        run(["openssl", *args], cwd=tmp)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
         "-subj", "/CN=finhub-bench-ca", "-keyout", "ca.key", "-out", "ca.crt",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, ext in (
        ("server", "localhost",
         "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
         "keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"),
        ("client", "finhub-bench-client",
         "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
         "basicConstraints=CA:FALSE\n"),
    ):
        (tmp / f"{name}.ext").write_text(ext)
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", f"/CN={cn}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "30", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt")
    # HAProxy wants certificate + key in one file.
    (tmp / "client.pem").write_text((tmp / "client.crt").read_text() + (tmp / "client.key").read_text())
    for f in tmp.glob("*.key"):
        f.chmod(0o600)


def wait_tcp(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy env
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --------------------------------------------------------------------------------------------
# /proc


def proc_children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(d))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total


def system_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) clock ticks over all CPUs from /proc/stat (steal = hypervisor)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, sum(v[:8])


def status_kb(pids: list[int], key: str) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


def pss_kb(pids: list[int]) -> int:
    """Proportional set size: shared pages split between processes (nginx master + worker)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def reset_hwm(pids: list[int]) -> bool:
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            ok = False
    return ok


# --------------------------------------------------------------------------------------------
# processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    stop_signal: int = signal.SIGTERM
    logfile: Path | None = None

    def pids(self) -> list[int]:
        """The process and its direct children (nginx master + workers)."""
        return [self.popen.pid, *proc_children(self.popen.pid)]


class Supervisor:
    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: list[str], logdir: Path, stop_signal=signal.SIGTERM,
              cpu: str | None = None) -> Proc:
        if cpu is not None:
            cmd = ["taskset", "-c", cpu, *cmd]
        logfile = logdir / f"{name}.out"
        fh = open(logfile, "wb")
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        fh.close()
        proc = Proc(name, p, stop_signal, logfile)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        p = proc.popen
        if p.poll() is None:
            try:
                p.send_signal(proc.stop_signal)
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log(f"{proc.name} (pid {p.pid}) did not stop in 5 s; killing its process group")
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session, started by us
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as e:  # keep stopping the others
                log(f"stopping {proc.name}: {e}")


def tail(path: Path | None, n: int = 15) -> str:
    if not path or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return "\n".join("    " + l for l in lines)


# --------------------------------------------------------------------------------------------
# the three systems


@dataclass
class System:
    name: str
    port: int
    proc: Proc
    admin_port: int | None = None
    startup_idle_rss_kb: int = 0


def start_upstream(sup: Supervisor, tmp: Path, jwt: str, cpu: str | None, user_line: str) -> tuple[int, Proc]:
    port = free_port()
    login = json.dumps({"userSessionToken": jwt, "expires_in": 3600, "token_type": "Bearer"},
                       separators=(",", ":"))
    small = json.dumps({"data": [{"id": "acc-0001", "currency": "EUR", "balance": "1234.56",
                                  "status": "ACTIVE"}], "page": 1, "total": 1},
                       separators=(",", ":"))
    conf = render("upstream-nginx.conf", tmp / "upstream-nginx.conf",
                  {"TMP": str(tmp), "PORT": str(port), "LOGIN_JSON": login, "SMALL_JSON": small,
                   "USER_LINE": user_line})
    proc = sup.start("upstream-nginx", ["nginx", "-p", str(tmp), "-e", str(tmp / "upstream-error.log"), "-c", str(conf)],
                     tmp, cpu=cpu)
    wait_tcp(port, proc.popen)
    return port, proc


def start_sidecar(sup, tmp, binary, up_port, cpu) -> System:
    port, admin = free_port(), free_port()
    (tmp / "password").write_text("bench-password\n")
    (tmp / "customer_secret").write_text("bench-secret\n")
    for f in ("password", "customer_secret"):
        (tmp / f).chmod(0o600)
    conf = render("sidecar.toml", tmp / "proxy.toml",
                  {"TMP": str(tmp), "PORT": str(port), "ADMIN_PORT": str(admin),
                   "UPSTREAM_PORT": str(up_port)})
    # SIGINT stops the sidecar without the graceful drain (SIGTERM would wait drain_delay).
    proc = sup.start("sidecar", [str(binary), "run", "--config", str(conf)], tmp,
                     stop_signal=signal.SIGINT, cpu=cpu)
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise SkipSystem(f"sidecar exited with {proc.popen.returncode}:\n{tail(proc.logfile)}")
        try:
            last = http_get(f"http://127.0.0.1:{admin}/ready", timeout=1)
            if last[0] == 200:
                break
        except OSError as e:
            last = (None, str(e).encode())
        time.sleep(0.1)
    else:
        raise SkipSystem(f"sidecar /ready not 200 after 30 s (last: {last}):\n{tail(proc.logfile)}")
    return System("sidecar", port, proc, admin_port=admin)


def start_minimal(sup, tmp, binary, up_port, cpu) -> System:
    """The framework floor: examples/pingora_minimal.rs (the smallest ProxyHttp over the same
    vendored Pingora, same mTLS upstream and pool, two static headers)."""
    port = free_port()
    # SIGINT is Pingora's fast shutdown; SIGTERM would wait for its graceful period.
    proc = sup.start("pingora-minimal",
                     [str(binary), f"127.0.0.1:{port}", str(up_port), str(tmp / "ca.crt"),
                      str(tmp / "client.crt"), str(tmp / "client.key")], tmp,
                     stop_signal=signal.SIGINT, cpu=cpu)
    try:
        wait_tcp(port, proc.popen)
    except RuntimeError as e:
        raise SkipSystem(f"pingora-minimal: {e}\n{tail(proc.logfile)}")
    return System("pingora-minimal", port, proc)


def variant(name: str, work: str) -> str:
    """The system's name in reports: `nginx` (cheapest config) or `nginx-equal` (equal work)."""
    return f"{name}-equal" if work == "equal" else name


def start_nginx_proxy(sup, tmp, up_port, jwt, cpu, user_line, work="cheapest") -> System:
    port = free_port()
    name = variant("nginx", work)
    template = "proxy-nginx-equal.conf" if work == "equal" else "proxy-nginx.conf"
    # Each variant its own pid, logs and temp dirs (both may run side by side: --work both).
    conf = render(template, tmp / f"proxy-{name}.conf",
                  {"TMP": str(tmp), "PORT": str(port), "UPSTREAM_PORT": str(up_port), "JWT": jwt,
                   "USER_LINE": user_line})
    conf.write_text(conf.read_text().replace(f"{tmp}/proxy-nginx", f"{tmp}/proxy-{name}"))
    err = tmp / f"proxy-{name}-error.log"
    proc = sup.start(name, ["nginx", "-p", str(tmp), "-e", str(err), "-c", str(conf)], tmp, cpu=cpu)
    try:
        wait_tcp(port, proc.popen)
    except RuntimeError as e:
        raise SkipSystem(f"nginx proxy: {e}\n{tail(proc.logfile)}\n{tail(err)}")
    return System(name, port, proc)


def start_haproxy(sup, tmp, up_port, jwt, cpu, work="cheapest") -> System:
    port = free_port()
    name = variant("haproxy", work)
    template = "proxy-haproxy-equal.cfg" if work == "equal" else "proxy-haproxy.cfg"
    conf = render(template, tmp / f"proxy-{name}.cfg",
                  {"TMP": str(tmp), "PORT": str(port), "UPSTREAM_PORT": str(up_port), "JWT": jwt})
    try:
        run(["haproxy", "-c", "-f", str(conf)])
    except subprocess.CalledProcessError as e:
        raise SkipSystem(f"haproxy -c rejected the config:\n{e.stdout}{e.stderr}")
    # -db: stay in the foreground, no daemon; SIGUSR1 would be a soft stop, SIGTERM is immediate.
    proc = sup.start(name, ["haproxy", "-db", "-f", str(conf)], tmp, cpu=cpu)
    try:
        wait_tcp(port, proc.popen)
    except RuntimeError as e:
        raise SkipSystem(f"haproxy: {e}\n{tail(proc.logfile)}")
    return System(name, port, proc)


def check_through(system: System) -> None:
    url = f"http://127.0.0.1:{system.port}{PAGE_PATH}"
    try:
        status, body = http_get(url, timeout=10)
    except OSError as e:
        raise SkipSystem(f"{system.name}: check request failed: {e}\n{tail(system.proc.logfile)}")
    if status != 200:
        raise SkipSystem(f"{system.name}: check request got {status}: {body[:300]!r}\n"
                         f"{tail(system.proc.logfile)}")


# --------------------------------------------------------------------------------------------
# measurements


def sidecar_new_upstream_conns(system: System) -> float | None:
    if system.admin_port is None:
        return None
    try:
        status, body = http_get(f"http://127.0.0.1:{system.admin_port}/metrics", timeout=5)
    except OSError:
        return None
    if status != 200:
        return None
    total = 0.0
    found = False
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("finhub_sidecar_upstream_connections_total{") and 'reused="false"' in line:
            total += float(line.rsplit(None, 1)[1])
            found = True
    return total if found else 0.0


def newconn_lines(tmp: Path) -> int:
    p = tmp / "upstream-newconn.log"
    if not p.exists():
        return 0
    with open(p, "rb") as f:
        return sum(1 for _ in f)


WRK_RE = re.compile(r"BENCH (.*)")


def run_fixed_rate(system: System, rate: int, conns: int, duration: int, cpu: str | None) -> dict:
    """Latency at a fixed offered rate (oha with latency correction: a late request counts from
    when it should have been sent, so a stall is not hidden by coordinated omission)."""
    pids = system.proc.pids()
    cmd = ["oha", "-z", f"{duration}s", "-c", str(conns), "-q", str(rate), "--latency-correction",
           "--no-tui", "--output-format", "json", f"http://127.0.0.1:{system.port}{PAGE_PATH}"]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    ticks_before = cpu_ticks(pids)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    ticks_after = cpu_ticks(pids)
    if p.returncode != 0:
        raise RuntimeError(f"oha failed ({p.returncode}): {p.stderr[-500:]}")
    d = json.loads(p.stdout)
    codes = d.get("statusCodeDistribution") or {}
    ok = codes.get("200", 0)
    # Requests still in flight when the duration ends are aborted by oha itself, not failures.
    failures = {k: v for k, v in (d.get("errorDistribution") or {}).items() if "deadline" not in k}
    if failures:
        log(f"{system.name}: oha errors {failures}")
    total = sum(codes.values()) + sum(failures.values())
    lat = d.get("latencyPercentiles") or {}
    return {
        "rate": rate,
        "requests": total,
        "errors": total - ok,
        "rps": d["summary"]["requestsPerSec"],
        "p50_ms": (lat.get("p50") or float("nan")) * 1000,
        "p99_ms": (lat.get("p99") or float("nan")) * 1000,
        "p999_ms": (lat.get("p99.9") or float("nan")) * 1000,
        "cpu_us_per_req": (ticks_after - ticks_before) / CLK_TCK / ok * 1e6 if ok else float("nan"),
    }


def run_wrk(system: System, conns: int, duration: int, cpu: str | None, tmp: Path,
            upstream: Proc) -> dict:
    pids = system.proc.pids()
    reset_hwm(pids)
    rss_before = status_kb(pids, "VmRSS")
    metric_before = sidecar_new_upstream_conns(system)
    time.sleep(0.3)  # let the upstream's access log buffer (none configured) settle
    lines_before = newconn_lines(tmp)
    up_pids = upstream.pids()
    up_ticks_before = cpu_ticks(up_pids)
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s",
           "-s", str(TEMPLATES / "latency.lua"), f"http://127.0.0.1:{system.port}{PAGE_PATH}"]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys_before = system_ticks()
    ticks_before = cpu_ticks(pids)
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    wall = time.monotonic() - t0
    ticks_after = cpu_ticks(pids)
    up_ticks_after = cpu_ticks(up_pids)
    sys_after = system_ticks()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr or p.stdout}")
    m = WRK_RE.search(p.stdout)
    if not m:
        raise RuntimeError(f"wrk printed no BENCH line:\n{p.stdout}\n{p.stderr}")
    w = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    time.sleep(0.3)
    lines_after = newconn_lines(tmp)
    metric_after = sidecar_new_upstream_conns(system)
    req = w["requests"]
    errors = w["err_connect"] + w["err_read"] + w["err_write"] + w["err_status"] + w["err_timeout"]
    cpu_s = (ticks_after - ticks_before) / CLK_TCK
    row = {
        "requests": int(req),
        "errors": int(errors),
        "non2xx": int(w["err_status"]),
        "rps": req / (w["duration_us"] / 1e6),
        "p50_ms": w["p50"] / 1000,
        "p90_ms": w["p90"] / 1000,
        "p99_ms": w["p99"] / 1000,
        "p999_ms": w["p999"] / 1000,
        "max_ms": w["max"] / 1000,
        "cpu_s": cpu_s,
        "cpu_us_per_req": cpu_s / req * 1e6 if req else float("nan"),
        "upstream_cpu_us_per_req": (up_ticks_after - up_ticks_before) / CLK_TCK / req * 1e6 if req else float("nan"),
        "rss_before_kb": rss_before,
        "peak_rss_kb": status_kb(system.proc.pids(), "VmHWM"),
        "upstream_new_conns": lines_after - lines_before,
        "upstream_conns_per_1k": (lines_after - lines_before) / req * 1000 if req else float("nan"),
        "sidecar_metric_new_conns": (metric_after - metric_before)
        if metric_before is not None and metric_after is not None else "",
        "wall_s": wall,
        "wrk_cpu_s": wrk_s,
        # Noise check: CPU busy on the box that was neither the proxy, the upstream nor wrk, and
        # CPU stolen by the hypervisor, as % of all CPU time during the run.
        "other_cpu_pct": max(0.0, ((sys_after[0] - sys_before[0])
                                   - (ticks_after - ticks_before)
                                   - (up_ticks_after - up_ticks_before)) / CLK_TCK - wrk_s)
        / ((sys_after[2] - sys_before[2]) / CLK_TCK or 1) * 100,
        "steal_pct": (sys_after[1] - sys_before[1]) / ((sys_after[2] - sys_before[2]) or 1) * 100,
    }
    return row


def recv_response(s: socket.socket) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed before headers")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    hl = head.lower()
    if not hl.startswith(b"http/1.1 200"):
        raise ConnectionError(f"unexpected status line {head.splitlines()[0]!r}")
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", hl)
    if m:
        need = int(m.group(1))
        while len(body) < need:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed in body")
            body += chunk
    elif b"transfer-encoding: chunked" in hl:
        while not body.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed in chunked body")
            body += chunk


def peer_closed(s: socket.socket) -> bool:
    """True when the proxy has closed (or answered on) a connection we sent nothing on."""
    s.settimeout(0)  # a socket with a timeout would wait for data in recv, MSG_DONTWAIT or not
    try:
        s.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing to read: still held
    except OSError:
        return True  # reset
    return True  # b"" (EOF) or bytes (e.g. a 408/503 refusal)


def never_used_conns_rss(system: System, n: int) -> tuple[int, int, int, float]:
    """Open n connections and send nothing on them; VmRSS, PSS (kB), failures, seconds from the
    first connect to the reading. Measured within a second or two of opening: the sidecar closes
    a connection that sends no byte after `listener.header_timeout` (10 s by default, not set in
    templates/sidecar.toml). A connect that fails, or a connection the proxy has closed or
    answered by the time of the reading, counts as failed."""
    socks: list[socket.socket] = []
    failed = 0
    t0 = time.monotonic()
    try:
        for _ in range(n):
            try:
                socks.append(socket.create_connection(("127.0.0.1", system.port), timeout=10))
            except OSError:
                failed += 1
        time.sleep(0.5)  # let the proxy accept them all
        rss = status_kb(system.proc.pids(), "VmRSS")
        pss = pss_kb(system.proc.pids())
        age = time.monotonic() - t0
        failed += sum(1 for s in socks if peer_closed(s))
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    return rss, pss, failed, age


def idle_conns_rss(system: System, n: int) -> tuple[int, int, int]:
    """Open n keep-alive connections, one request each, keep them open; VmRSS, PSS (kB), failures."""
    socks: list[socket.socket] = []
    failed = 0
    req = (f"GET {PAGE_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{system.port}\r\n"
           f"Connection: keep-alive\r\n\r\n").encode()
    try:
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", system.port), timeout=10)
            except OSError:
                failed += 1
                continue
            socks.append(s)
            try:
                s.sendall(req)
                recv_response(s)
            except (OSError, ConnectionError):
                failed += 1
        time.sleep(0.5)
        rss = status_kb(system.proc.pids(), "VmRSS")
        pss = pss_kb(system.proc.pids())
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    return rss, pss, failed


# --------------------------------------------------------------------------------------------
# reporting


def med(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else float("nan")


def spread(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows]
    m = statistics.median(vals)
    return (max(vals) - min(vals)) / m * 100 if m else float("nan")


def fmt(v: float, nd: int = 1) -> str:
    if v != v:  # NaN
        return "–"
    return f"{v:,.{nd}f}"


def ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def machine_info() -> dict[str, str]:
    model = "?"
    try:
        for line in run(["lscpu"]).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version()}


def load_tables(L: list[str], members: list[str], args, results) -> None:
    """One table per connection count for `members` (the sidecar first), noise, and ratios."""
    for conns in args.connections:
        L.append(f"### {conns} connections, {args.duration} s per run, {args.rounds} rounds")
        L.append("")
        L.append("| system | req/s | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/req | peak RSS MB "
                 "| upstream conns / 1k req | errors | req/s spread | CPU/req spread |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in members:
            rows = results.get((s, conns), [])
            if not rows:
                continue
            L.append(
                f"| {s} | {fmt(med(rows, 'rps'), 0)} | {fmt(med(rows, 'p50_ms'), 2)} "
                f"| {fmt(med(rows, 'p99_ms'), 2)} | {fmt(med(rows, 'p999_ms'), 2)} "
                f"| {fmt(med(rows, 'cpu_us_per_req'), 1)} | {fmt(med(rows, 'peak_rss_kb') / 1024, 1)} "
                f"| {fmt(med(rows, 'upstream_conns_per_1k'), 3)} | {sum(r['errors'] for r in rows)} "
                f"| {fmt(spread(rows, 'rps'), 0)} % | {fmt(spread(rows, 'cpu_us_per_req'), 0)} % |")
        L.append("")
        allrows = [r for s_ in members for r in results.get((s_, conns), [])]
        if allrows:
            L.append(f"Noise during these runs (median / max over all runs): CPU used by other "
                     f"processes {fmt(med(allrows, 'other_cpu_pct'), 1)} % / "
                     f"{fmt(max(r['other_cpu_pct'] for r in allrows), 1)} %, stolen by the "
                     f"hypervisor {fmt(med(allrows, 'steal_pct'), 1)} % / "
                     f"{fmt(max(r['steal_pct'] for r in allrows), 1)} % of the box's CPU time.")
            L.append("")
        side = results.get(("sidecar", conns), [])
        others = [o for o in members if o != "sidecar" and results.get((o, conns))]
        if side and others:
            L.append("| ratio | req/s | p50 | p99 | p99.9 | CPU/req | peak RSS | upstream conns/1k |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            for other in others:
                o = results[(other, conns)]
                L.append(
                    f"| sidecar / {other} | {ratio(med(side, 'rps'), med(o, 'rps'))} "
                    f"| {ratio(med(side, 'p50_ms'), med(o, 'p50_ms'))} "
                    f"| {ratio(med(side, 'p99_ms'), med(o, 'p99_ms'))} "
                    f"| {ratio(med(side, 'p999_ms'), med(o, 'p999_ms'))} "
                    f"| {ratio(med(side, 'cpu_us_per_req'), med(o, 'cpu_us_per_req'))} "
                    f"| {ratio(med(side, 'peak_rss_kb'), med(o, 'peak_rss_kb'))} "
                    f"| {ratio(med(side, 'upstream_conns_per_1k'), med(o, 'upstream_conns_per_1k'))} |")
            L.append("")


def fixed_rate_table(L: list[str], members: list[str], args, fixed) -> None:
    rows_of = {s: fixed[s] for s in members if fixed.get(s)}
    if not rows_of:
        return
    L.append(f"### Latency at a fixed {args.fixed_rate:,} req/s ({FIXED_RATE_CONNS} connections, "
             f"oha with latency correction, {args.duration} s per run, {args.rounds} rounds)")
    L.append("")
    L.append("| system | achieved req/s | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/req | errors |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    for s, rows in rows_of.items():
        L.append(f"| {s} | {fmt(med(rows, 'rps'), 0)} | {fmt(med(rows, 'p50_ms'), 2)} "
                 f"| {fmt(med(rows, 'p99_ms'), 2)} | {fmt(med(rows, 'p999_ms'), 2)} "
                 f"| {fmt(med(rows, 'cpu_us_per_req'), 1)} | {sum(r['errors'] for r in rows)} |")
    L.append("")
    side = rows_of.get("sidecar")
    if side and len(rows_of) > 1:
        L.append("| ratio | p50 | p99 | p99.9 | CPU/req |")
        L.append("|---|---:|---:|---:|---:|")
        for other, o in rows_of.items():
            if other == "sidecar":
                continue
            L.append(f"| sidecar / {other} | {ratio(med(side, 'p50_ms'), med(o, 'p50_ms'))} "
                     f"| {ratio(med(side, 'p99_ms'), med(o, 'p99_ms'))} "
                     f"| {ratio(med(side, 'p999_ms'), med(o, 'p999_ms'))} "
                     f"| {ratio(med(side, 'cpu_us_per_req'), med(o, 'cpu_us_per_req'))} |")
        L.append("")


def memory_table(L: list[str], systems: list[str], args, idle, never, fresh, startup_rss,
                 startup_pss) -> None:
    """Idle RSS and RSS with N app connections: never used, served one request in a fresh
    process, served one request after all load rounds; PSS beside; ratios vs every other system."""
    n = args.idle_conns
    L.append(f"## Memory at rest and with {n:,} keep-alive app connections")
    L.append("")
    if n <= 0:
        L.append("| system | idle RSS MB (fresh start) | idle PSS MB |")
        L.append("|---|---:|---:|")
        for s in systems:
            L.append(f"| {s} | {fmt(startup_rss[s] / 1024, 1)} | {fmt(startup_pss[s] / 1024, 1)} |")
        L.append("")
        return

    def one(d: dict, key: str) -> float:
        return d[key] if d and isinstance(d.get(key), (int, float)) else float("nan")

    def mb(v: float) -> str:
        return fmt(v / 1024, 1)

    def per_conn(v: float, base: float) -> str:
        return fmt((v - base) / n, 1)

    def failed(s: str) -> str:
        rows = idle.get(s, [])
        parts = [str(never[s]["failed"]) if s in never else "–",
                 str(fresh[s]["failed"]) if s in fresh else "–",
                 str(sum(r["failed"] for r in rows)) if rows else "–"]
        return " / ".join(parts)

    L.append(f"| system | idle RSS MB (fresh start) | RSS MB, {n:,} never-used conns "
             f"| RSS MB, {n:,} conns that served one request (fresh) "
             f"| RSS MB, {n:,} conns that served one request (after load, median of rounds) "
             "| KB per conn, never-used / served (fresh) "
             "| idle PSS MB | PSS MB, never-used | PSS MB, served (fresh) | PSS MB, served (after load) "
             "| failed conns (never / fresh / after load) |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in systems:
        rows = idle.get(s, [])
        base = startup_rss[s]
        L.append(f"| {s} | {mb(base)} | {mb(one(never.get(s), 'rss_kb'))} "
                 f"| {mb(one(fresh.get(s), 'rss_kb'))} "
                 f"| {mb(med(rows, 'rss_kb')) if rows else '–'} "
                 f"| {per_conn(one(never.get(s), 'rss_kb'), base)} / "
                 f"{per_conn(one(fresh.get(s), 'rss_kb'), base)} "
                 f"| {mb(startup_pss[s])} | {mb(one(never.get(s), 'pss_kb'))} "
                 f"| {mb(one(fresh.get(s), 'pss_kb'))} "
                 f"| {mb(med(rows, 'pss_kb')) if rows else '–'} | {failed(s)} |")
    L.append("")
    L.append(f"Never-used: {n:,} connections opened and held with no request sent, read 0.5 s after "
             "the last one opened (the sidecar closes such a connection after "
             "`listener.header_timeout`, 10 s). Served (fresh): right after start-up and the check "
             f"request, before the warm-up and any load, {n:,} connections each send one keep-alive "
             "request, read the whole response and stay open. Served (after load): the same after "
             "all load rounds, once per round. KB per conn: (RSS with the connections − idle RSS) "
             f"/ {n:,}.")
    L.append("")
    for lead in ("sidecar", "pingora-minimal"):
        if lead not in startup_rss or len(systems) < 2:
            continue
        if lead == "pingora-minimal" and "sidecar" in startup_rss:
            continue  # sidecar / pingora-minimal is in the sidecar's rows
        L.append("| ratio | idle RSS | RSS, never-used conns | RSS, served (fresh) "
                 "| RSS, served (after load) | PSS, served (after load) |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for other in systems:
            if other == lead:
                continue
            L.append(f"| {lead} / {other} | {ratio(startup_rss[lead], startup_rss[other])} "
                     f"| {ratio(one(never.get(lead), 'rss_kb'), one(never.get(other), 'rss_kb'))} "
                     f"| {ratio(one(fresh.get(lead), 'rss_kb'), one(fresh.get(other), 'rss_kb'))} "
                     f"| {ratio(med(idle.get(lead, []), 'rss_kb'), med(idle.get(other, []), 'rss_kb'))} "
                     f"| {ratio(med(idle.get(lead, []), 'pss_kb'), med(idle.get(other, []), 'pss_kb'))} |")
        L.append("")


def targets_table(L: list[str], args, results, idle, fresh, fixed, startup_rss) -> None:
    """Issue #26's targets against this run (equal-work peers where the target is about work)."""
    c = min(args.connections)
    side = results.get(("sidecar", c))
    peer = "nginx-equal" if results.get(("nginx-equal", c)) else "nginx"
    ng = results.get((peer, c))
    if not side or not ng:
        return
    rows: list[tuple[str, str, bool]] = []
    r = med(side, "cpu_us_per_req") / med(ng, "cpu_us_per_req")
    rows.append((f"CPU per request ≤ 1.3× {peer}'s ({c} connections)",
                 f"{fmt(med(side, 'cpu_us_per_req'), 1)} vs {fmt(med(ng, 'cpu_us_per_req'), 1)} µs ({r:.2f}×)",
                 r <= 1.3))
    floor = results.get(("pingora-minimal", c))
    if floor:
        r = med(side, "cpu_us_per_req") / med(floor, "cpu_us_per_req")
        rows.append((f"CPU per request ≤ 1.15× pingora-minimal's ({c} connections)",
                     f"{fmt(med(side, 'cpu_us_per_req'), 1)} vs {fmt(med(floor, 'cpu_us_per_req'), 1)} µs ({r:.2f}×)",
                     r <= 1.15))
    r = med(side, "rps") / med(ng, "rps")
    rows.append((f"req/s ≥ 0.75× {peer}'s ({c} connections)",
                 f"{fmt(med(side, 'rps'), 0)} vs {fmt(med(ng, 'rps'), 0)} ({r:.2f}×)", r >= 0.75))
    # Memory with app connections that each served one request: against HAProxy doing the
    # sidecar's work if it ran, else its cheapest config.
    n = args.idle_conns
    hp = next((h for h in ("haproxy-equal", "haproxy") if idle.get(h)), None)
    if idle.get("sidecar") and hp:
        a, b = med(idle["sidecar"], "rss_kb"), med(idle[hp], "rss_kb")
        rows.append((f"RSS with {n:,} app connections that each served one request ≤ {hp}'s "
                     "(after load)",
                     f"{fmt(a / 1024, 1)} vs {fmt(b / 1024, 1)} MB ({a / b:.2f}×)", a <= b))
    hp = next((h for h in ("haproxy-equal", "haproxy") if fresh.get(h)), None)
    if fresh.get("sidecar") and hp:
        a, b = fresh["sidecar"]["rss_kb"], fresh[hp]["rss_kb"]
        rows.append((f"RSS with {n:,} app connections that each served one request ≤ {hp}'s "
                     "(fresh process)",
                     f"{fmt(a / 1024, 1)} vs {fmt(b / 1024, 1)} MB ({a / b:.2f}×)", a <= b))
    peers = [s for s in ("nginx", "haproxy") if s in startup_rss] or [
        s for s in ("nginx-equal", "haproxy-equal") if s in startup_rss]
    if peers and "sidecar" in startup_rss:
        best = min(startup_rss[s] for s in peers)
        rows.append((f"idle RSS below {' and '.join(peers)}",
                     f"{fmt(startup_rss['sidecar'] / 1024, 1)} MB vs "
                     + " / ".join(f"{fmt(startup_rss[s] / 1024, 1)}" for s in peers) + " MB",
                     startup_rss["sidecar"] < best))
    if args.baseline_idle_mb is not None and "sidecar" in startup_rss:
        a = startup_rss["sidecar"] / 1024
        rows.append((f"idle RSS no worse than the baseline ({fmt(args.baseline_idle_mb, 1)} MB)",
                     f"{fmt(a, 1)} vs {fmt(args.baseline_idle_mb, 1)} MB", a <= args.baseline_idle_mb))
    fpeer = "nginx-equal" if fixed.get("nginx-equal") else "nginx"
    if fixed.get("sidecar") and fixed.get(fpeer):
        a, b = med(fixed["sidecar"], "p99_ms"), med(fixed[fpeer], "p99_ms")
        rows.append((f"p99 at a fixed {args.fixed_rate:,} req/s ≤ 1.2× {fpeer}'s",
                     f"{fmt(a, 2)} vs {fmt(b, 2)} ms ({a / b:.2f}×)", a <= 1.2 * b))
    for conns in args.connections:
        srows = results.get(("sidecar", conns))
        if srows:
            per1k = med(srows, "upstream_conns_per_1k")
            rows.append((f"upstream connection reuse ≥ 99.9 % at {conns} connections",
                         f"{100 - per1k / 10:.3f} % ({fmt(per1k, 3)} new per 1k requests)", per1k <= 1.0))
    L.append("## Targets (issue #26) against this run")
    L.append("")
    L.append("| target | result | met? |")
    L.append("|---|---|---|")
    for name, res, ok in rows:
        L.append(f"| {name} | {res} | {'**yes**' if ok else 'no'} |")
    L.append("")
    L.append("Instructions and allocations per request (≤ 95 k, ≤ 40) are counted by "
             "`benches/e2e/icount.py`, not by this run.")
    L.append("")


def build_report(args, results, idle, never, fresh, fixed, startup_rss, startup_pss, skipped,
                 versions, machine, started, cmdline, pin_desc) -> str:
    systems = [s for s in VARIANTS if s in startup_rss]
    L: list[str] = []
    L.append("# Benchmarks: finhub-sidecar vs nginx vs HAProxy (end to end)")
    L.append("")
    L.append(f"> {args.note}")
    L.append("")
    L.append("Generated by `benches/e2e/run.py` (see `benches/e2e/README.md` for what is measured "
             "and how). Each system is the same proxy: plain HTTP in on 127.0.0.1, HTTPS with an "
             "mTLS client certificate out to an nginx upstream that requires it, keep-alive upstream "
             "pool, session headers added. Medians over rounds; systems run in alternation "
             "(A B C A B C …). `nginx-equal` and `haproxy-equal` do the sidecar's per-request work "
             "(its header set with fresh ids, app credentials stripped, the request id echoed, one "
             "JSON access line per request to a file, buffered); `nginx` and `haproxy` are their "
             "cheapest configurations (two static headers, no access log). `pingora-minimal` "
             "(when run) is the framework floor: the smallest `ProxyHttp` over the same vendored "
             "Pingora, same mTLS upstream and pool, two static headers "
             "(`examples/pingora_minimal.rs`).")
    L.append("")
    L.append(f"- Date: {started} UTC")
    L.append(f"- Command: `{cmdline}`")
    L.append(f"- Machine: {machine['nproc']} CPUs, {machine['cpu']}, Linux {machine['kernel']}")
    L.append(f"- Pinning: {pin_desc}")
    for k, v in versions.items():
        L.append(f"- {k}: `{v}`")
    if skipped:
        for name, why in skipped.items():
            L.append(f"- **{name} skipped**: {why.splitlines()[0]}")
    L.append("")
    groups = []
    if any(s in systems for s in ("nginx-equal", "haproxy-equal")):
        groups.append(("Equal work: nginx and HAProxy doing the sidecar's per-request work",
                       ["sidecar", "pingora-minimal", "nginx-equal", "haproxy-equal"]))
    if any(s in systems for s in ("nginx", "haproxy")):
        groups.append(("Cheapest configurations of nginx and HAProxy",
                       ["sidecar", "pingora-minimal", "nginx", "haproxy"]))
    if not groups:
        groups.append(("The sidecar alone", ["sidecar", "pingora-minimal"]))
    for title, members in groups:
        members = [m for m in members if m in systems]
        L.append(f"## {title}")
        L.append("")
        load_tables(L, members, args, results)
        fixed_rate_table(L, members, args, fixed)
    memory_table(L, systems, args, idle, never, fresh, startup_rss, startup_pss)
    targets_table(L, args, results, idle, fresh, fixed, startup_rss)
    if args.attempts:
        L.append(Path(args.attempts).read_text().rstrip())
        L.append("")
    L.append("## How to read this")
    L.append("")
    L.append("- **proxy CPU µs/req**: utime+stime of the proxy's own processes (nginx master + "
             "worker, the haproxy process, the sidecar process with all its threads) from "
             "`/proc/<pid>/stat` over the wrk run, divided by the requests wrk completed. The most "
             "stable figure on a small shared box.")
    L.append("- **peak RSS**: VmHWM summed over the proxy's processes, reset before each run "
             "(`/proc/<pid>/clear_refs` = 5, i.e. to the RSS the process already holds, including "
             "memory kept from the warm-up and earlier runs), read after it. **idle RSS**: VmRSS after start-up and "
             "one check request, before any load. **RSS with conns**: with the app connections held "
             "open; never-used and served (fresh) once per system right after start-up, before the "
             "warm-up; served (after load) after all load rounds (once per round count, "
             "alternating). VmRSS summed over nginx's master + worker counts "
             "their shared pages twice; **PSS** (`/proc/<pid>/smaps_rollup`) splits them and is the "
             "fairer memory figure for nginx.")
    L.append("- **upstream conns / 1k req**: new TLS connections the upstream nginx accepted during "
             "the run (one access-log line per connection whose `$connection_requests` is 1), per "
             "1,000 requests; the same method for all three. 0 = every request reused a pooled "
             "connection; the pool is warm from the check request and earlier runs.")
    L.append("- At 256 connections a proxy whose idle pool is smaller than the concurrency keeps "
             "opening (and handshaking) upstream connections: nginx's `keepalive 64` caches at most "
             "64 idle upstream connections per worker, the sidecar's `upstream.pool_size` defaults "
             "to 512; HAProxy (`http-reuse always`, `pool-max-conn` unlimited by default) keeps "
             "nearly all of them. Those TLS handshakes cost the "
             "proxy and the upstream CPU and show in the latency tail.")
    L.append("- **spread**: (max − min) / median over the rounds; large spreads mean the 2 shared "
             "cores were noisy.")
    if args.work in ("equal", "both"):
        L.append("- Equal work: nginx and HAProxy set the sidecar's header set (session, fresh "
                 "request/activity ids, compliance headers), strip app credentials, echo the "
                 "request id and write one JSON access line per request. The sidecar still does "
                 "more: policy checks, tenant and session lookup, path canonicalisation, metrics. "
                 "They cannot log in or refresh a session.")
    else:
        L.append("- The sidecar does more per request than nginx/HAProxy here: policy checks, "
                 "tenant and session lookup, ~15 generated headers (request/activity ids, "
                 "idempotency keys…), one JSON audit line per request, metrics. nginx and HAProxy "
                 "only set two static headers and write no access log (`--work equal` makes "
                 "them do the sidecar's work). They cannot log in or refresh a session.")
    L.append("- **fixed rate**: oha offers the rate with `--latency-correction` (a request "
             "that could not be sent on time counts from when it should have been), so a stall "
             "shows in the tail instead of lowering the rate; the rate is one all three sustain.")
    L.append("- Raw per-round figures: the CSV under `benches/e2e/results/`.")
    L.append("")
    return "\n".join(L)


CSV_FIELDS = ["system", "connections", "round", "requests", "errors", "non2xx", "rps", "p50_ms",
              "p90_ms", "p99_ms", "p999_ms", "max_ms", "cpu_s", "cpu_us_per_req",
              "upstream_cpu_us_per_req", "rss_before_kb", "peak_rss_kb", "upstream_new_conns",
              "upstream_conns_per_1k", "sidecar_metric_new_conns", "pss_kb", "wall_s", "wrk_cpu_s",
              "other_cpu_pct", "steal_pct", "rate"]


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", default="32,256",
                    type=lambda s: [int(x) for x in s.split(",") if x.strip()])
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    type=lambda s: [x.strip() for x in s.split(",") if x.strip()])
    ap.add_argument("--binary", default=str(REPO / "target/release/finhub-sidecar"),
                    help="sidecar binary (copied to the temp dir before the run)")
    ap.add_argument("--minimal-binary", default=str(REPO / "target/release/examples/pingora_minimal"),
                    help="the framework floor (cargo build --release --example pingora_minimal)")
    ap.add_argument("--pin", choices=("on", "off"), default="on",
                    help="on: proxies on CPU 0, wrk and the upstream on CPU 1 (default)")
    ap.add_argument("--idle-conns", type=int, default=1000,
                    help="app connections held open for the memory table (0 = none)")
    ap.add_argument("--baseline-idle-mb", type=float, default=None,
                    help="the sidecar's idle RSS (MB) to be no worse than, a target row (optional)")
    ap.add_argument("--fixed-rate", type=int, default=10000,
                    help="req/s offered by oha per fixed-rate run (0 = none)")
    ap.add_argument("--attempts", default=None,
                    help="markdown file with the levers tried (included in the report as is)")
    ap.add_argument("--work", choices=("cheapest", "equal", "both"), default="both",
                    help="what nginx/HAProxy do per request: 'cheapest' (two static headers, no "
                         "log) or 'equal' (the sidecar's header set with fresh ids, the request id "
                         "echoed, one JSON access line per request)")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load per system first")
    ap.add_argument("--md", default=str(REPO / "BENCHMARKS.md"), help="report path ('' = don't write)")
    ap.add_argument("--csv", default=None, help="CSV path (default benches/e2e/results/<date>.csv)")
    ap.add_argument("--note", default="The sidecar as built from this commit (`cargo build --release`).")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown systems {bad}; choose from {SYSTEMS}")
    return args


def preflight(args) -> None:
    missing = [t for t in ("openssl", "nginx", "wrk") if shutil.which(t) is None]
    if "haproxy" in args.systems and shutil.which("haproxy") is None:
        missing.append("haproxy")
    if args.fixed_rate > 0 and shutil.which("oha") is None:
        missing.append("oha (cargo install oha --locked, or --fixed-rate 0)")
    if args.pin == "on" and shutil.which("taskset") is None:
        missing.append("taskset (util-linux)")
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)}\n"
                 f"install: apt-get install -y nginx haproxy wrk openssl")
    if "pingora-minimal" in args.systems and not os.access(args.minimal_binary, os.X_OK):
        sys.exit(f"floor binary not found: {args.minimal_binary} "
                 "(cargo build --release --example pingora_minimal)")
    if "sidecar" in args.systems and not os.access(args.binary, os.X_OK):
        sys.exit(f"sidecar binary not found: {args.binary} (cargo build --release)")
    if args.pin == "on" and (os.cpu_count() or 1) < 2:
        log("only one CPU: pinning disabled")
        args.pin = "off"


def main(argv=None) -> int:
    args = parse_args(argv)
    preflight(args)
    cmdline = "python3 benches/e2e/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the children

    proxy_cpu = "0" if args.pin == "on" else None
    load_cpu = "1" if args.pin == "on" else None
    pin_desc = ("proxies `taskset -c 0`; wrk and the upstream nginx `taskset -c 1`"
                if args.pin == "on" else "none (all processes float over all CPUs)")
    user_line = "user root;" if os.geteuid() == 0 else ""

    sup = Supervisor()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="finhub-bench-"))
    tmp.chmod(0o755)
    log(f"temp dir {tmp}")
    results: dict[tuple[str, int], list[dict]] = {}
    idle: dict[str, list[dict]] = {}  # after all load rounds, one per round
    never: dict[str, dict] = {}  # fresh process, connections that never sent a request
    fresh: dict[str, dict] = {}  # fresh process, connections that each served one request
    fixed: dict[str, list[dict]] = {}
    startup_rss: dict[str, int] = {}
    startup_pss: dict[str, int] = {}
    skipped: dict[str, str] = {}
    csv_rows: list[dict] = []
    try:
        binary = tmp / "finhub-sidecar"
        if "sidecar" in args.systems:
            shutil.copy2(args.binary, binary)  # a rebuild during the run cannot change it
        minimal = tmp / "pingora_minimal"
        if "pingora-minimal" in args.systems:
            shutil.copy2(args.minimal_binary, minimal)  # likewise
        versions = {
            "finhub-sidecar": version_of([str(binary), "--version"]) if "sidecar" in args.systems else "not run",
            "nginx": version_of(["nginx", "-v"]),
            "haproxy": version_of(["haproxy", "-v"]),
            "wrk": version_of(["wrk", "-v"]),
            "oha": version_of(["oha", "--version"]) if args.fixed_rate > 0 else "not run",
            "openssl": version_of(["openssl", "version"]),
        }
        machine = machine_info()
        gen_pki(tmp)
        jwt = make_jwt()
        up_port, upstream = start_upstream(sup, tmp, jwt, load_cpu, user_line)
        log(f"upstream nginx (mTLS) on 127.0.0.1:{up_port}")

        systems: dict[str, System] = {}
        starters = {"sidecar": lambda: start_sidecar(sup, tmp, binary, up_port, proxy_cpu),
                    "pingora-minimal": lambda: start_minimal(sup, tmp, minimal, up_port,
                                                             proxy_cpu)}
        modes = ("equal", "cheapest") if args.work == "both" else (args.work,)
        for mode in modes:
            starters[variant("nginx", mode)] = (
                lambda mode=mode: start_nginx_proxy(sup, tmp, up_port, jwt, proxy_cpu, user_line, mode))
            starters[variant("haproxy", mode)] = (
                lambda mode=mode: start_haproxy(sup, tmp, up_port, jwt, proxy_cpu, mode))
        wanted = [n for n in starters
                  if (n if n == "pingora-minimal" else n.split("-")[0]) in args.systems]
        for name in wanted:
            try:
                s = starters[name]()
                check_through(s)
            except (SkipSystem, RuntimeError, OSError, subprocess.CalledProcessError) as e:
                log(f"SKIPPING {name}: {e}")
                skipped[name] = str(e)
                for p in list(sup.procs):
                    if p.name == name:
                        sup.stop(p)
                continue
            time.sleep(0.5)
            startup_rss[name] = status_kb(s.proc.pids(), "VmRSS")
            startup_pss[name] = pss_kb(s.proc.pids())
            systems[name] = s
            log(f"{name} on 127.0.0.1:{s.port}: check request 200, idle RSS "
                f"{startup_rss[name] / 1024:.1f} MB (PSS {startup_pss[name] / 1024:.1f} MB)")
            if args.idle_conns > 0:
                # In a fresh process, before the warm-up: (a) connections that never send a
                # request, then (b) connections that each served one request.
                rss, pss, failed, age = never_used_conns_rss(s, args.idle_conns)
                never[name] = {"rss_kb": rss, "pss_kb": pss, "failed": failed}
                csv_rows.append({"system": name, "connections": f"never{args.idle_conns}",
                                 "round": 1, "rss_before_kb": rss, "pss_kb": pss, "errors": failed,
                                 "wall_s": age})
                log(f"{name}: RSS with {args.idle_conns} never-used conns {rss / 1024:.1f} MB "
                    f"(PSS {pss / 1024:.1f} MB, failed {failed}, read {age:.1f} s after the "
                    f"first connect)")
                time.sleep(0.5)
                rss, pss, failed = idle_conns_rss(s, args.idle_conns)
                fresh[name] = {"rss_kb": rss, "pss_kb": pss, "failed": failed}
                csv_rows.append({"system": name, "connections": f"served{args.idle_conns}-fresh",
                                 "round": 1, "rss_before_kb": rss, "pss_kb": pss, "errors": failed})
                log(f"{name}: RSS with {args.idle_conns} conns that served one request (fresh) "
                    f"{rss / 1024:.1f} MB (PSS {pss / 1024:.1f} MB, failed {failed})")
        if not systems:
            raise RuntimeError("no system could be started")

        if args.warmup > 0:
            for name, s in systems.items():
                cmd = ["wrk", "-t1", f"-c{max(args.connections)}", f"-d{args.warmup}s",
                       f"http://127.0.0.1:{s.port}{PAGE_PATH}"]
                if load_cpu:
                    cmd = ["taskset", "-c", load_cpu, *cmd]
                subprocess.run(cmd, capture_output=True, timeout=args.warmup + 30)
            log(f"warm-up done ({args.warmup} s each)")

        total = args.rounds * len(args.connections) * len(systems)
        n = 0
        for rnd in range(1, args.rounds + 1):
            for conns in args.connections:
                for name, s in systems.items():
                    n += 1
                    if s.proc.popen.poll() is not None:
                        raise RuntimeError(f"{name} exited ({s.proc.popen.returncode}):\n{tail(s.proc.logfile)}")
                    row = run_wrk(s, conns, args.duration, load_cpu, tmp, upstream)
                    results.setdefault((name, conns), []).append(row)
                    csv_rows.append({"system": name, "connections": conns, "round": rnd, **row})
                    log(f"[{n}/{total}] round {rnd} c={conns} {name:8s} {row['rps']:9.0f} req/s "
                        f"p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} p99.9 {row['p999_ms']:.2f} ms "
                        f"cpu {row['cpu_us_per_req']:.1f} µs/req peak {row['peak_rss_kb'] / 1024:.1f} MB "
                        f"upconn/1k {row['upstream_conns_per_1k']:.3f} err {row['errors']} "
                        f"other {row['other_cpu_pct']:.0f}% steal {row['steal_pct']:.0f}%"
                        + (f" (sidecar metric new conns {row['sidecar_metric_new_conns']:.0f})"
                           if row["sidecar_metric_new_conns"] != "" else ""))
        # Latency at a fixed rate every system sustains (after the saturating runs, alternating).
        if args.fixed_rate > 0:
            for rnd in range(1, args.rounds + 1):
                for name, s in systems.items():
                    row = run_fixed_rate(s, args.fixed_rate, FIXED_RATE_CONNS, args.duration, load_cpu)
                    fixed.setdefault(name, []).append(row)
                    csv_rows.append({"system": name, "connections": f"rate{args.fixed_rate}",
                                     "round": rnd, **row})
                    log(f"round {rnd} {name:14s} fixed {args.fixed_rate} req/s: {row['rps']:.0f} req/s "
                        f"p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} p99.9 {row['p999_ms']:.2f} ms "
                        f"cpu {row['cpu_us_per_req']:.1f} µs/req err {row['errors']}")
        # The idle-connection test runs after all load rounds (same count of rounds, alternating)
        # so the memory it leaves behind cannot inflate the load runs' peak RSS.
        for rnd in range(1, args.rounds + 1):
            if args.idle_conns > 0:
                for name, s in systems.items():
                    rss, pss, failed = idle_conns_rss(s, args.idle_conns)
                    idle.setdefault(name, []).append({"rss_kb": rss, "pss_kb": pss, "failed": failed})
                    csv_rows.append({"system": name, "connections": f"idle{args.idle_conns}",
                                     "round": rnd, "rss_before_kb": rss, "pss_kb": pss,
                                     "errors": failed})
                    log(f"round {rnd} {name:8s} RSS with {args.idle_conns} conns that served one "
                        f"request (after load) "
                        f"{rss / 1024:.1f} MB (PSS {pss / 1024:.1f} MB, failed {failed})")

        report = build_report(args, results, idle, never, fresh, fixed, startup_rss, startup_pss,
                              skipped, versions, machine, started, cmdline, pin_desc)
        print()
        print(report)
        if args.md:
            Path(args.md).write_text(report)
            log(f"wrote {args.md}")
        csv_path = Path(args.csv) if args.csv else (
            HERE / "results" / f"{started.replace(' ', 'T').replace(':', '')}Z.csv")
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in csv_rows:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
        log(f"wrote {csv_path}")
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        sup.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
