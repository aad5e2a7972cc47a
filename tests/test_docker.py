"""Docker files are linted (no container engine runs on the build machines)."""

import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("*Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    exe = shutil.which("hadolint")
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
