"""The dashboard in a real browser: Debian's chromium driven by Playwright watches a real run advance.

A real training run (``fedloom run`` in a subprocess) writes into a store while the real
service (``fedloom serve``, uvicorn, in another subprocess) serves the dashboard from it. The
page must show the round number rising without a reload, draw non-blank charts, list the
checkpoint versions and log no error. Set ``FEDLOOM_SCREENSHOTS=1`` to rewrite the README's
screenshots (``docs/img/dashboard*.png``). Skipped when ``chromium`` is not installed (CI
installs Debian's package; Playwright never downloads a browser here).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CHROMIUM = shutil.which("chromium")
ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[run]
name = "dash-{name}"
seed = 0
rounds = {rounds}
store = "{store}"
engine = "sequential"

[data]
name = "hospital"

[model]
name = "mlp"
hidden = [64, 32]

[strategy]
name = "fedavg"
fraction = 1.0

[client]
epochs = 1
batch_size = 64
lr = 0.001
optimizer = "adam"
loss = "huber"
"""


def _fedloom() -> list[str]:
    script = Path(sys.executable).with_name("fedloom")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedloom.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _distinct_colours(png: bytes) -> int:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    return len(img.getcolors(maxcolors=1 << 24) or [])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_dashboard_follows_a_live_run(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    store = tmp_path / "store.db"
    done = tmp_path / "done.toml"
    done.write_text(CONFIG.format(name="done", rounds=3, store=store))
    subprocess.run([*_fedloom(), "run", str(done), "--out", str(tmp_path / "o1")], check=True, capture_output=True, timeout=120)
    live = tmp_path / "live.toml"
    live.write_text(CONFIG.format(name="live", rounds=400, store=store))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    trainer = subprocess.Popen([*_fedloom(), "run", str(live), "--out", str(tmp_path / "o2")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    port = _free_port()
    server = subprocess.Popen([*_fedloom(), "serve", str(store), "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            deadline = time.monotonic() + 60
            while True:  # the service and the live run start up
                try:
                    page.goto(f"http://127.0.0.1:{port}/?run=dash-live", timeout=5000)
                    break
                except Exception:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.5)
            page.wait_for_selector("#run:not([hidden])", timeout=30000)
            assert page.locator("#run-list li").count() == 2
            assert page.inner_text("#run-name") == "dash-live"

            def shown_round() -> int:
                return int(page.get_attribute("#round", "data-round") or 0)

            seen = [shown_round()]
            t_end = time.monotonic() + 90
            while len(set(seen)) < 3 and time.monotonic() < t_end:  # two increases, no reload
                page.wait_for_timeout(500)
                seen.append(shown_round())
            assert len(set(seen)) >= 3 and seen == sorted(seen), f"the round shown did not advance: {seen}"
            page.wait_for_function("document.querySelectorAll('#versions tbody tr').length > 0", timeout=30000)
            assert page.inner_text("#run-status") == "running"
            assert page.inner_text("#conn") == "live"
            chart = page.locator('#charts figure[data-metric="test_mae"] canvas')
            assert _distinct_colours(chart.screenshot()) > 20, "the MAE chart is blank"
            assert _distinct_colours(page.locator("#chart-clients").screenshot()) > 5
            if os.environ.get("FEDLOOM_SCREENSHOTS") == "1":
                (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ROOT / "docs" / "img" / "dashboard.png"), full_page=True)
                page.set_viewport_size({"width": 420, "height": 900})
                page.wait_for_timeout(500)
                page.screenshot(path=str(ROOT / "docs" / "img" / "dashboard-narrow.png"), full_page=True)
            # the finished run: completed, its three versions
            page.click('#run-list li[data-run="dash-done"]')
            page.wait_for_function("document.getElementById('run-name').textContent === 'dash-done'")
            page.wait_for_function("document.getElementById('round').dataset.round === '3'")
            assert page.inner_text("#run-status") == "completed"
            page.wait_for_function("document.querySelectorAll('#versions tbody tr').length === 3")
            browser.close()
    finally:
        trainer.terminate()
        server.terminate()
        trainer.wait(timeout=30)
        out = server.communicate(timeout=30)[0].decode(errors="replace")
    assert not errors, errors
    assert "Traceback" not in out, out
