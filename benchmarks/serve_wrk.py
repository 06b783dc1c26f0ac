"""`ldot serve` under wrk: the path a new user takes, from `ldot index --images` to a load test.

1. `ldot index --out IDX --images DIR` over the first `--count` Flickr8k val images (DIR: a
   folder of symlinks to them), timed as one command: process start, model load, reading and
   encoding the images, writing the index. images/s = count / those seconds.
2. `ldot serve IDX --no-access-log` in its own process (re-ranker "auto", the default: the
   shipped one), on a free port of 127.0.0.1.
3. ~200 sequential GET /search requests from urllib (a new connection each), one at a time:
   the client's wall time per request against the server's own `timing_ms`, so that what is
   spent outside the model (HTTP, validation, JSON, metrics, queueing) shows.
4. wrk (a C load generator, so the client takes little of the CPU the server needs; one client
   thread) in a closed loop: each connection sends its next request when the last is answered,
   cycling through 500 real val captions, k = 10; plain search at each `--connections`, then
   re-ranking the top 16 at each `--rerank-connections`, each after a short warm-up.
   Latencies and counts are wrk's (`--latency`); errors are wrk's non-2xx answers plus its
   socket errors (connect, read, write, timeout past `--timeout`). The mean text batch the
   server encoded per row comes from /metrics, and so does how many queries it answered after
   wrk stopped waiting (wrk drops the requests in flight when a run ends); after each run one
   more query waits for that backlog to clear, so that the next row starts on an idle server.

5. The server's settings (`--settings`, each a set of `ldot serve` flags: the micro-batcher's
   largest batch, the model's threads): each on a fresh server, plain search at
   `--settings-connections`, so that the defaults are chosen by measurement.

An index built by `ldot index --images` keeps its images' region states, so re-ranking reads
no image file; `--workdir DIR` keeps the links, the index and the logs.

    python benchmarks/serve_wrk.py [--count 1000] [--seconds 15] [--connections 1 8 32]
        [--rerank-connections 1 8 32] [--no-rerank] [--runtime NAME] [--index IDX]
        [--settings "--max-batch 16" ...] [--workdir DIR] [--no-write] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import re
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
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from report import commit, machine, speed_probe, table, write_section

from lightningdot.runtime import cache_dir

ROOT = Path(__file__).resolve().parent.parent
LDOT = Path(sys.executable).parent / "ldot"

# Called once per run (one wrk thread); wrk's own numbers, exact, to check the parsed text.
LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"mean_us": %f, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class WrkResult:
    """One wrk run, parsed from its text output (latencies in ms)."""

    requests: int
    qps: float
    p50: float
    p99: float
    non2xx: int
    socket_errors: dict[str, int]
    exact: dict  # the `done()` line: wrk's own counters, unrounded
    raw: str

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())


# ---------------------------------------------------------------- data and index


def val_split(data: Path) -> list[dict]:
    images = json.loads((data / "dataset_flickr8k.json").read_text())["images"]
    return [im for im in images if im["split"] == "val"]


def pick_captions(val: list[dict], n: int, seed: int = 0) -> list[str]:
    """`n` different val captions in a fixed random order."""
    captions = sorted({s["raw"].strip() for im in val for s in im["sentences"]} - {""})
    order = np.random.default_rng(seed).permutation(len(captions))
    return [captions[i] for i in order[:n]]


def link_images(val: list[dict], data: Path, count: int, folder: Path) -> None:
    """A folder of symlinks to the first `count` val images, as a user's photo folder."""
    if count > len(val):
        raise SystemExit(f"--count {count}: the val split has {len(val)} images")
    folder.mkdir(parents=True)
    for im in val[:count]:
        (folder / im["filename"]).symlink_to((data / "images" / im["filename"]).resolve())


def runtime_flag(runtime: str | None) -> list[str]:
    return ["--runtime", runtime] if runtime else []


def build_index(images: Path, out: Path, runtime: str | None, verbose: bool) -> float:
    """`ldot index --out OUT --images IMAGES`, timed (wall seconds of the whole command)."""
    cmd = [str(LDOT), "index", "--out", str(out), "--images", str(images), *runtime_flag(runtime)]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"ldot index failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    if verbose:
        print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
    return seconds


# ---------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    index: Path,
    port: int,
    runtime: str | None,
    log: Path,
    wait_s: float = 180,
    flags: list[str] | None = None,
) -> subprocess.Popen:
    """`ldot serve` (with `flags`) in a subprocess, once GET /healthz answers 200 (its output
    goes to `log`)."""
    cmd = [str(LDOT), "serve", str(index), "--port", str(port), "--no-access-log"]
    cmd += runtime_flag(runtime) + (flags or [])
    print("$", shlex.join(cmd), flush=True)
    with log.open("w") as out:  # a file, not a pipe: nobody reads it while it serves
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ldot serve exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.25)
    stop_server(proc)
    raise SystemExit(f"ldot serve did not answer /healthz within {wait_s:g} s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen, wait_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `wait_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def search_path(caption: str, rerank: int = 0) -> str:
    params = {"q": caption, "k": 10, **({"rerank": rerank} if rerank else {})}
    return "/search?" + urllib.parse.urlencode(params)


def get(url: str, timeout: float = 60) -> tuple[float, int, bytes]:
    """(client wall ms, status, body) of one GET on a new connection."""
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    return 1e3 * (time.perf_counter() - t0), status, body


def scrape(base: str) -> dict[str, float]:
    """Every sample of /metrics, by name with its labels (as Prometheus writes them)."""
    text = get(base + "/metrics")[2].decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^([^#\s]\S*)\s+(\S+)$", text, re.M)}


def answered(metrics: dict[str, float]) -> float:
    """GET /search requests the server has finished, any status."""
    return sum(
        v
        for k, v in metrics.items()
        if k.startswith("ldot_requests_total{") and 'route="/search"' in k
    )


def delta_mean(before: dict, after: dict, stem: str, labels: str = "") -> float:
    """Mean of a histogram over the observations between two scrapes (nan when none)."""
    s = after.get(f"{stem}_sum{labels}", 0.0) - before.get(f"{stem}_sum{labels}", 0.0)
    c = after.get(f"{stem}_count{labels}", 0.0) - before.get(f"{stem}_count{labels}", 0.0)
    return s / c if c else float("nan")


def stage_ms(before: dict, after: dict, stage: str) -> float:
    labels = f'{{route="/search",stage="{stage}"}}'
    return 1e3 * delta_mean(before, after, "ldot_stage_seconds", labels)


# ---------------------------------------------------------------- sequential overhead


def sequential(base: str, captions: list[str], warmup: int = 10) -> dict[str, float]:
    """Medians over one-at-a-time requests: client wall, server total, model, overhead."""
    for c in captions[:warmup]:
        get(base + search_path(c))
    rows, failed = [], 0
    for c in captions:
        wall, status, body = get(base + search_path(c))
        if status != 200:
            failed += 1
            continue
        t = json.loads(body)["timing_ms"]
        model = t.get("encode", 0.0) + t.get("search", 0.0)
        rows.append((wall, t["total"], model, t.get("queue", 0.0), wall - model))
    if not rows:
        raise SystemExit(f"all {len(captions)} sequential requests failed")
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    names = ("wall", "total", "model", "queue", "overhead")
    return {**dict(zip(names, med, strict=True)), "n": len(rows), "failed": failed}


def sequential_rerank(base: str, captions: list[str]) -> dict[str, float]:
    """Medians over one-at-a-time re-ranked requests (top 16): client wall, `rerank` stage."""
    walls, stages = [], []
    for c in captions:
        wall, status, body = get(base + search_path(c, 16), 600)
        if status == 200:
            walls.append(wall)
            stages.append(json.loads(body)["timing_ms"].get("rerank", float("nan")))
    if not walls:
        return {}
    return {
        "rerank_n": len(walls),
        "rerank_wall": statistics.median(walls),
        "rerank_ms": statistics.median(stages),
    }


# ---------------------------------------------------------------- wrk


def write_lua(path: Path, paths: list[str]) -> None:
    """A wrk script cycling through `paths` (URL-encoded, so safe in a Lua string)."""
    table_ = ",\n".join(f'  "{p}"' for p in paths)
    path.write_text(
        f"local paths = {{\n{table_}\n}}\nlocal i = 0\n"
        "request = function()\n  i = i % #paths + 1\n  return wrk.format('GET', paths[i])\nend\n"
        + LUA_DONE
    )


def to_ms(value: str, unit: str) -> float:
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
    return float(value) * scale[unit]


def parse_wrk(raw: str) -> WrkResult:
    """Requests/s, p50, p99, total requests, socket errors and non-2xx from `wrk --latency`."""

    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", raw, re.M)
        if m is None:
            raise ValueError(f"no {pct}% line in wrk's output:\n{raw}")
        return to_ms(*m.groups())

    requests = re.search(r"^\s+(\d+) requests in ", raw, re.M)
    qps = re.search(r"^Requests/sec:\s+([\d.]+)", raw, re.M)
    if requests is None or qps is None:
        raise ValueError(f"unexpected wrk output:\n{raw}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", raw)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", raw)
    exact = re.search(r"^WRKJSON (.*)$", raw, re.M)
    kinds = ("connect", "read", "write", "timeout")
    return WrkResult(
        requests=int(requests.group(1)),
        qps=float(qps.group(1)),
        p50=latency("50"),
        p99=latency("99"),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=dict(zip(kinds, map(int, sock.groups()), strict=True))
        if sock
        else dict.fromkeys(kinds, 0),
        exact=json.loads(exact.group(1)) if exact else {},
        raw=raw,
    )


def check_parse(r: WrkResult) -> None:
    """The parsed text agrees with wrk's own counters from `done()` (rounding aside)."""
    e = r.exact
    if not e:
        return
    counts = {k: r.socket_errors[k] for k in ("connect", "read", "write", "timeout")}
    assert r.requests == e["requests"], (r.requests, e)
    assert counts == {k: e[k] for k in counts}, (counts, e)
    assert r.non2xx == e["status"], (r.non2xx, e)
    for ms, us in ((r.p50, e["p50_us"]), (r.p99, e["p99_us"])):
        assert abs(ms - us / 1e3) <= max(0.01 * ms, 0.01), (r.p50, r.p99, e)


def run_wrk(url: str, lua: Path, connections: int, seconds: float, timeout: float) -> WrkResult:
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s"]
    cmd += ["--timeout", f"{timeout:g}s", "--latency", "-s", str(lua), url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout + 60)
    if done.returncode != 0:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    result = parse_wrk(done.stdout)
    check_parse(result)
    if result.exact:  # the same percentiles, unrounded (the text keeps 3 digits: "1.62s")
        result.p50, result.p99 = result.exact["p50_us"] / 1e3, result.exact["p99_us"] / 1e3
    return result


def measure(
    args: argparse.Namespace, base: str, probe: str, label: str, lua: Path, conns: list[int]
) -> tuple[list[list[str]], dict]:
    """A warm-up, then one wrk run per connection count: the table's rows for one setting, and
    the 1-connection run with the server's own means over it (empty without one)."""
    run_wrk(base, lua, args.warmup_connections, args.warmup, args.timeout)
    drain(base, probe)
    rows, one = [], {}
    for n in conns:
        before = scrape(base)
        r = run_wrk(base, lua, n, args.seconds, args.timeout)
        backlog = drain(base, probe)
        after = scrape(base)
        batch = delta_mean(before, after, "ldot_text_batch_size")
        cut = int(answered(after) - answered(before)) - r.requests - 1  # 1: the drain probe
        if args.verbose:
            print(f"--- wrk, {label}, {n} connection(s)\n{r.raw}", flush=True)
        if n == 1:
            one = {
                "wrk": r,
                "total": stage_ms(before, after, "total"),
                "model": model_ms(before, after),
            }
        rows.append(row(label, n, r, batch, backlog, cut))
        print(" | ".join(rows[-1]), flush=True)
    return rows, one


def model_ms(before: dict, after: dict) -> float:
    return stage_ms(before, after, "encode") + stage_ms(before, after, "search")


def drain(base: str, probe: str, timeout: float = 600) -> float:
    """Seconds until the server has answered what wrk left in flight: one more query, queued
    behind them (the model thread answers in order), comes back."""
    wall, status, body = get(base + probe, timeout)
    if status != 200:
        raise SystemExit(f"the server answered {status} after a run: {body[:500]!r}")
    return wall / 1e3


def row(label: str, n: int, r: WrkResult, batch: float, backlog: float, cut: int) -> list[str]:
    errors = f"{r.errors}"
    if r.errors:
        socket_part = ", ".join(f"{k} {v}" for k, v in r.socket_errors.items() if v)
        errors += f" ({r.non2xx} non-2xx" + (f"; {socket_part}" if socket_part else "") + ")"
    timed = r.requests > r.socket_errors["timeout"]  # wrk leaves timed-out answers out
    p = (lambda ms: f"{ms:.1f}") if timed else (lambda ms: "-")
    return [label, str(n), f"{r.qps:.1f}", p(r.p50), p(r.p99), str(r.requests), errors,
            f"{batch:.1f}", str(cut), f"{backlog:.1f}"]  # fmt: skip


# ---------------------------------------------------------------- report


def reproduce() -> str:
    kept = [a for a in sys.argv[1:] if a not in ("--no-write", "--verbose")]
    return shlex.join(["python", "benchmarks/serve_wrk.py", *kept])


def reranked(seq: dict) -> str:
    if not seq.get("rerank_n"):
        return ""
    return (
        f" Re-ranking the top 16, {seq['rerank_n']} sequential requests (medians): client wall "
        f"{seq['rerank_wall']:.0f} ms, of which the server's `rerank` stage "
        f"{seq['rerank_ms']:.0f} ms."
    )


def one_connection(one: dict) -> str:
    """A sentence on the plain-search wrk run at 1 connection: the client's time and the
    server's own (empty without that run)."""
    if not one:
        return ""
    r = one["wrk"]
    return (
        f" Under wrk at 1 connection (keep-alive, plain search): p50 {r.p50:.1f} ms, mean "
        f"{r.exact.get('mean_us', float('nan')) / 1e3:.1f} ms at the client; the server's own "
        f"mean `total` {one['total']:.1f} ms, of which encode + search {one['model']:.1f} ms "
        "(means over that run, from /metrics)."
    )


def report(
    args: argparse.Namespace, count: int, built: str, rows: list[list[str]], seq: dict, one: dict
) -> str:
    header = ["setting", "connections", "q/s", "p50 ms", "p99 ms", "requests", "errors", "batch"]
    header += ["cut off", "drain s"]
    return "\n".join(
        [
            "## ldot serve under wrk (index built by ldot index --images)",
            "",
            f"Machine: {machine()}; commit {commit()}. Server and wrk share the machine. "
            f"The index: {count:,} Flickr8k val images, {built}. Server: `ldot serve IDX "
            f"--no-access-log{' --runtime ' + args.runtime if args.runtime else ''}` "
            '(re-ranker "auto"). '
            f"wrk 4.1, one client thread, closed loop for {args.seconds:g} s per row after "
            f"{args.warmup:g} s of warm-up at {args.warmup_connections} connections per "
            f"setting, `--timeout {args.timeout:g}s`; GET /search over {args.queries} "
            "different val captions, k = 10. q/s is wrk's Requests/sec (every answer, errors "
            "included); p50/p99 are wrk's, over the answers that came within --timeout; "
            "requests: those answered within the run; errors: non-2xx answers plus socket "
            "errors (wrk 4.1 counts a timeout when an answer comes later than --timeout, and "
            'leaves it out of the latencies); "batch": the mean number of text queries the '
            'server encoded together (from /metrics); "cut off": queries the server answered '
            "after wrk stopped waiting, which wrk neither counts nor reports (its /metrics "
            'count less wrk\'s); "drain s": how long after wrk stopped one more plain query '
            "took to come back, queued behind them. "
            f"Reproduce: `{reproduce()}`.",
            "",
            table(header, rows),
            "",
            f"Per-request overhead, {seq['n']} sequential requests from urllib (a new "
            f"connection each; {seq['failed']} failed), medians: client wall "
            f"{seq['wall']:.1f} ms, server `total` {seq['total']:.1f} ms, model (encode + "
            f"search) {seq['model']:.1f} ms, queue {seq['queue']:.2f} ms; overhead = client "
            f"wall - model = {seq['overhead']:.1f} ms (HTTP, validation, JSON, metrics, "
            f"queueing, outside the model).{one_connection(one)}{reranked(seq)}",
        ]
    )


# ---------------------------------------------------------------- main


def first_answer(base: str, caption: str, rerank: int) -> None:
    """One query before any timing (it loads what the first query needs); shows its stages."""
    _, status, body = get(base + search_path(caption, rerank), 600)
    if status != 200:
        hint = " (no re-ranker? try --no-rerank)" if rerank else ""
        raise SystemExit(f"GET /search answered {status}{hint}: {body[:500]!r}")
    print("timing_ms of one answer:", json.loads(body)["timing_ms"], flush=True)


def run(args: argparse.Namespace, work: Path) -> str:
    probe_before = speed_probe()
    val = val_split(args.data)
    captions = pick_captions(val, max(args.queries, args.sequential))
    if args.index is not None:
        index, count = args.index, None
        built = f"reused from {args.index} (indexing not timed in this run)"
    else:
        images, index, count = work / "images", work / "index", args.count
        link_images(val, args.data, args.count, images)
        cached = any((cache_dir() / "onnx").glob("*.onnx"))
        seconds = build_index(images, index, args.runtime, args.verbose)
        flag = f" --runtime {args.runtime}" if args.runtime else ""
        export = "graphs from the export cache" if cached else "the ONNX export, the cache empty"
        built = (
            f"built by `ldot index --out IDX --images DIR{flag}` over a folder of symlinks to "
            f"them in {seconds:.1f} s wall (the whole command: start, model load, {export}, "
            f"encoding, writing), {args.count / seconds:.1f} images/s"
        )
        print(built, flush=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    server = start_server(index, port, args.runtime, log)
    try:
        count = count or int(scrape(base).get('ldot_index_items{index="images"}', 0))
        first_answer(base, captions[0], 16 if args.rerank else 0)
        seq = sequential(base, captions[: args.sequential])
        if args.rerank:
            seq |= sequential_rerank(base, captions[: args.sequential_rerank])
        print("sequential:", seq, flush=True)
        rows, one = wrk_settings(args, base, captions[: args.queries], work)
        if args.verbose:
            print("--- server log (tail)\n" + log.read_text()[-3000:])
    finally:
        stop_server(server)
    body = report(args, count, built, rows, seq, one)
    body += settings_report(args, settings_rows(args, index, captions, work))
    return body + (
        f"\n\nSpeed probe (`report.speed_probe`: a fixed matrix product loop on one thread; this "
        f"host is shared, and its speed varies between runs): {probe_before:.3f} s before the "
        f"run, {speed_probe():.3f} s after."
    )


def settings_rows(
    args: argparse.Namespace, index: Path, captions: list[str], work: Path
) -> list[list[str]]:
    """Plain search under each of `--settings`, each on a fresh server."""
    rows = []
    lua = work / "search.lua"
    for flags in args.settings:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(
            index, port, args.runtime, work / "settings.log", flags=shlex.split(flags)
        )
        try:
            first_answer(base, captions[0], 0)
            for r in measure(
                args, base, search_path(captions[-1]), flags, lua, args.settings_connections
            )[0]:
                rows.append(r)
        finally:
            stop_server(server)
    return rows


def settings_report(args: argparse.Namespace, rows: list[list[str]]) -> str:
    if not rows:
        return ""
    header = ["`ldot serve` flags", "connections", "q/s", "p50 ms", "p99 ms", "requests"]
    header += ["errors", "batch", "cut off", "drain s"]
    return "\n".join(
        [
            "",
            "",
            "The server's settings, each on a fresh server over the same index, plain search "
            "as above (`--max-batch`: the most text queries encoded together, default 32; "
            "`--threads`: the model's threads, default torch's, 2 here):",
            "",
            table(header, rows),
        ]
    )


def wrk_settings(
    args: argparse.Namespace, base: str, captions: list[str], work: Path
) -> tuple[list[list[str]], dict]:
    """Plain search at each connection count, then (unless --no-rerank) re-ranking the top 16."""
    plain, reranked = work / "search.lua", work / "rerank.lua"
    probe = search_path(captions[-1])
    write_lua(plain, [search_path(c) for c in captions])
    rows, one = measure(args, base, probe, "search", plain, args.connections)
    if args.rerank:
        write_lua(reranked, [search_path(c, 16) for c in captions])
        label, conns = "search + re-rank top 16", args.rerank_connections
        rows += measure(args, base, probe, label, reranked, conns)[0]
    return rows, one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--count", type=int, default=1000, help="Val images to index.")
    ap.add_argument("--index", type=Path, help="Reuse this index folder (skip building).")
    ap.add_argument("--workdir", type=Path, help="Keep the image links, index, logs here.")
    ap.add_argument("--runtime", help="Passed to ldot index and ldot serve as --runtime NAME.")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rerank-connections", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--no-rerank", dest="rerank", action="store_false")
    ap.add_argument("--seconds", type=float, default=15.0, help="wrk -d per row.")
    ap.add_argument("--warmup", type=float, default=3.0, help="Warm-up seconds per setting.")
    ap.add_argument("--warmup-connections", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=10.0, help="wrk --timeout, seconds.")
    ap.add_argument("--queries", type=int, default=500, help="Different captions wrk cycles.")
    ap.add_argument("--sequential", type=int, default=200, help="Requests timed one at a time.")
    ap.add_argument(
        "--sequential-rerank", type=int, default=10, help="Re-ranked ones timed one at a time."
    )
    ap.add_argument(
        "--settings",
        nargs="*",
        default=["--max-batch 8", "--max-batch 16", "--max-batch 64", "--threads 1"],
        help="Sets of `ldot serve` flags to compare (each one string).",
    )
    ap.add_argument("--settings-connections", type=int, nargs="+", default=[32])
    ap.add_argument("--no-write", action="store_true", help="Print, leave BENCHMARKS.md alone.")
    ap.add_argument("--verbose", action="store_true", help="Print wrk's raw output and logs.")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if args.workdir is not None:
        if args.workdir.exists():
            raise SystemExit(f"--workdir {args.workdir} exists; give a new folder")
        args.workdir.mkdir(parents=True)
        body = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="serve-wrk-") as tmp:
            body = run(args, Path(tmp))
    if not args.no_write:
        write_section("serve_wrk", body)
    print(body)


if __name__ == "__main__":
    main()
