"""JupyterLab in a real browser (Debian's headless Chromium, driven by Selenium): a notebook on a
kernelspec whose profile has a warm pool runs a cell, and its output is read from the page.

Chromium is kept on loopback: every other host goes to a closed proxy port and no name is
resolved, and its background services are off.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from localcluster.servers import OperatorProcess
from remote_kernel_provisioner.cli import main as spec_cli

from .conftest import _notes, _timings
from .test_jupyter import JupyterServer
from .test_operator_ssh import GROUP, PLURAL, VERSION
from .test_pools import make_pool, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SCREENSHOTS = Path(__file__).resolve().parents[2] / ".cache" / "screenshots"


def chromium_options() -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in the suite; the page is our own server's
        "--disable-gpu",
        "--window-size=1400,900",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--disable-extensions",
        "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication",
        # Loopback only: anything else goes to a closed port, and no name is looked up.
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1;localhost",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost",
    ):
        options.add_argument(arg)
    return options


@pytest.fixture
def lab(
    operator: OperatorProcess, api_client: client.ApiClient, kubeconfig: Path, namespace: str, tmp_path: Path
) -> Iterator[JupyterServer]:
    from tests.profiles import ensure_profile

    ensure_profile(api_client, {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}, name="pool-ssh")
    prefix = tmp_path / "prefix"
    args = [
        "install",
        "--prefix",
        str(prefix),
        "--kernel-name",
        "pooled-python",
        "--display-name",
        "Python (warm pool)",
    ]
    assert spec_cli([*args, "--namespace", namespace, "--profile", "pool-ssh"]) == 0
    env = {
        **os.environ,
        "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "KUBECONFIG": str(kubeconfig),
        "KERNEL_USERNAME": "alice",
        "JUPYTER_SERVER_NAME": f"lab-{uuid.uuid4().hex[:8]}",
    }
    server = JupyterServer(
        env,
        tmp_path / "lab",
        app="jupyterlab",
        extra_args=(
            # Nothing leaves the machine: no extension index, no news, no update check.
            "--LabApp.extension_manager=readonly",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ),
    )
    server.root.mkdir(parents=True)
    notebook = {
        "cells": [
            {"cell_type": "code", "metadata": {}, "source": "", "outputs": [], "execution_count": None}
        ],
        "metadata": {
            "kernelspec": {
                "name": "pooled-python",
                "display_name": "Python (warm pool)",
                "language": "python",
            }
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (server.root / "warm.ipynb").write_text(json.dumps(notebook))
    server.start()
    yield server
    for kernel in server.api("GET", "/api/kernels").json():
        server.api("DELETE", f"/api/kernels/{kernel['id']}")
    server.stop()


def test_a_notebook_in_jupyterlab_runs_a_cell_on_a_pooled_kernel(
    lab: JupyterServer, custom: client.CustomObjectsApi, namespace: str
) -> None:
    make_pool(custom, namespace, replicas=1)
    wait_ready(custom, namespace, 1)
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=chromium_options()
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "jupyterlab-warm-pool.png"
    try:
        opened = time.monotonic()
        driver.get(f"{lab.url}/lab/tree/warm.ipynb?token={lab.token}")
        wait = WebDriverWait(driver, 90)
        editor = wait.until(
            ec.element_to_be_clickable((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell .cm-content"))
        )
        # The kernel is up (claimed from the pool) once the notebook's session says so: the
        # status bar names the kernel and "Idle" (the toolbar's indicator can read idle before
        # the session is connected, and a cell run then is dropped).
        wait.until(
            lambda d: any(
                "Python (warm pool) | Idle" in e.text
                for e in d.find_elements(By.CSS_SELECTOR, ".jp-StatusBar-Widget .jp-StatusBar-TextItem")
            )
        )
        open_to_idle = time.monotonic() - opened
        editor.click()
        editor.send_keys("import os; print(os.environ['KERNEL_USERNAME'], 6 * 7)")
        clicked = time.monotonic()
        editor.send_keys(Keys.CONTROL, Keys.ENTER)  # run in place: the cell stays selected
        output = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-Cell .jp-OutputArea-output"))
        )
        wait.until(lambda d: "42" in output.text)
        click_to_output = time.monotonic() - clicked
        assert output.text.split() == ["alice", "42"], output.text
    finally:
        driver.save_screenshot(str(shot))
        driver.quit()
    print(f"JupyterLab click-to-output on a pooled kernel: {click_to_output:.3f} s; screenshot: {shot}")
    _timings["JupyterLab, pooled kernel: notebook opened -> kernel idle (s)"] = open_to_idle
    _timings["JupyterLab, pooled kernel: Ctrl+Enter -> output on the page (s)"] = click_to_output
    _notes.append(f"JupyterLab screenshot (kept out of git): {shot}")
    kernels: list[dict[str, Any]] = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
        "items"
    ]
    claimed = [k for k in kernels if (k.get("status") or {}).get("reason") == "ClaimedFromPool"]
    assert len(claimed) == 1, [
        (k["metadata"]["name"], (k.get("status") or {}).get("reason")) for k in kernels
    ]
