"""Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol, for the tests that
look at a page as a person would: TensorBoard's dashboards draw inside shadow DOM, which
`chromium --dump-dom` leaves out, so the tests read what the page shows through `Runtime.evaluate`.

Chromium runs in its own process group with a throwaway profile, its DevTools port and every page it
opens on 127.0.0.1; background networking (updates, sync, field trials) is off.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dcgan_ray.dev.processes import stop_process_group

INSTALL = (
    "chromium is not installed: `apt-get install -y chromium` (scripts/setup.sh does it as root when it "
    "installs the test tools)"
)

# Everything on the page, shadow roots included: its text and its images (src, loaded size).
READ_PAGE = """(() => {
  const texts = [], images = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.tagName === 'IMG') images.push({src: el.getAttribute('src') || '', width: el.naturalWidth,
                                            height: el.naturalHeight});
      if (el.shadowRoot) { texts.push(el.shadowRoot.textContent); walk(el.shadowRoot); }
    }
  };
  texts.push(document.body ? document.body.innerText : '');
  walk(document);
  return {text: texts.join('\\n'), images: images};
})()"""


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(INSTALL)
    return found


class Chromium:
    def __init__(self, width: int = 1400, height: int = 900):
        self.profile = Path(tempfile.mkdtemp(prefix="dcgan-chromium-"))
        self.proc = subprocess.Popen(
            [
                chromium_binary(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--no-proxy-server",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.loop = asyncio.new_event_loop()
        self.session = self.ws = None
        self.ids = 0
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None, f"chromium exited with code {self.proc.returncode} at start-up"
            assert time.monotonic() < deadline, "chromium's DevTools port did not open within 60 s"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
        # The viewport itself (--window-size leaves headless Chromium's a little shorter).
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    async def _connect(self, url: str) -> None:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        while True:  # events arrive in between; the answer carries our id
            message = json.loads((await self.ws.receive(timeout=120)).data)
            if message.get("id") == self.ids:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params))

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def read(self) -> dict[str, Any]:
        """The page's text and images as it shows them now."""
        return self.call("Runtime.evaluate", expression=READ_PAGE, returnByValue=True)["result"]["value"]

    def wait_for(self, condition, timeout_s: float = 90) -> dict[str, Any]:
        """Read the page until `condition(page)` holds; the page it held on."""
        deadline = time.monotonic() + timeout_s
        while True:
            page = self.read()
            if condition(page):
                return page
            assert time.monotonic() < deadline, f"the page never showed it; it shows:\n{page['text'][-3000:]}"
            time.sleep(1)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if self.ws is not None:
            self.loop.run_until_complete(self.ws.close())
            self.loop.run_until_complete(self.session.close())
        self.loop.close()
        stop_process_group(self.proc.pid)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
