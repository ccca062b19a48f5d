"""The controller, the admin client and the wire import nothing heavy: no torch, vllm or cache."""

from __future__ import annotations

import subprocess
import sys

from tests.control.harness import ROOT

PROBE = """
import importlib, pkgutil, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "vllm") or name.startswith("lmc_connector.cache"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
imported = []
for package in ("lmc_connector.control.controller", "lmc_connector.control.admin",
                "lmc_connector.control.wire"):
    module = importlib.import_module(package)
    imported.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
            imported.append(info.name)
print("\\n".join(imported))
"""


def test_controller_admin_and_wire_import_without_torch_vllm_or_the_cache() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    imported = probe.stdout.split()
    assert "lmc_connector.control.controller.http.app" in imported
    assert "lmc_connector.control.admin.cli" in imported
    assert "lmc_connector.control.wire.rpc" in imported
