#!/usr/bin/env python3
"""Instructions per request of sidecar binaries, counted by callgrind: an A/B that a busy box cannot skew.

Wall-clock CPU per request (run.py) moves by 5-10 % when anything else runs on a 2-core box.
Callgrind counts the instructions the sidecar executes, which do not depend on what else runs.
For each binary this starts run.py's mTLS upstream and the sidecar under
`valgrind --tool=callgrind --instr-atstart=no`, warms it up, switches collection on, sends
`--requests` keep-alive requests over `--connections` connections (the same request wrk sends
in run.py), switches collection off and reports instructions per request. Binaries alternate
over `--rounds`; the report gives each round and the median.

Beside instructions it reports allocations per request: the calls into the allocator's entry
points (malloc, calloc, realloc, posix_memalign/memalign/aligned_alloc; free separately) in the
same callgrind dump, each counted once at the call from outside the allocator (glibc's memalign
calling malloc is not a second allocation). A tail call is seen by callgrind as a call from the
caller's caller, so glibc's realloc(NULL, n), which jumps to malloc, counts twice (Rust's
allocator never calls realloc with NULL).

    python3 benches/e2e/icount.py --binary A=/tmp/a/finhub-sidecar --binary B=target/release/finhub-sidecar

`--env NAME:KEY=VALUE` sets an environment variable for binary NAME only (repeat). The value
`{otlp}` is replaced by the address of an OTLP/HTTP sink the script runs (it answers every
export 200 and counts bytes), so tracing can be measured on, e.g.
`--binary off=B --binary on=B --env on:OTEL_EXPORTER_OTLP_ENDPOINT={otlp}`.

Instruction counts are not time (a cache miss costs no instructions), so a lever that only
changes memory layout needs run.py on a quiet box; one that removes work shows here exactly.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (the harness's PKI, upstream and sidecar starters)


def request_bytes(port: int) -> bytes:
    return (f"GET {run.PAGE_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode()


def drive(port: int, n: int, errors: list[str]) -> None:
    """n sequential keep-alive requests on one connection; each answer read to its end."""
    req = request_bytes(port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            for _ in range(n):
                s.sendall(req)
                run.recv_response(s)
    except OSError as e:
        errors.append(str(e))


def load(port: int, total: int, conns: int) -> None:
    errors: list[str] = []
    per = total // conns
    threads = [threading.Thread(target=drive, args=(port, per, errors)) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"load failed: {errors[0]}")


# The allocator's entry points, by the name callgrind gives them (glibc's `malloc` may also be
# named `__libc_malloc`; an LD_PRELOADed jemalloc/mimalloc/tcmalloc may show its own prefix).
ALLOC_FNS = ("malloc", "calloc", "realloc", "reallocarray", "posix_memalign", "memalign",
             "aligned_alloc", "valloc", "pvalloc")
FREE_FNS = ("free", "cfree")
ENTRY_PREFIXES = ("__libc_", "__", "je_", "mi_", "tc_")
# Functions inside an allocator: calls they make to an entry point (glibc's realloc(NULL, n) and
# memalign with a small alignment call malloc; realloc(p, 0) calls free) are part of the outer
# call, already counted, and are not counted again.
ALLOC_INTERNAL = re.compile(r"^(_int_\w+|_mid_memalign|tcache_\w+|sysmalloc\w*|ptmalloc_\w+"
                            r"|malloc_\w+|__malloc_\w+|_?mi_\w+|je_\w+|tc_\w+)$")


def plain_name(name: str) -> str:
    """A function name without callgrind's recursion suffix (`malloc'2`), a symbol version
    (`malloc@@GLIBC_2.2.5`) or a compiler clone suffix (`_mid_memalign.constprop.0`)."""
    name = re.sub(r"'\d+$", "", name).split("@", 1)[0]
    return re.sub(r"\.(constprop|part|isra|cold|lto_priv)(\.\d+)*.*$", "", name)


def alloc_entry(name: str) -> str | None:
    """`malloc`, `free`, … when `name` is an allocator entry point, else None. A PLT stub
    (`malloc@plt`) is not the entry point (what it jumps to is)."""
    if "@plt" in name:
        return None
    base = plain_name(name)
    if base in ALLOC_FNS or base in FREE_FNS:
        return base
    for p in ENTRY_PREFIXES:
        if base.startswith(p) and (base[len(p):] in ALLOC_FNS or base[len(p):] in FREE_FNS):
            return base[len(p):]
    return None


def alloc_calls(path: Path) -> dict[str, int]:
    """Calls into each allocator entry point recorded in one callgrind out file.

    Function names are compressed: `fn=(id) name` / `cfn=(id) name` defines an id the first time
    (fn= and cfn= share the ids), `fn=(id)` / `cfn=(id)` refers to it later. A `calls=N target`
    line follows a `cfn=` line and says the current `fn=` called that function N times. A call
    from inside the allocator (an entry point or one of its internals) is not counted, so each
    allocation counts once, at the call from outside."""
    names: dict[str, str] = {}

    def resolve(spec: str) -> str:
        spec = spec.strip()
        if spec.startswith("("):
            ident, _, name = spec[1:].partition(")")
            name = name.strip()
            if name:
                names[ident] = name
            return names.get(ident, f"({ident})")
        return spec

    counts: dict[str, int] = {}
    caller = ""
    caller_inside = False
    callee: str | None = None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                caller = resolve(line[3:])
                caller_inside = alloc_entry(caller) is not None or bool(
                    ALLOC_INTERNAL.match(plain_name(caller)))
                callee = None
            elif line.startswith("cfn="):
                callee = alloc_entry(resolve(line[4:]))
            elif line.startswith("calls="):
                if callee and not caller_inside:
                    counts[callee] = counts.get(callee, 0) + int(line[6:].split()[0])
                callee = None
    return counts


def callgrind_control(*args: str) -> str:
    return subprocess.run(["callgrind_control", *args], capture_output=True, text=True, check=True).stdout


class OtlpSink:
    """An OTLP/HTTP receiver that accepts every export (200) and counts the bytes."""

    def __init__(self) -> None:
        import http.server

        sink = self
        self.bytes = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                n = int(self.headers.get("Content-Length") or 0)
                sink.bytes += len(self.rfile.read(n))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@dataclass
class Count:
    """Per request: instructions, and calls into each allocator entry point."""
    instructions: float
    calls: dict[str, float]

    @property
    def allocs(self) -> float:
        return sum(v for k, v in self.calls.items() if k in ALLOC_FNS)

    @property
    def frees(self) -> float:
        return sum(v for k, v in self.calls.items() if k in FREE_FNS)

    def alloc_detail(self) -> str:
        order = [k for k in ALLOC_FNS if self.calls.get(k)]
        return ", ".join(f"{k} {self.calls[k]:.1f}" for k in order) or "none"


def measure(binary: Path, tmp: Path, up_port: int, requests: int, conns: int, preload: str,
            extra_env: dict[str, str] | None = None) -> Count:
    sup = run.Supervisor()
    out = tmp / f"callgrind.{binary.parent.name}.{time.monotonic_ns()}"
    wrapper = tmp / "valgrind-sidecar"
    pairs = ([f"LD_PRELOAD={preload}"] if preload else []) + [
        f"{k}={v}" for k, v in (extra_env or {}).items()]
    env = f"env {' '.join(pairs)} " if pairs else ""
    wrapper.write_text(f"#!/bin/sh\nexec {env}valgrind --tool=callgrind --instr-atstart=no "
                       f"--callgrind-out-file={out}.%p {binary} \"$@\"\n")
    wrapper.chmod(0o755)
    try:
        start = run.start_minimal if binary.name == "pingora_minimal" else run.start_sidecar
        s = start(sup, tmp, wrapper, up_port, None)
        load(s.port, max(conns * 20, requests // 10), conns)  # warm: pool, allocator, caches
        pid = s.proc.popen.pid
        callgrind_control("-i", "on", str(pid))
        load(s.port, requests, conns)
        callgrind_control("-i", "off", str(pid))
        callgrind_control("-d", str(pid))
    finally:
        sup.stop_all()
    total = 0
    calls: dict[str, int] = {}
    for f in tmp.glob(f"{out.name}.*"):
        here = 0
        for line in f.read_text(errors="replace").splitlines():
            m = re.match(r"^(?:summary|totals):\s+(\d+)", line)
            if m:
                here = max(here, int(m.group(1)))
        if here > total:  # the dump taken with collection on (the file at exit holds ~nothing)
            total, calls = here, alloc_calls(f)
        if not os.environ.get("ICOUNT_KEEP"):
            f.unlink()
    done = (requests // conns) * conns
    return Count(total / done, {k: v / done for k, v in calls.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append", required=True,
                    help="NAME=PATH or NAME=PATH@LIB (LIB is LD_PRELOADed, e.g. another malloc); "
                         "NAME=minimal:PATH for examples/pingora_minimal; repeat")
    ap.add_argument("--env", action="append", default=[],
                    help="NAME:KEY=VALUE, an environment variable for binary NAME ({otlp}: the sink)")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "nginx", "openssl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="finhub-icount-"))
    tmp.chmod(0o755)
    bins = {}
    for spec in args.binary:
        name, _, path = spec.partition("=")
        path, _, preload = path.partition("@")
        d = tmp / name
        d.mkdir()
        # `minimal:PATH` is examples/pingora_minimal.rs (the framework floor), started as run.py
        # starts it; anything else is a sidecar binary.
        minimal = path.startswith("minimal:")
        path = path.removeprefix("minimal:")
        copy = d / ("pingora_minimal" if minimal else "finhub-sidecar")
        shutil.copy2(path, copy)  # a rebuild during the run cannot change it
        bins[name] = (copy, preload)
    sink = OtlpSink()
    envs: dict[str, dict[str, str]] = {n: {} for n in bins}
    for spec in args.env:
        name, _, kv = spec.partition(":")
        key, _, value = kv.partition("=")
        if name not in envs:
            raise SystemExit(f"--env {spec}: no binary named {name}")
        envs[name][key] = value.replace("{otlp}", sink.url)
    sup = run.Supervisor()
    results: dict[str, list[Count]] = {n: [] for n in bins}
    try:
        run.gen_pki(tmp)
        user_line = "user root;" if os.geteuid() == 0 else ""
        up_port, _ = run.start_upstream(sup, tmp, run.make_jwt(), None, user_line)
        for r in range(args.rounds):
            for name, (b, preload) in bins.items():
                v = measure(b, tmp, up_port, args.requests, args.connections, preload, envs[name])
                results[name].append(v)
                print(f"round {r + 1} {name}: {v.instructions:,.0f} instructions/request, "
                      f"{v.allocs:.1f} allocations/request ({v.alloc_detail()}), "
                      f"{v.frees:.1f} frees/request", flush=True)
    finally:
        sup.stop_all()
        if not os.environ.get("ICOUNT_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    if sink.bytes:
        print(f"OTLP sink received {sink.bytes:,} bytes")
    base = None
    for name, vals in results.items():
        if not vals:
            continue
        m = statistics.median(v.instructions for v in vals)
        a = statistics.median(v.allocs for v in vals)
        fr = statistics.median(v.frees for v in vals)
        rel = "" if base is None else (
            f" ({(m / base[0] - 1) * 100:+.1f} % instructions, "
            f"{a - base[1]:+.1f} allocations vs {next(iter(results))})")
        base = base or (m, a)
        print(f"{name}: median {m:,.0f} instructions/request, {a:.1f} allocations/request, "
              f"{fr:.1f} frees/request over {len(vals)} rounds{rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
