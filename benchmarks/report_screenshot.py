"""Screenshot of an audit's report.html in headless Chromium (for docs/ and the README).

Usage: python -m benchmarks.report_screenshot demo-out/audit/report.html docs/images/demo-report.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from medmem.report import screenshot


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    out = screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
