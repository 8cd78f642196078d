"""Run a command and sample its memory: peak RSS split into anonymous and file-backed pages.

``python bench/memwatch.py -- CMD ...`` prints one JSON line: wall seconds, peak RssAnon,
peak RssFile and peak VmRSS (bytes), summed over the process and its children, sampled every 5 ms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "VmRSS:", "RssShmem:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []
    out = list(kids)
    for k in kids:
        out += _children(k)
    return out


def run(cmd: list[str], env: dict | None = None) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while proc.poll() is None:
        total = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        for pid in [proc.pid, *_children(proc.pid)]:
            st = _status(pid)
            for k in total:
                total[k] += st.get(k, 0)
        for k in peak:
            peak[k] = max(peak[k], total[k])
        time.sleep(0.005)
    wall = time.perf_counter() - start
    return {
        "returncode": proc.returncode,
        "seconds": wall,
        "peak_anon": peak["RssAnon"],
        "peak_file": peak["RssFile"],
        "peak_rss": peak["VmRSS"],
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    print(json.dumps(run(args)))
