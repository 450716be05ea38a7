"""`tracin review` end to end in headless Chromium (Debian's chromium and chromedriver, driven by
Selenium; no browser download): review 20 suspects with the keyboard, kill -9 the server, start
it again, and check the page, the decisions file and the export. Screenshots of every page go to
``screenshots/review/`` (git-ignored) to be looked at."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import tracin  # noqa: E402
from test_review import build_review_store  # noqa: E402
from tracin.cli._app import app  # noqa: E402

SHOTS = Path(__file__).resolve().parent.parent / "screenshots" / "review"


def browser_paths() -> tuple[str, str] | None:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chrome, driver) if chrome and driver else None


def start_server(spec: Path, store: Path) -> tuple[subprocess.Popen[str], str]:
    """``tracin review`` in a subprocess; returns it and the URL it printed (with the token)."""
    env = {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracin", "review", str(store), "--spec", str(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        found = re.search(r"(http://127\.0\.0\.1:\d+/\?token=[\w-]+)", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the server printed no URL:\n" + "".join(seen))


@pytest.fixture
def chrome(tmp_path):
    paths = browser_paths()
    if paths is None:
        pytest.skip("chromium and chromedriver are not installed (CI installs them)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = paths[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1300,1000", f"--user-data-dir={tmp_path / 'chrome'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def rows(driver) -> list[int]:
    return [
        int(e.get_attribute("data-row")) for e in driver.find_elements(By.CSS_SELECTOR, "tr.item")
    ]


def selected(driver) -> int:
    return int(driver.find_element(By.CSS_SELECTOR, "tr.item.selected").get_attribute("data-row"))


def badge(driver, row: int) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-row="{row}"] .badge').text


def test_review_twenty_suspects_by_keyboard_kill_restart_and_export(chrome, tmp_path):
    spec, store = build_review_store(tmp_path / "review")
    proc, url = start_server(spec, store)
    try:
        chrome.get(url)
        wait = WebDriverWait(chrome, 20, poll_frequency=0.05)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.item.selected"))
        assert "token" not in chrome.current_url  # moved into a cookie
        listed = rows(chrome)
        assert len(listed) == 24 and selected(chrome) == listed[0]
        shot(chrome, "1-suspects")
        body = chrome.find_element(By.TAG_NAME, "body")
        keys = ["a", "x", "3", "a", "a", "x", "7", "a", "0", "x"] * 2  # keep, remove, relabel
        expected = {"a": "kept", "x": "removed"}
        for i, key in enumerate(keys):
            assert selected(chrome) == listed[i]
            body.send_keys(key)
            want = expected.get(key, f"relabel \u2192 {key}")
            wait.until(lambda d, r=listed[i], w=want: badge(d, r) == w)
            wait.until(lambda d, j=i: selected(d) == listed[j + 1])  # moved on by itself
        body.send_keys("k")  # previous, then next: the selection moves, nothing is decided
        assert selected(chrome) == listed[19]
        body.send_keys("j")
        assert selected(chrome) == listed[20]
        wait.until(lambda d: "20 of 300 rows decided" in d.find_element(By.ID, "progress").text)
        shot(chrome, "2-suspects-decided")

        body.send_keys("\n")  # open the selected suspect's page
        wait.until(lambda d: "/example/train/" in d.current_url)
        assert "Proponents (cosine)" in chrome.page_source
        assert len(chrome.find_elements(By.CSS_SELECTOR, "a.card img")) >= 16
        shot(chrome, "3-example")
        chrome.find_element(By.ID, "raw").click()
        wait.until(lambda d: "Proponents (tracin)" in d.page_source)
        shot(chrome, "4-example-raw")
        chrome.get(url.split("?")[0] + "queries/test")
        assert len(chrome.find_elements(By.CSS_SELECTOR, "a.card")) == 20
        shot(chrome, "5-queries")
        chrome.find_elements(By.CSS_SELECTOR, "a.card")[0].click()
        wait.until(lambda d: "/example/test/0" in d.current_url)
        shot(chrome, "6-query-example")
    finally:
        proc.send_signal(signal.SIGKILL)  # killed mid-review: no clean shutdown
        proc.wait(10)

    lines = [json.loads(ln) for ln in (store / "decisions.jsonl").read_text().splitlines()]
    assert [ln["row"] for ln in lines] == listed[:20]
    kinds = {"a": "keep", "x": "remove"}
    assert [ln["decision"] for ln in lines] == [kinds.get(k, "relabel") for k in keys]
    assert [ln["label"] for ln in lines if ln["decision"] == "relabel"] == [3, 7, 0, 3, 7, 0]

    proc, url = start_server(spec, store)  # a new port and token
    try:
        chrome.delete_all_cookies()
        chrome.get(url)
        wait = WebDriverWait(chrome, 20, poll_frequency=0.05)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.item.selected"))
        assert rows(chrome) == listed and selected(chrome) == listed[20]  # resumes
        for i, key in enumerate(keys):
            assert badge(chrome, listed[i]) == expected.get(key, f"relabel \u2192 {key}")
        assert badge(chrome, listed[20]) == ""
        shot(chrome, "7-after-restart")
        # a second tab decides; the first tab's list shows it without a reload
        first = chrome.current_window_handle
        chrome.switch_to.new_window("tab")
        chrome.get(url.split("?")[0])
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.item.selected"))
        chrome.find_element(By.TAG_NAME, "body").send_keys("x")
        wait.until(lambda d: badge(d, listed[20]) == "removed")
        chrome.switch_to.window(first)
        wait.until(lambda d: badge(d, listed[20]) == "removed")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    out = tmp_path / "fixed.csv"
    res = CliRunner().invoke(app, ["review", str(store), "--export", str(out)])
    assert res.exit_code == 0, res.output
    table = list(csv.DictReader(out.open()))
    assert [int(r["row"]) for r in table] == sorted(listed[:21])
    given = torch_labels(spec)
    for r in table:
        assert int(r["given_label"]) == given[int(r["row"])]
    fixed = tracin.apply_decisions(store, given)
    removed = {int(r["row"]) for r in table if r["decision"] == "remove"}
    assert set(range(300)) - set(fixed.kept.tolist()) == removed and len(removed) == 7


def torch_labels(spec: Path) -> list[int]:
    import torch

    return torch.load(spec.parent / "data.pt", weights_only=True)[1].tolist()
