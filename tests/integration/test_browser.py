"""Workshop mode in a real browser: ``labkit notebook``, JupyterLab, Debian's chromium via Selenium.

What a participant does: start ``labkit notebook``, open the start-here notebook and
run it (it builds the testbed and draws it), open the iteration-2 notebook and run
all its cells through JupyterLab's menu (quick profile, a short load).  While the
load runs the live chart must change (two screenshots of it some seconds apart
differ), and after it the command cell shows the node's ``nf_conntrack_count``.
The sandbox then refuses a bad value in its cell and the testbed stays up.
JupyterLab, its kernels and the testbed are removed however the test ends.

Screenshots go to ``$LABKIT_SHOTS`` when set (else the test's temporary folder).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import need_program, need_root

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DURATION_S = 12  # the iteration's load: long enough to see the chart move


def _kernel_pids(ids: list[str]) -> list[int]:
    """Processes whose command line names one of these kernels' connection files."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(f"kernel-{k}.json" in cmdline for k in ids):
            pids.append(int(proc.name))
    return pids


def _parameterized(src: Path, dest: Path, **parameters) -> None:
    """The notebook with papermill's injected parameters cell, as `labkit replay` makes it."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(src)), parameters)
    nbformat.write(nb, dest)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    need_root()
    need_program("chromium", "chromedriver", "ip", "iptables", "in.tftpd", "conntrack")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    base = tmp_path_factory.mktemp("browser")
    shots = Path(os.environ.get("LABKIT_SHOTS") or base / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    books = base / "notebooks"
    books.mkdir()
    _parameterized(REPO / "notebooks" / "00-start-here.ipynb", books / "00-start-here.ipynb", profile="quick")
    _parameterized(REPO / "notebooks" / "iteration.ipynb", books / "iteration-2.ipynb",
                   iteration=2, profile="quick", duration=DURATION_S, cooldown=3)
    _parameterized(REPO / "notebooks" / "sandbox.ipynb", books / "sandbox.ipynb", duration=4)
    state = base / "state"
    settings = base / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # every cell in the page (JupyterLab otherwise leaves cells out of view out of the DOM)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    env = {**os.environ, "LABKIT_STATE_DIR": str(state), "LABKIT_RESULTS_DIR": str(base / "results"),
           "JUPYTERLAB_SETTINGS_DIR": str(base / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "lab-workspaces")}
    log = open(base / "labkit-notebook.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "labkit", "notebook", "--notebooks", str(books)],
                              stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
    driver = None
    kernels: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and url is None:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            if line.startswith("Open: "):
                url = line.split("Open: ", 1)[1].strip()
        assert url, f"labkit notebook printed no URL; its log: {(base / 'labkit-notebook.log').read_text()[-2000:]}"
        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800",
                    "--disable-gpu", f"--user-data-dir={base / 'chromium'}"):
            options.add_argument(arg)
        options.binary_location = shutil.which("chromium")
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.set_page_load_timeout(60)
        yield {"driver": driver, "url": url, "shots": shots, "base": base, "server": server, "kernels": kernels,
               "state": state, "env": env}
    finally:
        if driver is not None:
            try:
                kernels += [k["id"] for k in _api(driver, url, "kernels") or []]
            except Exception:  # the browser may be what failed; the server is stopped below anyway
                pass
            driver.quit()
        pids_before = _kernel_pids(kernels)
        server.send_signal(signal.SIGTERM)  # what Ctrl-C / a service manager does
        try:
            server.wait(60)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
            log.close()
            from labkit.testbed.netns import clean

            clean(state)
        time.sleep(1)
        left = [p for p in pids_before if Path(f"/proc/{p}").exists()]
        assert not left, f"kernels left running after labkit notebook stopped: {left}"
        assert server.returncode == 0


def _api(driver, url: str, what: str):
    """GET /api/<what> through the page (its token is in the URL)."""
    import json

    token = re.search(r"token=([0-9a-f]+)", url).group(1)
    base = url.split("/lab/")[0]
    text = driver.execute_script(
        "const r = new XMLHttpRequest(); r.open('GET', arguments[0], false); r.send(); return r.responseText;",
        f"{base}/api/{what}?token={token}")
    return json.loads(text)


def _open(lab, name: str) -> None:
    driver = lab["driver"]
    driver.get(lab["url"].replace("00-start-here.ipynb", name))
    _wait(driver, lambda d: d.find_elements("css selector", ".jp-Notebook .jp-Cell"), 60, f"{name} to open")
    _wait(driver, lambda d: _kernel_idle(d, lab["url"], name), 90, f"{name}'s kernel to start")


def _kernel_idle(driver, url: str, name: str) -> bool:
    """The notebook's own kernel (its session's) has started and is idle."""
    for session in _api(driver, url, "sessions"):
        if session.get("path", "").endswith(name) and session.get("kernel"):
            return session["kernel"].get("execution_state") == "idle"
    return False


def _wait(driver, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate(driver)
        except Exception:  # the page is still changing under the query
            value = None
        if value:
            return value
        time.sleep(0.5)
    shots = Path(os.environ.get("LABKIT_SHOTS") or "/tmp")
    driver.save_screenshot(str(shots / "timed-out.png"))
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (page: {shots / 'timed-out.png'})")


def _run_all(driver) -> None:
    """Run > Run All Cells, through JupyterLab's menu bar."""
    menu = _wait(driver, lambda d: [e for e in d.find_elements("css selector", ".lm-MenuBar-itemLabel")
                                    if e.text == "Run"], 30, "the Run menu")
    menu[0].click()
    item = _wait(driver, lambda d: [e for e in d.find_elements("css selector", ".lm-Menu-itemLabel")
                                    if e.text == "Run All Cells"], 30, "Run All Cells")
    item[0].click()


def _cell_with(driver, source_part: str):
    for cell in driver.find_elements("css selector", ".jp-Notebook .jp-CodeCell"):
        if source_part in cell.find_element("css selector", ".jp-InputArea").text:
            return cell
    return None


def _output_text(driver, source_part: str) -> str:
    cell = _cell_with(driver, source_part)
    return cell.find_element("css selector", ".jp-OutputArea").text if cell is not None else ""


def _shot(driver, element, path: Path) -> bytes:
    """A screenshot of ``element`` (or of what ``element()`` finds: a chart replaced while we look)."""
    for _ in range(10):
        try:
            found = element() if callable(element) else element
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", found)
            time.sleep(0.3)
            data = found.screenshot_as_png
            path.write_bytes(data)
            return data
        except Exception:  # stale: the live chart was redrawn between finding and shooting it
            if not callable(element):
                raise
            time.sleep(0.2)
    raise AssertionError(f"could not take {path.name}")


def test_start_here_builds_the_testbed_and_draws_it(lab):
    driver = lab["driver"]
    _open(lab, "00-start-here.ipynb")
    _run_all(driver)
    picture = _wait(driver, lambda d: (c := _cell_with(d, "workshop.picture(status)")) is not None
                    and c.find_elements("css selector", ".jp-OutputArea img") and c, 360, "the testbed picture (up waits while another lab run holds the global sysctls)")
    count = _wait(driver, lambda d: re.search(r"\[node\]# cat /proc/sys/net/netfilter/nf_conntrack_count\s+(\d+)",
                                              _output_text(d, 'lab.sh("node"')), 60, "the node's count")
    assert int(count.group(1)) >= 0
    steps = _wait(driver, lambda d: "iteration = 9" in _output_text(d, "workshop.steps(profile)"), 30, "the steps")
    assert steps
    driver.save_screenshot(str(lab["shots"] / "start-here-page.png"))
    assert "Jupyter news" not in driver.find_element("tag name", "body").text  # no pop-up over the lab
    _shot(driver, picture, lab["shots"] / "start-here-testbed.png")
    status = subprocess.run([sys.executable, "-m", "labkit", "status", "--json"], env=lab["env"],
                            capture_output=True, text=True, check=True).stdout
    assert '"state": "up"' in status and '"iteration": 2' in status


def test_iteration_2_runs_in_jupyterlab_with_a_live_chart_and_the_articles_commands(lab):
    driver = lab["driver"]
    _open(lab, "iteration-2.ipynb")
    _run_all(driver)
    run_cell = _wait(driver, lambda d: _cell_with(d, "lab.run(live=live)"), 60, "the run cell")
    _wait(driver, lambda d: run_cell.find_elements("css selector", ".jp-OutputArea img"), 90, "the live chart")
    image = lambda: run_cell.find_elements("css selector", ".jp-OutputArea img")[0]  # noqa: E731
    started = time.monotonic()
    first = _shot(driver, image, lab["shots"] / "live-1.png")
    time.sleep(4)
    second = _shot(driver, image, lab["shots"] / "live-2.png")
    assert first != second, "the live chart did not change in 4 s of load"
    time.sleep(3)
    driver.save_screenshot(str(lab["shots"] / "live-midload-page.png"))
    _shot(driver, image, lab["shots"] / "live-3.png")
    assert time.monotonic() - started < DURATION_S + 20
    count = _wait(driver, lambda d: re.search(r"\[node\]# cat /proc/sys/net/netfilter/nf_conntrack_count\s+(\d+)",
                                              _output_text(d, '"cat /proc/sys/net/netfilter/nf_conntrack_count"')),
                  120, "the node's nf_conntrack_count after the load")
    assert int(count.group(1)) > 0, "the node tracks the load's entries right after it"
    check = _wait(driver, lambda d: "finding F1" in _output_text(d, "lab.check(prediction)"), 120, "the check")
    assert check
    driver.save_screenshot(str(lab["shots"] / "iteration-2-end.png"))
    # the pages a participant reads: the set-up's commands, the commands after the load, the check
    for name, cell in (("iteration-2-setup", "lab.sysctl_w()"), ("iteration-2-pod", "lab.pod_sysctls()"),
                       ("iteration-2-commands", '"cat /proc/sys/net/netfilter/nf_conntrack_count"'),
                       ("iteration-2-check", "lab.check(prediction)")):
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", _cell_with(driver, cell))
        time.sleep(0.5)
        driver.save_screenshot(str(lab["shots"] / f"{name}.png"))


def test_sandbox_refuses_a_bad_value_in_its_cell_and_the_testbed_stays_up(lab):
    driver = lab["driver"]
    _open(lab, "sandbox.ipynb")
    _run_all(driver)
    refused = _wait(driver, lambda d: "refused before anything changed" in
                    _output_text(d, '"conntrack_max": -5') and _cell_with(d, '"conntrack_max": -5'),
                    180, "the sandbox's refusal")
    text = _output_text(driver, '"conntrack_max": -5')
    assert "ScenarioError" in text and "conntrack_max" in text and "up" in text
    forbidden = _wait(driver, lambda d: "SysctlForbidden" in _output_text(d, '"allow_unsafe_sysctls": False'),
                      60, "the kubelet's refusal")
    assert forbidden
    _shot(driver, refused, lab["shots"] / "sandbox-bad-value.png")
    # the testbed is still up, with the max it had: the refusals changed nothing
    after = _wait(driver, lambda d: re.search(r"\[node\]# cat .*\n(\d+)\n(\d+)",
                                              _output_text(d, 'sb.session.sh("node"')), 60, "the node after")
    assert int(after.group(2)) == 4096
    driver.save_screenshot(str(lab["shots"] / "sandbox-page.png"))
    # the sliders render (JupyterLab's widget manager is installed with ipywidgets)
    widgets = _wait(driver, lambda d: (c := _cell_with(d, "sb.widgets(**values)")) is not None
                    and c.find_elements("css selector", ".jp-OutputArea .widget-slider") and c, 60, "the sliders")
    assert "run the load" in widgets.find_element("css selector", ".jp-OutputArea").text
    _shot(driver, widgets, lab["shots"] / "sandbox-widgets.png")
