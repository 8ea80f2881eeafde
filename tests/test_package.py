"""The package installs with Python alone (issue 12): the chat page ships built inside it.

The build in sse_gateway/static is committed; these tests check that it is what templates/
builds to, that the sdist and the wheel made from it carry it, and that the wheel, installed
in a fresh virtualenv with no Node.js on PATH, serves a page that works.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from chat_page import ask, open_page, shown, wait_state

from sse_gateway.page import PAGE_DIR

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "templates"


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run(*argv: str, **options) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, check=False, capture_output=True, text=True, **options)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}"
    return result


async def test_the_shipped_page_is_what_its_sources_build_to(tmp_path):
    """Change templates/ without `make page`, and this fails: the wheel would ship a stale page."""
    assert (TEMPLATES / "node_modules" / ".bin" / "vite").exists(), "npm packages missing: run `make test` (npm ci)"
    out = tmp_path / "page"
    await asyncio.to_thread(run, "npx", "--no-install", "vite", "build", "--outDir", str(out), "--emptyOutDir",
                            "--logLevel", "warn", cwd=TEMPLATES)
    built, shipped = files_under(out), files_under(PAGE_DIR)
    assert sorted(built) == sorted(shipped), "run `make page` and commit sse_gateway/static"
    stale = [name for name in built if built[name] != shipped[name]]
    assert stale == [], "run `make page` and commit sse_gateway/static"


def page_files(names: list[str], prefix: str = "") -> set[str]:
    """The page's files in a listing of an archive's files, relative to the package's static folder."""
    marker = f"{prefix}sse_gateway/static/"
    return {name[len(marker):] for name in names if name.startswith(marker)}


@pytest.fixture
def clone(tmp_path) -> Path:
    """A copy of the repository as a fresh clone has it: no virtualenv, no node_modules."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    source = tmp_path / "source"
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    assert not (source / "templates" / "node_modules").exists()
    return source


def without_node(folder: Path, *commands: str) -> dict[str, str]:
    """An environment whose PATH is `folder` with only `commands` linked in from the system
    (`python3`: the interpreter running the tests, not a version manager's shim)."""
    folder.mkdir(exist_ok=True)
    for command in commands:
        target = os.path.realpath(sys._base_executable) if command == "python3" else shutil.which(command)
        (folder / command).symlink_to(target)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = str(folder)
    assert shutil.which("node", path=env["PATH"]) is None and shutil.which("npm", path=env["PATH"]) is None
    return env


async def serves_the_page(server, http, browser) -> None:
    url = (await server.wait_for_line(r"listening on (http://[\d.]+:\d+)", timeout=300)).group(1)
    page = await http.get(f"{url}/")
    assert page.status == 200
    html = await page.text()
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        assert (await http.get(f"{url}{asset}")).status == 200
    browser_page = await open_page(browser, url)
    await ask(browser_page, "served without Node.js")
    await wait_state(browser_page, "done")
    assert await shown(browser_page) == "served without Node.js"
    await browser_page.context.close()


@pytest.mark.timeout(600)
async def test_make_run_on_a_fresh_clone_needs_no_node(clone, tmp_path, programs, browser, http):
    env = without_node(tmp_path / "bin", "make", "sh", "python3", "touch")
    server = await programs("make", "-C", str(clone), "run", "PORT=0", "ARGS=--mock-token-delay=0", env=env)
    await serves_the_page(server, http, browser)
    assert not (clone / "templates" / "node_modules").exists()  # nothing was built
    gateway = int(run("pgrep", "-P", str(server.proc.pid)).stdout.split()[0])  # make's child: the gateway
    os.kill(gateway, signal.SIGTERM)
    assert await server.stop(sig=None) == 0  # it stopped cleanly, and make with it


@pytest.mark.timeout(600)
async def test_the_wheel_serves_the_page_without_node(clone, tmp_path, programs, browser, http):
    source = clone
    # The sdist first, then the wheel from the sdist: what pip does with a source release.
    dist = tmp_path / "dist"
    await asyncio.to_thread(run, sys.executable, "-m", "build", "--outdir", str(dist), str(source))
    [sdist] = dist.glob("*.tar.gz")
    [wheel] = dist.glob("*.whl")
    expected = set(files_under(PAGE_DIR))
    with tarfile.open(sdist) as archive:
        names = [member.name for member in archive.getmembers() if member.isfile()]
        root = names[0].split("/")[0]
        assert page_files(names, f"{root}/") == expected
    with zipfile.ZipFile(wheel) as archive:
        assert page_files([name for name in archive.namelist() if not name.endswith("/")]) == expected

    # A fresh virtualenv, and a PATH on which there is no Node.js.
    venv = tmp_path / "venv"
    await asyncio.to_thread(run, sys.executable, "-m", "venv", str(venv))
    env = without_node(tmp_path / "bin")
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    await asyncio.to_thread(run, str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                            str(wheel), env=env, cwd=tmp_path)
    # `sse-gateway` from the wheel (run from outside the repository) serves the page.
    server = await programs(str(venv / "bin" / "sse-gateway"), "--port=0", "--mock-token-delay=0", env=env)
    await serves_the_page(server, http, browser)
    assert await server.stop() == 0
