"""A component class that runs a side effect when built: stands in for any importable callable a
crafted file might name (os.system, subprocess.Popen, ...). Loading must never build it."""

from pathlib import Path


class Evil:
    def __init__(self, *args, marker: str = "", **kwargs):
        Path(marker).write_text("ran")
