"""Lightning's CheckpointIO for Haipai: loads with weights_only=True, saves crash-safely (io/checkpoint.py)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from haipai_lightning.io.checkpoint import local_path, atomic_link, atomic_save, load_checkpoint_file


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO that always loads with weights_only=True (saves: see AtomicCheckpointIO)."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):  # type: ignore[override]
        return load_checkpoint_file(path, map_location=map_location or "cpu")


class AtomicCheckpointIO(SafeCheckpointIO):
    """SafeCheckpointIO whose saves are crash-safe on local disks (the IO `haipai fit` installs).

    Lightning's own save goes through an fsspec transaction that writes the temporary file in
    TMPDIR and *moves* it: across filesystems (TMPDIR=/dev/shm) that move is a copy over the old
    checkpoint, and a kill during it leaves a truncated file. Here the temporary file lives beside
    the checkpoint (`.<name>.tmp-<host>-<pid>`), so the final step is one rename. Remote URLs
    (s3://, ...) keep Lightning's fsspec path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        local = local_path(path)
        if local is None or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, local)


def link_checkpoint(trainer: Any, filepath: str, linkpath: str) -> None:
    """ModelCheckpoint._link_checkpoint (save_last="link") through atomic_link: Lightning's removes last.ckpt
    before it links (and copies where symlinks fail), so a kill between the two leaves no last.ckpt."""
    if trainer.is_global_zero:
        atomic_link(filepath, linkpath)
    trainer.strategy.barrier()
