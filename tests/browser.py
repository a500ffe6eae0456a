"""Helpers for browser tests of the Streamlit dashboard (a helper module: pytest collects only test_*.py).

The browser is the Debian `chromium` package, driven by the Playwright Python package: `playwright install`
downloads browsers from a CDN that our machines cannot reach, so tests never use Playwright's own builds.
Locally a missing browser skips the test with the command that installs it; under CI (`CI` set, as
`.ci/run` does) it fails instead, so CI can never pass by silently skipping the browser test.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:  # playwright is a dev extra; importing this module must not need it
    from playwright.sync_api import Browser, Page, Playwright

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Headless, no sandbox (CI runs as root, where Chromium's sandbox refuses to start), no GPU, and nothing that
# phones home or updates itself. --disable-dev-shm-usage: containers often have a 64 MB /dev/shm, too small
# for Chromium, and the Debian launcher's own check for that misreads findmnt output on some machines.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_chromium() -> None:
    """Skip (locally) or fail (under CI) unless Chromium and the playwright package are both available."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} is missing; install it with: apt-get install -y chromium")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package is missing; install it with: pip install -e '.[dev]'")
    if not missing:
        return
    reason = "browser test needs Chromium and Playwright: " + "; ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it, so parallel runs do not collide)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:] or "(empty)"


def _stop(proc: subprocess.Popen) -> None:
    """Stop Streamlit and anything it started: TERM to the whole process group, then KILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def streamlit_server(app: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> Iterator[str]:
    """Run `streamlit run APP` on a free local port; yield its base URL once /_stcore/health answers "ok".

    `env` is added to this process's environment. The server runs from the repository root in its own process
    group, which is always terminated on exit. RuntimeError, with the end of the server's log, if it exits or
    is not healthy within `timeout` seconds; if the body of the `with` raises, the log's end goes to stderr
    (pytest shows it with the failure).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",  # tests never edit the app; no watcher threads
    ]
    fd, log_name = tempfile.mkstemp(prefix="streamlit-", suffix=".log")
    log = Path(log_name)
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with status {proc.returncode} before it was healthy; "
                                   f"log tail:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.status == 200 and resp.read().strip() == b"ok":
                        break
            except OSError:  # refused, reset, timed out, HTTP error: not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit not healthy at {url} after {timeout:.0f}s; log tail:\n{_tail(log)}")
            time.sleep(0.25)
        try:
            yield url
        except BaseException:
            print(f"--- streamlit log tail ({cmd[4]}) ---\n{_tail(log)}", file=sys.stderr)
            raise
    finally:
        _stop(proc)
        log.unlink(missing_ok=True)


def chromium_page(playwright: Playwright, width: int = 1400, height: int = 900) -> tuple[Browser, Page]:
    """Launch the system Chromium with CHROMIUM_ARGS; return (browser, page). The caller closes the browser."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": width, "height": height})
    return browser, page


@contextmanager
def browser_page(width: int = 1400, height: int = 900) -> Iterator[Page]:
    """require_chromium(), then yield a fresh page in a headless Chromium that is closed afterwards."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, page = chromium_page(p, width, height)
        try:
            yield page
        finally:
            browser.close()


def wait_for_app(page: Page, timeout_ms: float = 60_000) -> None:
    """Wait until the Streamlit script has finished its run (the app root reports script state "notRunning").

    Right after a widget interaction the state can still read "notRunning" before the rerun starts, so after
    clicks, wait for the expected content instead.
    """
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)
