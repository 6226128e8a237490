"""python -m mmkit.zoo list | build [NAMES...]"""
from __future__ import annotations

import argparse
import json
import sys

from mmkit.core.errors import MmkitError
from mmkit.zoo import ensure_model, model_folder, names, quality


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkit.zoo", description="mmkit's small pretrained models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show each model, whether it is cached, and its measured quality")
    build = sub.add_parser("build", help="build (if missing) and cache models")
    build.add_argument("names", nargs="*", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            for name in args.names or names():
                print(f"{name}: {ensure_model(name)}")
        for name in names():
            folder = model_folder(name)
            report = quality(name)
            state = "cached" if folder.is_dir() else "not built"
            print(f"{name:<18} {state:<10} {folder}  {json.dumps(report) if report else ''}")
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
