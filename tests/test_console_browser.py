"""The console in a real headless browser (Debian's chromium driven by Playwright) against a real ingest
service, broker, rollout controller and serving node: a deployment's steps appear live, the split bar moves
when a rollout starts, the pause button pauses it, a wrong token is refused.

Screenshots are saved as test artifacts (the path is printed); chromium missing is a failure with the
command that installs it, never a skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import KafkaConfig
from modelcd.rollout.service import RolloutController
from modelcd.shadow.comparison import run_comparison
from modelcd.store.blobs import open_store
from modelcd.store.targets import TargetState

from ._ingest import iris_package, running_ingest, settings_for
from ._serving import RunningNode, eventually, node_settings, running_node

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("MODELCD_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "console-test-token"
ROWS = {"inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32",  # the ingest packages take float32
                    "data": [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3]]}]}
WAIT_MS = 60_000  # an upper bound on every wait in the browser, never a performance threshold


@pytest.fixture
def chromium() -> str:
    """The browser, or a failure (before anything is started) that says how to install it."""
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.fail(f"chromium not found at {CHROMIUM}: install it with `sudo apt-get install -y chromium` "
                    "(Debian/Ubuntu; ./test.sh does it when run as root), or point MODELCD_CHROMIUM at a "
                    "Chromium binary. Playwright's own browser download is not used.")
    return CHROMIUM


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # pytest keeps only its last few temporary directories: MODELCD_TEST_ARTIFACTS keeps them somewhere stable.
    root = os.environ.get("MODELCD_TEST_ARTIFACTS")
    d = Path(root) / "console-screenshots" if root else tmp_path_factory.mktemp("console-screenshots")
    d.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {d}")
    return d


@asynccontextmanager
async def browser_page(path: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=path, args=ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1440, "height": 1000})
            page = await context.new_page()
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            await browser.close()


@dataclass
class System:
    url: str
    node: RunningNode | None = None


@asynccontextmanager
async def system(broker: EmbeddedBroker, tmp_path: Path, *, node: bool) -> AsyncIterator[System]:
    """Ingest (with the console mounted, as `modelcd up` wires it), the rollout controller and, with `node`, a
    serving node and the shadow comparison processor (one-second windows)."""
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), free_port(), tmp_path / "home",
                            api_token=TOKEN, heartbeat_interval=0.5, usage_interval=0.5, comparison_window=1.0,
                            comparison_grace=0.5)
    cfg = KafkaConfig.from_settings(settings)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(running_ingest(settings))
        store = await stack.enter_async_context(open_store(settings.resolved_store_url))
        controller = await stack.enter_async_context(RolloutController(cfg, targets=TargetState(store), tick=0.1))
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(controller.run(stop=stop, ready=ready))

        async def halt() -> None:
            stop.set()
            await asyncio.wait_for(task, 30)

        stack.push_async_callback(halt)
        await asyncio.wait_for(ready.wait(), 30)
        out = System(f"http://127.0.0.1:{settings.ingest_port}")
        if node:
            # The test drives the browser and ingest from the node's loop: its pressure would shed the shadows.
            out.node = await stack.enter_async_context(running_node(
                node_settings(tmp_path / "node", broker.bootstrap, store_url=str(tmp_path / "store"),
                              shadow_pause_busy=0.0, shadow_pause_lag_ms=0.0), node_id="node-a"))
            await started(stack, run_comparison, settings)
        yield out


async def started(stack: AsyncExitStack, service: Any, settings: Any) -> None:
    """Run `service(settings, stop=, ready=)` until the stack closes; return once it is ready."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(service(settings, stop=stop, ready=ready))

    async def halt() -> None:
        stop.set()
        await asyncio.wait_for(task, 30)

    stack.push_async_callback(halt)
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()
    assert ready.is_set(), f"{service.__name__} not ready within 30 s"


async def sign_in(page: Any, url: str, token: str) -> None:
    await page.goto(f"{url}/console")
    await page.wait_for_url(f"{url}/console/login")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def test_wrong_token_is_refused(chromium: str, broker: EmbeddedBroker, tmp_path: Path, shots: Path) -> None:
    """Without a session the console sends to the sign-in form; a wrong token gets 401 and no cookie, a right one
    gets the live page; the stream and the API refuse a browser without a session."""
    async with system(broker, tmp_path, node=False) as sys_, browser_page(chromium) as page:
        url = sys_.url
        response = await page.goto(f"{url}/console/events")
        assert response is not None and response.status == 401
        await sign_in(page, url, "not-the-token")
        await page.get_by_role("alert").wait_for()
        assert "Wrong token" in await page.get_by_role("alert").inner_text()
        await page.screenshot(path=str(shots / "wrong-token.png"))
        assert not [c for c in await page.context.cookies() if c["name"] == "modelcd_session"]
        assert (await page.request.get(f"{url}/models")).status == 401
        await page.get_by_label("API token").fill(TOKEN)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(f"{url}/console")
        await page.get_by_role("heading", name="modelcd console").wait_for()
        [cookie] = [c for c in await page.context.cookies() if c["name"] == "modelcd_session"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert (await page.request.get(f"{url}/models")).status == 200  # the API takes the session
        await page.locator("#status .feed.live").wait_for()


async def test_deploy_rollout_and_pause_live(chromium: str, broker: EmbeddedBroker, tmp_path: Path,
                                            shots: Path) -> None:
    """Deploy through the API and watch the steps appear without reloading; start a rollout and watch the split
    bar move; pause it with the button and see the controller's answer."""
    async with system(broker, tmp_path, node=True) as sys_, browser_page(chromium) as page:
        url, node = sys_.url, sys_.node
        assert node is not None
        await sign_in(page, url, TOKEN)
        await page.wait_for_url(f"{url}/console")
        await page.evaluate("window.__loadedOnce = true")  # gone if the page ever reloads
        auth = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as api:
            ids = []
            for version in ("1", "2"):
                built = iris_package("iris", version, c=1.0 if version == "1" else 0.05)
                r = await api.post("/deployments", content=built.data, headers={"content-type": "application/x-tar"})
                assert r.status_code == 202, r.text
                ids.append(r.json()["deployment_id"])
            first = page.locator(f'[data-deployment="{ids[0]}"]')
            await first.locator('[data-step="validate"]').wait_for()  # a step, before the deployment ended
            await first.locator('[data-step="publish"][data-status="succeeded"]').wait_for()
            for d in ids:
                await page.locator(f'[data-deployment="{d}"][data-status="completed"]').wait_for()
            await page.locator(f'[data-deployment="{ids[0]}"]', has_text="Nodes serving: node-a").wait_for()
            await page.locator('#models tr[data-model="iris:2"]').wait_for()
            await page.locator('#fleet tr[data-node="node-a"]').wait_for()
            await page.screenshot(path=str(shots / "deployed.png"), full_page=True)

            r = await api.put("/endpoints/iris/traffic", json={"routes": [
                {"model": "iris", "version": "1", "weight": 100}]})
            assert r.status_code == 200, r.text
            bar = page.locator('#endpoints [data-endpoint="iris"] .split')
            await bar.locator('.seg[data-ref="iris:1"][data-weight="100"]').wait_for()

            # Shadow iris:2 behind iris:1: two bursts of traffic with a silence between them (a shaded gap).
            r = await api.post("/endpoints/iris/shadows", json={"primary": "iris:1", "shadow": "iris:2",
                                                                "until": "1h"})
            assert r.status_code == 201, r.text
            await eventually(lambda: bool(node.node.shadow.rules), what="the node applied the shadow relation")
            for burst in range(2):
                for _ in range(8):
                    answers = await asyncio.gather(*(node.infer("iris", ROWS) for _ in range(5)))
                    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
                    await asyncio.sleep(0.25)
                if burst == 0:
                    await asyncio.sleep(2.5)
            pair = page.locator('#shadows [data-pair="iris:1/iris:2"]')
            await pair.locator("svg.plot rect.gap").wait_for()
            assert "agreement" in (await pair.locator("svg.plot title").first.text_content() or "")
            r = await api.post("/endpoints/iris/rollout", json={"to": "iris:2", "steps": [10, 50, 100],
                                                                 "interval": "1h"})
            assert r.status_code == 202, r.text
            await bar.locator('.seg[data-ref="iris:2"][data-weight="10"]').wait_for()
            await bar.locator('.seg[data-ref="iris:1"][data-weight="90"]').wait_for()
            assert "iris:2 10%" in (await bar.get_attribute("aria-label") or "")
            article = page.locator('#endpoints [data-endpoint="iris"]')
            await article.and_(page.locator('[data-phase="running"]')).wait_for()
            await page.screenshot(path=str(shots / "rollout.png"), full_page=True)

            await article.get_by_role("button", name="Pause").focus()  # by keyboard, as without a mouse
            await page.keyboard.press("Enter")
            await page.locator('#endpoints [data-endpoint="iris"][data-phase="paused"]').wait_for()
            await article.get_by_role("button", name="Resume").and_(page.locator(":enabled")).wait_for()
            assert await article.get_by_role("button", name="Pause").is_disabled()
            status = (await api.get("/endpoints/iris/rollout")).json()
            assert status["phase"] == "paused" and status["history"][-1]["reason"] == "pause from the console"
            assert await page.evaluate("window.__loadedOnce === true"), "the page reloaded instead of updating live"
            await page.screenshot(path=str(shots / "paused.png"), full_page=True)
