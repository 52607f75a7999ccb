#!/usr/bin/env python3
"""Strip outputs and volatile metadata from source notebooks; keep cell tags.

Source notebooks are committed clean: executed copies are build outputs.
Usage: python tools/nbclean.py notebooks/*.ipynb        (rewrite in place)
       python tools/nbclean.py --check notebooks/*.ipynb (exit 1 if any is dirty)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEEP_CELL_METADATA = {"tags"}
KEEP_NB_METADATA = {"kernelspec", "language_info"}


def clean(nb: dict) -> dict:
    nb = json.loads(json.dumps(nb))
    nb["metadata"] = {k: v for k, v in nb.get("metadata", {}).items() if k in KEEP_NB_METADATA}
    if "language_info" in nb["metadata"]:
        nb["metadata"]["language_info"] = {"name": nb["metadata"]["language_info"].get("name", "python")}
    for cell in nb.get("cells", []):
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in KEEP_CELL_METADATA}
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def dump(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report dirty notebooks, change nothing")
    ap.add_argument("notebooks", nargs="+", type=Path)
    args = ap.parse_args(argv)
    dirty = []
    for path in args.notebooks:
        text = path.read_text(encoding="utf-8")
        nb = json.loads(text)
        tagged = any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.get("cells", []))
        if not tagged:
            print(f"{path}: no cell is tagged 'parameters' (papermill could not set parameters)")
            dirty.append(path)
        new = dump(clean(nb))
        if new != text:
            if args.check:
                print(f"{path}: has outputs or volatile metadata; run python tools/nbclean.py {path}")
                dirty.append(path)
            else:
                path.write_text(new, encoding="utf-8")
                print(f"cleaned {path}")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
