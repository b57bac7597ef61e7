"""The side environment of ``benchmarks/peers.py``: ``.venv-peers`` in the repository root, with the peer libraries
(eai-sparsify 1.3.3, llamascopium 2.0.0b34 and the transformer-lens < 4 it imports) beside an editable cltlab, all
installed with ``-c constraints.txt`` (torch stays pinned). Kept apart from the project's own venv: the peers pin
versions of transformers and friends that cltlab does not use."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-peers"
PEER_REQUIREMENTS = ["eai-sparsify==1.3.3", "llamascopium==2.0.0b34", "transformer-lens<4"]


def install_stamp() -> str:
    """What ``.venv-peers`` was built from: the peers and a hash of our dependency files."""
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return " ".join(PEER_REQUIREMENTS) + " " + digest.hexdigest()


def peer_python() -> Path:
    """``.venv-peers``'s python, building the environment first if it is missing or out of date."""
    python, marker = VENV / "bin" / "python", VENV / ".installed"
    if python.exists() and marker.exists() and marker.read_text() == install_stamp():
        return python
    print(f"Building {VENV.name} (the peer libraries; once, a few minutes) ...", file=sys.stderr, flush=True)
    marker.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-e", str(ROOT), *PEER_REQUIREMENTS], check=True)
    marker.write_text(install_stamp())
    return python


def in_peer_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()
