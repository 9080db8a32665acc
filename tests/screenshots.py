"""The README's pictures of the UI, made by running the real thing: ComfyUI 0.14.1's server with the pack, its web
UI in headless Chromium, workflows/demo_preview.json queued as a user would.

    COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 .venv/bin/python tests/screenshots.py [--out tests/results/screenshots]

Writes ``graph_live_preview.png`` (the graph after the run: the merging node's live preview, the Token Merging
Preview node and its outputs) and ``preview_grid.png`` (per sampled image: the image, the importance map and the
merge map of the last step, as the preview node drew them). Needs what tests/setup_env.sh installs (browser test).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import web_ui  # noqa: E402

WORKFLOW = os.path.join(REPO, "workflows", "demo_preview.json")


def fetch_image(server, entry):
    from PIL import Image  # noqa: PLC0415

    query = urllib.parse.urlencode({k: entry[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as reply:
        return Image.open(reply).convert("RGB").copy()


def grid(rows, labels, path, scale=1):
    """rows of PIL images (same sizes) with a label column on the left."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    width, height = rows[0][0].size
    width, height = width * scale, height * scale
    label_w, gap = 150, 6
    canvas = Image.new("RGB", (label_w + len(rows[0]) * (width + gap), len(rows) * (height + gap)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels)):
        y = r * (height + gap)
        draw.multiline_text((8, y + height // 2 - 14), label, fill=(230, 230, 230))
        for c, image in enumerate(row):
            canvas.paste(image.resize((width, height), Image.NEAREST), (label_w + c * (width + gap), y))
    canvas.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "results", "screenshots"))
    parser.add_argument("--root", default=(os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0],
                        help="ComfyUI root (default: the first root in COMFYUI_PATH)")
    args = parser.parse_args(argv)
    reason = web_ui.unavailable(args.root) if args.root else "no ComfyUI root: set COMFYUI_PATH or --root"
    if reason:
        print(f"cannot make the screenshots: {reason}", file=sys.stderr)  # noqa: T201
        return 1
    os.makedirs(args.out, exist_ok=True)
    with open(WORKFLOW, encoding="utf-8") as handle:
        workflow = json.load(handle)
    merge = next(n for n in workflow["nodes"] if n["type"] == "ITM_ImportanceTokenMerging")
    steps = next(n for n in workflow["nodes"] if n["type"] == "KSampler")["widgets_values"][2]
    with web_ui.ComfyServer(args.root) as server, web_ui.Browser(width=1760, height=960) as browser:
        browser.open(server.url)
        browser.load_workflow(workflow)
        browser.queue()
        entries = server.wait_for_prompts(1)
        browser.wait(browser.APP + """
            const img = app.graph.getNodeById(arguments[0])?.itmPreview?.img;
            return img && img.dataset.step === String(arguments[1] - 1) && img.naturalWidth > 0;""", 20,
                     "the last step's live preview", merge["id"], steps)
        browser.script(browser.APP + """
            const ds = app.canvas.ds; ds.scale = 0.85; ds.offset[0] = 20; ds.offset[1] = 120;
            app.canvas.setDirty(true, true);""")
        browser.wait("return new Promise(r => setTimeout(() => r(true), 800))", 5, "a redraw")
        graph_path = os.path.join(args.out, "graph_live_preview.png")
        browser.screenshot(graph_path)
        outputs = next(iter(entries.values()))["outputs"]
        shown = {n["id"]: n.get("title", "") for n in workflow["nodes"] if n["type"] == "PreviewImage"}
        save = next(str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage")
        rows = [[fetch_image(server, e) for e in outputs[save]["images"]]]
        labels = ["sampled image"]
        for node_id, title in shown.items():
            rows.append([fetch_image(server, e) for e in outputs[str(node_id)]["images"]])
            labels.append(title.replace(" (", "\n("))
        grid_path = os.path.join(args.out, "preview_grid.png")
        grid(rows, labels, grid_path)
    print(f"wrote {graph_path}\nwrote {grid_path}")  # noqa: T201 (a command-line tool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
