"""Screenshot of an audit's report.html in headless Chromium (for docs/ and the README).

Usage: python benchmarks/report_screenshot.py demo-out/audit/report.html docs/images/demo-report.png
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from medmem._browser import headless_command


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    report, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = headless_command(
            profile,
            "--hide-scrollbars",
            "--window-size=1280,1900",
            f"--screenshot={out.resolve()}",
            report.as_uri(),
        )
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
