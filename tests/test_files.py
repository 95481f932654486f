"""The leaf helpers every format and run-file writer shares: names, atomic writes, Image."""

from __future__ import annotations

import numpy as np
import pytest

from useg.files import NIFTI_SUFFIXES, Image, atomic_path, atomic_write_text, stem_of, suffix_of


def test_names_with_nii_gz():
    assert suffix_of("a/case_0001.nii.gz") == ".nii.gz" and stem_of("a/case_0001.nii.gz") == "case_0001"
    assert suffix_of("A/CASE.NII.GZ") == ".nii.gz" and stem_of("A/CASE.NII.GZ") == "CASE"
    assert suffix_of("x.PNG") == ".png" and stem_of("x.png") == "x"
    assert suffix_of("noext") == "" and stem_of("noext") == "noext"
    assert suffix_of("a.tar.gz") == ".gz" and stem_of("a.tar.gz") == "a.tar"
    assert {suffix_of(f"v{s}") for s in NIFTI_SUFFIXES} == NIFTI_SUFFIXES


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "sub" / "f.json") as tmp:
        assert tmp.parent == tmp_path / "sub" and tmp.suffix == ".json" and tmp.name.startswith(".")
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.json"]  # the previous version, intact
    assert (tmp_path / "sub" / "f.json").read_text() == "old"
    with atomic_path(tmp_path / "new" / "v.nii.gz") as tmp:  # parents created, the double suffix kept
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["v.nii.gz"]


def test_atomic_path_names_the_target_in_os_errors(tmp_path):
    target = tmp_path / "f.txt"
    with pytest.raises(OSError) as info, atomic_path(target) as tmp:
        open(tmp.parent / "missing" / tmp.name, "w")  # an OSError about another file passes unchanged
    assert "missing" in str(info.value)
    with pytest.raises(OSError) as info, atomic_path(target) as tmp:
        raise FileNotFoundError(2, "No such file", str(tmp))
    assert info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_text(tmp_path):
    out = atomic_write_text(tmp_path / "d" / "m.csv", "a,b\r\n1,\u00b5\n")
    assert out == tmp_path / "d" / "m.csv"
    assert out.read_bytes() == "a,b\r\n1,\u00b5\n".encode()  # UTF-8, line endings as given
    atomic_write_text(str(out), "new")
    assert out.read_text() == "new" and [p.name for p in out.parent.iterdir()] == ["m.csv"]


def test_image_checks_its_shape_and_spacing():
    img = Image(np.zeros((2, 4, 5, 6), np.uint8))
    assert img.spacing == (1.0, 1.0, 1.0) and img.dims == 3 and img.channels == 2
    assert img.spatial_shape == (4, 5, 6)
    with pytest.raises(ValueError, match="channels first"):
        Image(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="one value per spatial axis"):
        Image(np.zeros((1, 4, 5)), spacing=(1.0, 1.0, 1.0))


def test_exclusive_atomic_path_refuses_a_name_claimed_meanwhile(tmp_path):
    target = tmp_path / "m.png"
    with pytest.raises(FileExistsError) as info, atomic_path(target, exclusive=True) as tmp:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")  # another process finished first
    assert info.value.filename == str(target)
    assert target.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == ["m.png"]
    with atomic_path(tmp_path / "new.png", exclusive=True) as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "new.png").read_bytes() == b"x" and len(list(tmp_path.iterdir())) == 2


def test_exclusive_atomic_path_without_hard_links(tmp_path, monkeypatch):
    import errno
    import os

    def no_links(*a):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # some network and FUSE file systems
    with atomic_path(tmp_path / "a.tif", exclusive=True) as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.tif").read_bytes() == b"x"
    with pytest.raises(FileExistsError), atomic_path(tmp_path / "a.tif", exclusive=True) as tmp:
        tmp.write_bytes(b"y")
    assert (tmp_path / "a.tif").read_bytes() == b"x" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("stem", ["c" * 240, "é" * 120, "x"])
def test_temporary_names_stay_within_the_name_limit(stem, tmp_path):
    target = tmp_path / f"{stem}.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.exists() and len(tmp.name.encode()) <= 255 and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    with atomic_path(target) as again:  # nested, as a writer inside a claimed output does
        with atomic_path(again) as inner:
            inner.write_bytes(b"y")
    assert target.read_bytes() == b"y" and [p.name for p in tmp_path.iterdir()] == [target.name]
