#!/usr/bin/env python3
"""Write one benchmark result with its provenance: benches/results/<bench>-<YYYY-MM-DD>[-n].json.

Every benchmark script ends by calling this with its figures (a JSON file) and what it measured them
with, so that the README and docs/ quote nothing that is not committed with the git commit, machine,
load and tool versions it came from:

    load_before=$(cut -d' ' -f1-3 /proc/loadavg); started=$(date -u +%FT%TZ)
    ... run the benchmark, write its figures to results.json ...
    python3 benches/provenance.py --bench train_cpu --started "$started" --load-before "$load_before" \
        --command "benches/train_cpu.sh $*" --results results.json --versions torch,transformers

The file holds {bench, date, started, finished, git: {commit, dirty, dirty_files}, machine: {cpu,
simd, cores, logical_cpus, memory_gib, os, kernel}, load_average: {before, after} (1, 5 and 15 minutes),
versions: {rustc, pipe, candle, python, <--versions>...}, command, env (the thread settings that change
the figures), results}. `dirty` ignores benches/results/ (results are committed after the run that
wrote them). Run it with the Python the benchmark used: its version and packages are the ones recorded.
Prints the path written.
"""

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RESULTS = os.path.join(ROOT, "benches", "results")
ENV_KEYS = ("CANDLE_NUM_THREADS", "RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def sh(*cmd):
    """A command's first output line, or None when it is missing or fails."""
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if out.returncode == 0 and text else None


def loadavg():
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def git():
    commit = sh("git", "rev-parse", "HEAD")
    status = subprocess.run(
        ["git", "status", "--porcelain", "--", ".", ":(exclude)benches/results"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout.splitlines()
    files = [line[3:] for line in status]
    return {"commit": commit, "branch": sh("git", "rev-parse", "--abbrev-ref", "HEAD"), "dirty": bool(files),
            "dirty_files": files}


def machine():
    cpu, flags = None, []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu is None:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    os_name = None
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "simd": flags, "cores": usable, "logical_cpus": os.cpu_count(),
            "memory_gib": mem, "os": os_name or platform.system(), "kernel": platform.release(),
            "arch": platform.machine()}


def lock_version(name):
    """The version of a crate in Cargo.lock (what the benchmark was built with)."""
    try:
        lock = open(os.path.join(ROOT, "Cargo.lock")).read()
    except OSError:
        return None
    m = re.search(r'\[\[package\]\]\nname = "%s"\nversion = "([^"]+)"' % re.escape(name), lock)
    return m.group(1) if m else None


def versions(extra):
    v = {"rustc": sh("rustc", "--version"), "cargo": sh("cargo", "--version"),
         "pipe": sh(os.path.join(ROOT, "target", "release", "pipe"), "--version"),
         "candle": lock_version("candle-core"), "python": platform.python_version()}
    for name in extra:
        if name == "dvc":
            beside = os.path.join(os.path.dirname(sys.executable), "dvc")  # in this Python's environment
            v["dvc"] = sh(beside if os.path.exists(beside) else "dvc", "--version")
            continue
        try:
            v[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            v[name] = None
    return v


def target(bench, day):
    os.makedirs(RESULTS, exist_ok=True)
    path, n = os.path.join(RESULTS, f"{bench}-{day}.json"), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(RESULTS, f"{bench}-{day}-{n}.json")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", required=True, help="the file name's first part: engine, tokenize, train_cpu…")
    ap.add_argument("--results", required=True, help="a JSON file with the benchmark's figures")
    ap.add_argument("--command", required=True, help="the command line that ran the benchmark")
    ap.add_argument("--started", help="when it started (ISO 8601, UTC)")
    ap.add_argument("--load-before", help='the load averages before it ran: "1m 5m 15m"')
    ap.add_argument("--versions", default="", help="comma-separated Python packages (or dvc) it used")
    args = ap.parse_args()

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    before = [float(x) for x in args.load_before.split()] if args.load_before else None
    with open(args.results) as f:
        results = json.load(f)
    record = {
        "bench": args.bench,
        "date": now.date().isoformat(),
        "started": args.started,
        "finished": now.isoformat().replace("+00:00", "Z"),
        "git": git(),
        "machine": machine(),
        "load_average": {"before": before, "after": loadavg()},
        "versions": versions([x for x in args.versions.split(",") if x]),
        "command": args.command,
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "results": results,
    }
    path = target(args.bench, record["date"])
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(os.path.relpath(path, ROOT))


if __name__ == "__main__":
    sys.exit(main())
