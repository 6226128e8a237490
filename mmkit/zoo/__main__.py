"""python -m mmkit.zoo list | build [--from-scratch] [--check] [NAMES...] | ship NAMES..."""
from __future__ import annotations

import argparse
import json
import sys

from mmkit.core.errors import ConfigError, MmkitError
from mmkit.zoo import BUILDERS, ensure_built, ensure_model, names, present, quality, shipped
from mmkit.zoo.shipping import quality_differences, ship, shipped_folder


def _check(name: str) -> bool:
    """Compare the rebuilt ``name``'s quality report with the shipped one; say how it went."""
    shipped_copy = shipped_folder(name, BUILDERS[name].version)
    if shipped_copy is None:
        print(f"{name}: check FAILED: the package ships no {name}-v{BUILDERS[name].version} to compare with")
        return False
    rebuilt_report = json.loads((ensure_built(name) / "quality.json").read_text())
    differences = quality_differences(json.loads((shipped_copy / "quality.json").read_text()), rebuilt_report)
    if differences:
        print(f"{name}: check FAILED, the rebuilt quality report differs from the shipped one:")
        for difference in differences:
            print(f"  {difference}")
        return False
    print(f"{name}: check passed, the rebuilt quality report matches the shipped one")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkit.zoo", description="mmkit's small pretrained models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show each model, where it comes from (shipped or cached), and its measured quality")
    build = sub.add_parser("build", help="make models available: shipped ones as they are, others built and cached")
    build.add_argument("names", nargs="*", default=None)
    build.add_argument("--from-scratch", action="store_true",
                       help="build from the recipe even where the package ships the model")
    build.add_argument("--check", action="store_true",
                       help="build from scratch and compare each quality report with the shipped one (exit 1 if any differs)")
    ship_parser = sub.add_parser("ship", help="(maintainers) copy the build from the recipe (built now if not cached) into the package, with sha256")
    ship_parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    try:
        unknown = [name for name in dict.fromkeys(getattr(args, "names", None) or []) if name not in BUILDERS]
        if unknown:
            raise ConfigError(f"unknown zoo model{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                              f"available: {', '.join(names())}")
        if args.command == "build":
            chosen = args.names or names()
            if args.check:
                passed = [_check(name) for name in chosen]  # every model is checked, even after a failure
                return 0 if all(passed) else 1
            for name in chosen:
                print(f"{name}: {ensure_built(name) if args.from_scratch else ensure_model(name)}")
        if args.command == "ship":
            for name in args.names:
                print(f"{name}: shipped in {ship(ensure_built(name), name, BUILDERS[name].version)}")
            return 0
        for name in names():
            folder = present(name)
            state = "not built" if folder is None else "shipped" if folder == shipped(name) else "cached"
            report = quality(name)
            print(f"{name:<18} {state:<10} {folder or ''}  {json.dumps(report) if report else ''}")
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
