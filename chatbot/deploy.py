"""Deploy the app to a Hugging Face Space (Gradio SDK).

    python -m chatbot.deploy --space-id USER/NAME [--private] [--dry-run]

Creates the Space if needed and uploads the app: app.py, chatbot/, safety/, adapters/ (without
checkpoints), requirements.txt, README.md (whose front matter is the Space card), LICENSE and the
Dockerfile. `--dry-run` prints exactly the files that would be uploaded, and needs no network or
token. The token comes from `hf auth login` or HF_TOKEN, never from this command line's history.

On Spaces the app reads CHATBOT_* variables (Space settings > Variables). Spaces install
requirements.txt only, so the GGUF package behind the built-in model is absent there: the app then
loads the same model from the Hub (HuggingFaceTB/SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import PROJECT_ROOT

ALLOW = ["app.py", "requirements.txt", "README.md", "LICENSE", "Dockerfile", ".dockerignore",
         "chatbot/*", "safety/*", "adapters/*"]
IGNORE = ["*/__pycache__/*", "*.pyc", "adapters/*/checkpoints/*", "*.log", ".env", "*/.DS_Store"]


def files_to_upload(folder: Path = PROJECT_ROOT) -> list[str]:
    """The paths upload_folder will send, filtered the way huggingface_hub filters them."""
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder).resolve()
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    return list(filter_repo_objects(paths, allow_patterns=ALLOW, ignore_patterns=IGNORE + DEFAULT_IGNORE_PATTERNS))


def deploy(space_id: str, private: bool = False, folder: Path = PROJECT_ROOT) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(folder), allow_patterns=ALLOW,
                      ignore_patterns=list(IGNORE), commit_message="Deploy with python -m chatbot.deploy")
    return f"https://huggingface.co/spaces/{space_id}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatbot.deploy", description=__doc__.split("\n")[0])
    p.add_argument("--space-id", required=True, help="USER/NAME of the Space (created if missing)")
    p.add_argument("--private", action="store_true", help="create the Space as private")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; upload nothing")
    args = p.parse_args(argv)
    if args.space_id.count("/") != 1 or not all(args.space_id.split("/")):
        print(f"error: --space-id must look like USER/NAME, got {args.space_id!r}", file=sys.stderr)
        return 2
    files = files_to_upload()
    if args.dry_run:
        total = sum((PROJECT_ROOT / f).stat().st_size for f in files)
        print("\n".join(files))
        print(f"# {len(files)} files, {total / 1e6:.1f} MB would be uploaded to spaces/{args.space_id}"
              f"{' (private)' if args.private else ''}", file=sys.stderr)
        return 0
    try:
        url = deploy(args.space_id, args.private)
    except Exception as exc:  # network, auth, name taken: one clear line
        print(f"error: deploying to {args.space_id} failed: {exc}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
