"""Write the tables of a results page into a JSON file beside it.

For pages whose run folders are no longer in the workspace (docs/results/generative.md: the
``runs/`` folders of issue 5 are not committed), the measured numbers are kept as data: every
Markdown table of the page, under the heading it stands in, one dict per row, numbers parsed
where a cell is a plain number.

Usage: python benchmarks/doc_tables.py docs/results/generative.md   # -> generative.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _value(cell: str) -> object:
    text = cell.strip().strip("*`").strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return cell.strip()


def tables(markdown: str) -> list[dict]:
    """Every table of ``markdown``: {"section", "columns", "rows"}."""
    out: list[dict] = []
    section, block = "", []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("|"):
            block.append([c for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            columns = [c.strip() for c in block[0]]
            # block[1] is the |---| separator
            rows = [dict(zip(columns, map(_value, cells), strict=False)) for cells in block[2:]]
            out.append({"section": section, "columns": columns, "rows": rows})
        block = []
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    args = ap.parse_args()
    record = {
        "page": args.page.name,
        "source": "the tables of the page (run folders not in the workspace); "
        "command: python benchmarks/doc_tables.py " + args.page.as_posix(),
        "tables": tables(args.page.read_text(encoding="utf-8")),
    }
    path = args.page.with_suffix(".json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{len(record['tables'])} tables -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
