"""Durable files (llamarocm._files): whole or not at all, and the folder synced."""

from __future__ import annotations

import os
import stat

import pytest

from llamarocm._files import sync_folder_of, write_whole

pytestmark = pytest.mark.timeout(30)


def _synced_paths(monkeypatch) -> "list[str]":
    """What every ``os.fsync`` from now on syncs, by path."""
    synced: "list[str]" = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def test_write_whole_replaces_the_file_readable_by_its_owner_only(tmp_path, monkeypatch):
    path = tmp_path / "state"
    path.write_bytes(b"old")
    synced = _synced_paths(monkeypatch)
    write_whole(str(path), [b"new ", b"bytes"], prefix=".x-")
    assert path.read_bytes() == b"new bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state"]
    # The temporary file's bytes, then the folder holding the new name.
    assert len(synced) == 2 and synced[1] == str(tmp_path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "state"
    path.write_bytes(b"old")

    def parts():
        yield b"half of it"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_whole(str(path), parts(), prefix=".x-")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state"]


def test_sync_folder_of_syncs_the_folder_and_ignores_one_it_cannot_open(tmp_path, monkeypatch):
    synced = _synced_paths(monkeypatch)
    sync_folder_of(str(tmp_path / "new-file"))
    assert synced == [str(tmp_path)]
    sync_folder_of(str(tmp_path / "missing" / "file"))  # best effort: no error
    assert synced == [str(tmp_path)]
