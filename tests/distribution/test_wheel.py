"""The built wheel, installed without the source tree, carries everything it needs.

A fresh virtual environment gets the wheel and its core dependencies only (no
torch, no vLLM): the console scripts must run there. The connector module is
imported from the installed wheel with the project's vLLM beside it.
"""

import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, ROOT,
        cwd=out)  # fmt: skip
    (built,) = out.glob("lmc_connector-*.whl")
    return built


@pytest.fixture(scope="module")
def bare_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("bare-venv")
    venv.create(folder, with_pip=True)
    run(folder / "bin/python", "-m", "pip", "install", "-q", wheel, cwd=folder)
    yield folder


@pytest.mark.parametrize("script", ["lmc-controller", "lmcache_controller", "lmc-admin"])
def test_console_script_runs_from_the_wheel_without_torch(bare_venv: Path, script: str) -> None:
    assert "usage" in run(bare_venv / "bin" / script, "--help", cwd=bare_venv).lower()
    probe = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('vllm'))"
    assert run(bare_venv / "bin/python", "-c", probe, cwd=bare_venv).split() == ["None", "None"]


def test_connector_imports_from_the_installed_wheel(
    wheel: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    target = tmp_path_factory.mktemp("wheel-target")
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel,
        cwd=target)  # fmt: skip
    code = (
        "import lmc_connector, lmc_connector.v1 as v1, lmc_connector.ops.codecs as c;"
        "print(lmc_connector.__file__, v1.LMCConnectorV1.__name__, c.codec_names())"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = run(sys.executable, "-c", code, cwd=target, env=env)
    assert out.startswith(str(target))
    assert "LMCConnectorV1" in out and "cachegen" in out


def test_vllm_plugin_entry_point_is_declared(wheel: Path, tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        text = archive.read(name).decode()
    assert "[vllm.general_plugins]" in text
    assert "lmc-controller" in text and "lmc-admin" in text


def test_every_entry_point_is_a_thin_function_of_entrypoints(wheel: Path) -> None:
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
        text = archive.read(name).decode()
    targets = [line.split("=", 1)[1].strip() for line in text.splitlines() if "=" in line]
    assert sorted(targets) == [
        "lmc_connector.entrypoints:admin",
        "lmc_connector.entrypoints:controller",  # lmc-controller
        "lmc_connector.entrypoints:controller",  # lmcache_controller, the seed page's name
        "lmc_connector.entrypoints:vllm_plugin",
    ]


def test_lmc_admin_from_the_wheel_has_its_table_library(bare_venv: Path) -> None:
    """rich is a declared dependency: lmc-admin installs without vLLM (which also brings it)."""
    out = run(bare_venv / "bin/lmc-admin", "--version", cwd=bare_venv)
    assert out.startswith("lmc-admin 0.")
    assert run(bare_venv / "bin/python", "-c", "import rich; print('ok')", cwd=bare_venv) == "ok\n"
