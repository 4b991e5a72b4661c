"""Atomic writes: complete files only, the usual permissions, nothing lost on failure."""
import os
import stat

import pytest

from arcee.io import atomic_path, atomic_write_bytes, atomic_write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_file_gets_the_umask_permissions_not_mkstemps_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "sub" / "a.json", "{}")
        open(tmp_path / "plain", "w").close()  # what open() would have given
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "a.json").read_text() == "{}"
    assert mode(tmp_path / "sub" / "a.json") == mode(tmp_path / "plain") == 0o666 & ~umask


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "weights.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_replace_is_complete(tmp_path):
    target = tmp_path / "t.txt"
    atomic_write_text(target, "one")
    with atomic_path(target) as tmp:
        assert tmp != str(target) and os.path.dirname(tmp) == str(tmp_path)
        assert target.read_text() == "one"  # still the old content while the new one is written
        with open(tmp, "w") as f:
            f.write("two")
    assert target.read_text() == "two"
