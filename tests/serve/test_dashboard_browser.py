"""The dashboard in a real browser: Debian's chromium driven by Playwright watches a real run advance.

The real service (``fedloom serve`` with a token, uvicorn, a subprocess) serves a store in
which a finished run (``fedloom run``, 3 rounds with local DP) already lies. The page opens on
it; then a real
training run starts in another subprocess (60 rounds of a hospital MLP, where hospital-B sends
a NaN update every 7th round, which the server rejects). The page must list the new run, and,
without a reload, show its round number rise, draw non-blank charts, fill in the checkpoint
versions and the rejected updates, show a value under the pointer, fit a 420 px screen, and
log no error (a request the token refused would be one).

Set ``FEDLOOM_SCREENSHOTS=1`` to rewrite the README's screenshots (``docs/img/dashboard*.png``).
Skipped when ``chromium`` is not installed (CI installs Debian's package; Playwright never
downloads a browser here).
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
SCREENSHOTS = os.environ.get("FEDLOOM_SCREENSHOTS") == "1"
MAE_CANVAS = '#charts figure[data-metric="test_mae"] canvas'
TOKEN = "dash-s3cret"  # the service wants it on /api; the page passes its own ?access_token= on

CONFIG = """
[run]
name = "{name}"
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

DP = """
[privacy]
mode = "local"
noise_multiplier = 0.5
clip_norm = 1.0
"""

# A training run like `fedloom run` (the same build_run), whose hospital-B sends a NaN update in
# rounds 4, 11, 18, ...: a broken client, rejected by the server with its reason.
TRAINER = """
import sys
from dataclasses import replace

import torch

from fedloom.core.config import load_config
from fedloom.run import build_run

run = build_run(load_config(sys.argv[1]), fresh=True)
fed = run.federation
inner = fed.engine.run_cohort


def run_cohort(*args, **kwargs):
    rnd = fed.state.round + 1
    for u in inner(*args, **kwargs):
        broken = rnd % 7 == 4 and u.client_id == "hospital-B"
        yield replace(u, delta=torch.full_like(u.delta, float("nan"))) if broken else u


fed.engine.run_cohort = run_cohort
fed.run(run.config.run.rounds)
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


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium on PATH (apt-get install chromium)")
def test_dashboard_follows_a_live_run(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    store = tmp_path / "store.db"
    # one torch thread each: the trainer, the service and the browser share the machine's cores
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = tmp_path / "done.toml"
    done.write_text(CONFIG.format(name="dash-done", rounds=3, store=store) + DP)
    subprocess.run([*_fedloom(), "run", str(done), "--out", str(tmp_path / "o1")], env=env, check=True, capture_output=True,
                   timeout=120)  # fmt: skip
    live = tmp_path / "live.toml"
    live.write_text(CONFIG.format(name="dash-live", rounds=60, store=store))
    port = _free_port()
    server = subprocess.Popen([*_fedloom(), "serve", str(store), "--port", str(port), "--token", TOKEN], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    trainer: subprocess.Popen[bytes] | None = None
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
            while True:  # the service starts up
                try:
                    page.goto(f"http://127.0.0.1:{port}/?access_token={TOKEN}", timeout=5000)
                    break
                except Exception:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.3)
            page.evaluate("window.__loaded_once = true")  # gone if the page ever reloads
            # from here on every request must succeed (an EventSource closed by the page aside)
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}") if "/events" not in r.url else None)

            # the finished run: its 3 rounds, versions, ε, and a stream that says it is up to date
            page.wait_for_function("document.getElementById('run-name').textContent === 'dash-done'")
            page.wait_for_function("document.getElementById('round').dataset.round === '3'")
            page.wait_for_function("document.getElementById('conn').dataset.state === 'final'")
            assert page.inner_text("#run-status") == "completed"
            assert page.locator("#versions tbody tr").count() == 3
            assert page.inner_text("#epsilon").startswith("ε = ")
            assert page.locator('#charts figure[data-metric="dp_epsilon"] canvas').count() == 1

            # a new run starts; the runs list picks it up (it polls), and the page follows it
            trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(live)], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            page.wait_for_selector('#run-list li[data-run="dash-live"]', timeout=60000)
            page.click('#run-list li[data-run="dash-live"]')
            page.wait_for_function("document.getElementById('run-name').textContent === 'dash-live'")

            def shown_round() -> int:
                return int(page.get_attribute("#round", "data-round") or 0)

            seen = [shown_round()]
            t_end = time.monotonic() + 90
            while len(set(seen)) < 3 and time.monotonic() < t_end and trainer.poll() is None:
                page.wait_for_timeout(300)
                seen.append(shown_round())
            assert len(set(seen)) >= 3 and seen == sorted(seen), f"the round shown did not rise twice: {seen}"
            assert page.inner_text("#conn") == "live" and page.inner_text("#run-status") == "running"
            page.wait_for_function("document.querySelectorAll('#versions tbody tr').length > 0", timeout=30000)
            names = page.eval_on_selector_all("#charts figure[data-metric]", "fs => fs.map(f => f.dataset.metric)")
            assert names[0] == "test_mae" and "train_loss" in names and names.index("train_loss") > names.index("test_loss")
            chart = page.locator(MAE_CANVAS)
            assert _distinct_colours(chart.screenshot()) > 20, "the MAE chart is blank"
            assert _distinct_colours(page.locator("#chart-clients").screenshot()) > 5, "the clients chart is blank"
            box = chart.bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] / 2)
            page.wait_for_function("s => document.querySelector(s)._fedchart.hover !== null", arg=MAE_CANVAS)
            hovered = page.evaluate("s => document.querySelector(s)._fedchart.hover", MAE_CANVAS)
            assert isinstance(hovered, int) and hovered >= 1  # the read-out shows a round
            page.mouse.move(0, 0)

            # hospital-B's NaN update in round 4 shows up with its reason
            page.wait_for_function("document.querySelectorAll('#rejected tbody tr').length > 0", timeout=60000)
            row = page.locator("#rejected tbody tr").last.inner_text()
            assert row.startswith("4") and "hospital-B" in row and "NaN" in row, row
            assert page.is_hidden("#no-rejections")

            if SCREENSHOTS:  # a run well under way, still running
                page.wait_for_function("+document.getElementById('round').dataset.round >= 20", timeout=90000)
                (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ROOT / "docs" / "img" / "dashboard.png"), full_page=True)
            # a phone: everything fits in 420 px, no sideways scrolling
            page.set_viewport_size({"width": 420, "height": 900})
            page.wait_for_timeout(400)  # the charts redraw after a resize
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 420, f"the page is {width} px wide at 420 px"
            assert _distinct_colours(chart.screenshot()) > 20, "the MAE chart is blank at 420 px"
            if SCREENSHOTS:
                page.screenshot(path=str(ROOT / "docs" / "img" / "dashboard-narrow.png"), full_page=True)
            assert page.evaluate("window.__loaded_once === true"), "the page reloaded"
            browser.close()
    finally:
        for proc in (trainer, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        if trainer is not None:
            trainer.wait(timeout=30)
        out = server.communicate(timeout=30)[0].decode(errors="replace")
    assert not errors, errors
    assert "Traceback" not in out, out
    if trainer is not None and trainer.returncode not in (0, -15):
        pytest.fail(f"the training run failed: {trainer.stderr.read().decode() if trainer.stderr else ''}")
