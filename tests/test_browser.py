"""The Prefect and MLflow UIs in headless Chromium: a custom run of the
on-demand deployment, then its model.

A person's path through the UIs served by ``make serve``: Deployments >
latentflow-on-demand > Run > Custom run, where the config is grouped (Data,
Model, Policy, Execution); fill in the input file and change ``latent_dim`` to
2, Submit; the served runner executes the run; the flow-run page shows it
Completed; the MLflow UI shows the registered model with its ``champion``
alias. Screenshots of the form, the flow-run page and the model page are saved
under the test's tmp dir (and copied to ``$LATENTFLOW_SCREENSHOT_DIR`` when
set: ``docs/img`` holds the ones the README shows).

Needs the Debian ``chromium`` package and the ``playwright`` Python package (no
browser download: the system Chromium is used); skipped when either is missing.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_deployments import RUN_TIMEOUT, ServeStack

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
UI_TIMEOUT_MS = 30_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sync_playwright() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def stack(
    sync_playwright: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeStack]:
    s = ServeStack(tmp_path_factory.mktemp("serve-ui")).start()
    try:
        yield s
    finally:
        s.stop()


def _label_xpath(label: str) -> str:
    """Prefect's schema form renders each field, and each nested model (a group),
    as a ``schema-form-property`` block whose label reads ``<Title>`` or
    ``<Title> (Optional)``."""
    return (
        "xpath=//span[contains(@class, 'schema-form-property__label') and"
        f" (normalize-space()='{label}' or normalize-space()='{label} (Optional)')]"
    )


def _field(page: Any, label: str) -> Any:
    """The input of a parameter-form field, found by its visible label."""
    xpath = (
        _label_xpath(label)
        + "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '),"
        " ' schema-form-property ')][1]//*[self::textarea or self::input][1]"
    )
    loc = page.locator(xpath)
    loc.wait_for(timeout=UI_TIMEOUT_MS)
    return loc


def _on_demand_runs(stack: ServeStack) -> list[dict[str, Any]]:
    from deployments.definitions import ON_DEMAND

    return stack.post(
        "/flow_runs/filter",
        {"deployments": {"name": {"any_": [ON_DEMAND]}}, "limit": 50},
    )


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _group(page: Any, title: str) -> Any:
    """A config section's group in the form, found by its visible title."""
    loc = page.locator(_label_xpath(title)).first
    loc.wait_for(timeout=UI_TIMEOUT_MS)
    return loc


def test_custom_run_from_the_ui(stack, sync_playwright, tmp_path):
    import pyarrow.parquet as pq

    from deployments.definitions import ON_DEMAND
    from flows.config import lift_flat

    assert not _on_demand_runs(stack)
    form_shot = tmp_path / "prefect-run-form.png"
    shot = tmp_path / "prefect-flow-run.png"
    model_shot = tmp_path / "mlflow-model.png"
    t0 = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            console: list[str] = []
            page.on("console", lambda msg: console.append(msg.text))

            page.goto(f"{stack.url}/deployments", wait_until="networkidle")
            page.get_by_role("link", name=ON_DEMAND, exact=True).click()
            page.wait_for_url("**/deployments/deployment/**")
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run", exact=True).click()
            page.wait_for_url("**/run**")

            # The config is drawn in its groups, data first.
            heads = [_group(page, t) for t in ("Data", "Model", "Policy", "Execution")]
            tops = [h.bounding_box()["y"] for h in heads]
            assert tops == sorted(tops), tops
            # The deployment's defaults are in the form (data_dir); input is not.
            assert _field(page, "Data Dir").input_value() == str(stack.data_dir)
            _field(page, "Input").fill(str(stack.csv))
            _field(page, "Latent Dim").fill("2")
            page.screenshot(path=str(form_shot))
            page.get_by_role("button", name="Submit", exact=True).click()

            (created,) = _wait_for(
                lambda: _on_demand_runs(stack), 30, "the flow run the form creates"
            )
            run_id = created["id"]

            def finished() -> dict[str, Any] | None:
                (run,) = _on_demand_runs(stack)
                final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                return run if run["state_type"] in final else None

            run = _wait_for(finished, RUN_TIMEOUT, f"flow run {run_id} to finish")
            assert run["state_type"] == "COMPLETED", f"{run['state']}\n{stack.logs()}"

            # What the person sees: the run's own page says Completed.
            page.goto(f"{stack.url}/runs/flow-run/{run_id}", wait_until="networkidle")
            page.get_by_text("Completed", exact=True).first.wait_for()
            page.get_by_text(run["name"]).first.wait_for()
            page.screenshot(path=str(shot))

            # The Task Runs tab lists the run's tasks (task inputs that named a
            # subflow's result left it empty: "Invalid TaskInputResponse").
            page.goto(
                f"{stack.url}/runs/flow-run/{run_id}?tab=Task+Runs",
                wait_until="networkidle",
            )
            for step in ("ingest", "decide", "score", "summarize"):
                page.get_by_text(f"{step}-{run['name']}").first.wait_for()
            assert not [m for m in console if "Invalid TaskInputResponse" in m]

            # The model it registered, in the MLflow UI: version 1, champion.
            # MLflow's UI keeps polling, so the network never goes idle: wait
            # for the page's own text instead.
            page.goto(
                f"http://127.0.0.1:{stack.mlflow_port}/#/models/weatheraus-autoencoder",
                wait_until="domcontentloaded",
                timeout=4 * UI_TIMEOUT_MS,
            )
            page.get_by_text("champion").first.wait_for(timeout=4 * UI_TIMEOUT_MS)
            page.get_by_text("Version 1").first.wait_for(timeout=4 * UI_TIMEOUT_MS)
            page.screenshot(path=str(model_shot))
        finally:
            browser.close()
    print(f"\nUI run {run['name']} completed in {time.monotonic() - t0:.1f}s")
    copy_dir = os.environ.get("LATENTFLOW_SCREENSHOT_DIR")
    for png in (form_shot, shot, model_shot):
        assert png.stat().st_size > 10_000
        print(f"screenshot: {png}")
        if copy_dir:
            Path(copy_dir).mkdir(parents=True, exist_ok=True)
            print(f"screenshot copy: {shutil.copy2(png, copy_dir)}")

    # The form sends the config in its sections.
    config = lift_flat(run["parameters"]["config"])
    assert config["model"]["latent_dim"] == 2
    assert config["data"]["input"] == str(stack.csv)
    # The changed parameter reached the model: two latent columns, not eight.
    files = sorted(
        (stack.data_dir / "latent" / "weatheraus").glob("run_date=*/*.parquet")
    )
    assert files, f"no latent outputs under {stack.data_dir}"
    names = pq.read_schema(files[0]).names
    assert "latent_1" in names and "latent_2" not in names
