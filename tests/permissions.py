"""Run a command as an ordinary user meets file permissions.

The tests run as root, and root reads every file and lists every folder whatever its mode
(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so ``chmod 000`` proves nothing in-process.
``ordinary_user(tmp_path)`` returns a command prefix that runs a subprocess without that
override: root with the two capabilities dropped (util-linux ``setpriv``, else libcap's
``capsh``), or the user ``nobody``. Each way is first tried on a file of ``tmp_path`` (readable)
and one it must not read; the first that behaves is used. The test is skipped, with the reason,
only where none does (no such tool, or a container that forbids dropping capabilities).
Not root: no prefix, permissions already apply.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """import sys
open(sys.argv[1]).read()
try:
    open(sys.argv[2])
except PermissionError:
    sys.exit(0)
sys.exit(3)
"""


def _candidates() -> list[tuple[str, list[str]]]:
    ways = []
    if setpriv := shutil.which("setpriv"):
        drop = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
        ways.append(("setpriv without CAP_DAC_OVERRIDE", drop))
        ways.append(("setpriv as nobody", [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]))
    if capsh := shutil.which("capsh"):
        # capsh runs bash after "--": exec the command given after it
        ways.append(
            (
                "capsh without CAP_DAC_OVERRIDE",
                [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", 'exec "$0" "$@"'],
            )
        )
    return ways


def ordinary_user(tmp_path: Path) -> list[str]:
    """A command prefix under which file permissions apply (see the module's docstring)."""
    if os.geteuid() != 0:
        return []
    probe = Path(tmp_path) / "permission-probe"
    probe.mkdir(exist_ok=True)
    (probe / "readable").write_text("ok")
    denied = probe / "denied"
    denied.write_text("secret")
    denied.chmod(0)
    tried = []
    for name, prefix in _candidates():
        done = subprocess.run(
            [*prefix, sys.executable, "-c", _PROBE, str(probe / "readable"), str(denied)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode == 0:
            return prefix
        tried.append(f"{name}: exit {done.returncode} {done.stderr.strip()[-200:]}")
    if not tried:
        pytest.skip("neither setpriv (util-linux) nor capsh (libcap) is here: root cannot drop its permission override")
    pytest.skip("no way to run without root's permission override works here (" + "; ".join(tried) + ")")
