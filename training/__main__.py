"""Training CLI.

    python -m training domain   --config training/recipes/smollm2-135m/domain.yaml
    python -m training sft      --config training/recipes/smollm2-135m/sft.yaml --max-steps 2
    python -m training merge    --config training/recipes/smollm2-135m/merge.yaml
    python -m training evaluate --config training/recipes/smollm2-135m/evaluate.yaml

Every recipe field is also a flag (`--output-dir`, `--learning-rate`, ...) that overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from .config import NULL, STAGES, load_config


def _flag_type(f: dataclasses.Field):
    hint = str(f.type)
    if "bool" in hint:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    if "list" in hint:
        return lambda s: [x.strip() for x in s.split(",") if x.strip()]
    if "float" in hint:
        return float
    if "int" in hint:
        return int
    return lambda s: NULL if s.lower() in ("null", "none") else s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage, cls in STAGES.items():
        p = sub.add_parser(stage, help=cls.__doc__, description=cls.__doc__)
        p.add_argument("--config", help="YAML recipe (training/recipes/...); flags override its fields.")
        p.add_argument("--log-level", default="INFO")
        for f in dataclasses.fields(cls):
            kind = "true/false" if "bool" in str(f.type) else ("a,b,c" if "list" in str(f.type) else None)
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=_flag_type(f),
                default=None,
                metavar=kind,
                help=f"{f.metadata.get('help', '')} (default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()})",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    cls = STAGES[args.stage]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    from chatbot.loading import AdapterError, ModelLoadError

    from .data import DataError

    try:
        cfg = load_config(cls, args.config, overrides)
        if args.stage == "domain":
            from .domain import run
        elif args.stage == "sft":
            from .sft import run
        elif args.stage == "merge":
            from .merge import run
        else:
            from .evaluate import run
        result = run(cfg)
    except (ValueError, FileExistsError, ModelLoadError, AdapterError) as exc:
        kind = "data error" if isinstance(exc, DataError) else "error"
        print(f"{kind}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
