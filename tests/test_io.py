import os

import pytest

from gpu_mdf.io import atomic_path, write_text


def test_atomic_write_has_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib

        import gpu_mdf.io as io_mod
        importlib.reload(io_mod)
        p = io_mod.write_text(tmp_path / "a.txt", "x")
        assert p.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
        importlib.reload(io_mod)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = write_text(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["keep.txt"]
