"""The live preview in a real browser: ComfyUI 0.14.1's server with the pack, its web UI in headless Chromium.

Loads workflows/demo_preview.json as a user would, queues it, and checks that the merging node's preview element
received each step's picture while the sampler ran, that the element is never saved in the workflow, and that the
Token Merging Preview node's pictures reached the graph's PreviewImage nodes. Saves a screenshot
(``ITM_SCREENSHOT_DIR``, default: pytest's temporary folder). Skipped, with the reason, where no browser or server
can run (the pinned host's server cannot start as shipped; see tests/web_ui.py).
"""
import json
import os

import pytest

import web_ui
from conftest import REPO, _host_root

WORKFLOW = os.path.join(REPO, "workflows", "demo_preview.json")
pytestmark = pytest.mark.comfy  # runs once per host (its own server process; no in-process boot)


@pytest.fixture(scope="module")
def session():
    root = _host_root()
    reason = web_ui.unavailable(root)
    if reason:
        pytest.skip(reason)
    with web_ui.ComfyServer(root) as server, web_ui.Browser() as browser:
        browser.open(server.url)
        yield server, browser


def test_live_preview_reaches_the_merging_node_in_the_browser(session, tmp_path):
    server, browser = session
    with open(WORKFLOW, encoding="utf-8") as handle:
        workflow = json.load(handle)
    merge = next(n for n in workflow["nodes"] if n["type"] == "ITM_ImportanceTokenMerging")
    steps = next(n for n in workflow["nodes"] if n["type"] == "KSampler")["widgets_values"][2]
    browser.load_workflow(workflow)
    before = browser.preview_state(merge["id"])
    assert before["found"] and before["inDocument"] and before["width"] == 0  # the extension added the element
    # the element is not a saved widget: the workflow keeps its widget values (and so its meaning) unchanged
    assert browser.serialized_widgets(merge["id"]) == merge["widgets_values"]

    browser.queue()
    entries = server.wait_for_prompts(1)
    browser.wait(browser.APP + """
        const img = app.graph.getNodeById(arguments[0])?.itmPreview?.img;
        return img && img.dataset.step === String(arguments[1] - 1) && img.naturalWidth > 0;""", 20,
                 "the last step's picture", merge["id"], steps)  # raises on timeout
    after = browser.preview_state(merge["id"])
    assert after["src"].startswith("data:image/png;base64")
    assert after["width"] > after["height"] > 100  # importance map | merge map, side by side
    assert f"step {steps} " in after["caption"] and "512/1024 tokens" in after["caption"]

    # the Token Merging Preview node's two pictures reached the PreviewImage nodes
    outputs = next(iter(entries.values()))["outputs"]
    shown = [n["id"] for n in workflow["nodes"] if n["type"] == "PreviewImage"]
    assert len(shown) == 2 and all(len(outputs[str(i)]["images"]) == 2 for i in shown)  # batch of 2

    folder = os.environ.get("ITM_SCREENSHOT_DIR") or str(tmp_path)
    path = os.path.join(folder, "live_preview.png")
    browser.screenshot(path)
    assert os.path.getsize(path) > 10_000
    print(f"screenshot: {path}")  # noqa: T201 (where to look)
