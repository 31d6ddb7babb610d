"""Headless Chromium for looking at medmem's HTML pages (report, labelling page).

Used by the browser tests and the docs' screenshot script. The flags keep Chromium off the
network (no background requests, updates or sync) and let it run as root without a display.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_available() -> bool:
    """True when a Chromium binary is installed."""
    return Path(CHROMIUM).exists()


def headless_command(profile: str | Path, *args: str) -> list[str]:
    """The command line of a headless Chromium with a fresh profile folder."""
    return [CHROMIUM, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args]


__all__ = ["CHROMIUM", "HEADLESS_FLAGS", "chromium_available", "headless_command"]
