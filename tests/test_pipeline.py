"""Reading a file: one function for a path, a claim and a descriptor handed to
a worker; only regular files, never over the size limit, always from the start."""

from __future__ import annotations

import os

import pytest

from digitwatch.errors import RefusedError
from digitwatch.files import read_file, read_regular


class TestReadRegular:
    """read_regular: what every reader of an inbox file goes through."""

    def test_reads_from_the_start_whatever_the_offset(self, tmp_path):
        path = tmp_path / "a.png"
        path.write_bytes(b"0123456789")
        fd = os.open(path, os.O_RDONLY)
        os.lseek(fd, 7, os.SEEK_SET)  # where a worker that died mid-file left a shared offset
        assert read_regular(fd, 100) == b"0123456789"

    def test_closes_the_descriptor(self, tmp_path):
        path = tmp_path / "a.png"
        path.write_bytes(b"x")
        fd = os.open(path, os.O_RDONLY)
        read_regular(fd, 100)
        with pytest.raises(OSError):
            os.fstat(fd)

    def test_refuses_a_fifo_by_fstat_without_blocking(self, tmp_path):
        fifo = tmp_path / "f.png"
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        with pytest.raises(RefusedError, match="refused: a FIFO, not a regular file"):
            read_regular(fd, 100)

    def test_refuses_over_the_limit_before_reading(self, tmp_path):
        path = tmp_path / "big.png"
        path.write_bytes(b"x" * 2_000_001)
        with pytest.raises(RefusedError, match=r"file is 2.0 MB, over the limit of 1.0 MB"):
            read_regular(os.open(path, os.O_RDONLY), 1_000_000)

    def test_read_file_refuses_a_link_when_asked(self, tmp_path):
        (tmp_path / "real.png").write_bytes(b"png")
        (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
        assert read_file(tmp_path / "link.png", 100) == b"png"
        with pytest.raises(RefusedError, match="symbolic link"):
            read_file(tmp_path / "link.png", 100, follow_links=False)
