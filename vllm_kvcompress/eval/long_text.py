"""A long public text that is on the machine without a download.

Default: the GNU GPL version 3 as Debian's base-files installs it
(/usr/share/common-licenses/GPL-3, ~35k characters, 7,658 tokens of the bundled model).
Any other file works through `--text`.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def read_long_text(path: Path | None = None) -> str:
    path = path or DEFAULT_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass another long text file with --text")
    return path.read_text(errors="replace")
