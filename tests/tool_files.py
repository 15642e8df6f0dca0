"""Running a script of tools/ as a user does, and reading the safetensors it writes."""

import os
import subprocess
import sys

from tests import DEADLOCK_GUARD_S
from tests.tiny import ROOT


def tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args],
                          capture_output=True, text=True, timeout=DEADLOCK_GUARD_S, cwd=ROOT)


def read_all(directory):
    """Every tensor of a directory's *.safetensors files, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out
