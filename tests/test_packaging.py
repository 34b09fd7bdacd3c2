"""`flwr run .` on Flower's managed local SuperLink installs nothing (pyproject [tool.uv])."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_names(doc: dict) -> set[str]:
    """Names of every requirement uv puts in its lock: the main ones and every extra."""
    reqs = list(doc["project"]["dependencies"])
    for extra in doc["project"].get("optional-dependencies", {}).values():
        reqs += extra
    return {Requirement(r).name for r in reqs}


def test_uv_excludes_exactly_the_requirements():
    doc = project()
    excluded = doc["tool"]["uv"]["exclude-dependencies"]
    assert len(excluded) == len(set(excluded))
    # A requirement added without its exclusion would make Flower's per-run `uv sync`
    # download it (torch: the CUDA build); a stale exclusion would hide a typo.
    assert set(excluded) == requirement_names(doc)


@pytest.mark.integration
def test_flowers_runtime_install_of_this_app_downloads_nothing(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, app / name)
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
        "UV_OFFLINE": "1",  # any package to fetch fails the sync instead of downloading
    }
    # Flower's own installer, as the SuperLink's simulation process calls it before any
    # app code (flwr/simulation/app.py); a child process, since it activates the env.
    code = (
        "import sys\n"
        "from flwr.supercore.superexec.dependency_installer import install_app_dependencies\n"
        "env = install_app_dependencies(sys.argv[1], run_id=1)\n"
        "print(env)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(app)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runtime_env = Path(result.stdout.strip().splitlines()[-1])
    assert runtime_env.parent == home / "runtime-envs"
    site = list(runtime_env.glob("lib/python*/site-packages"))
    assert len(site) == 1
    assert list(site[0].glob("*.dist-info")) == []  # nothing was installed into it
