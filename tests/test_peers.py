"""benchmarks/peers.py: the data nnU-Net is given is the data useg is given.

The conversion to nnU-Net's raw format is read back twice: by useg's own reader of that layout
(always) and by nnU-Net's readers (``nnunetv2.imageio``) when nnU-Net is installed, in the
benchmark's venv (``python benchmarks/peers.py setup``) or in this interpreter; skipped otherwise.
Tiny stand-ins of ``../shared/datasets`` are written here, so the test needs none of the real data.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402

BRATS_CASES = (*peers.BRATS_TRAIN, *peers.BRATS_VAL, *peers.BRATS_TEST)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A folder shaped like ../shared/datasets: 30 ISBI slices of 12x10 (masks 0/255 for 0-24) and
    the four BraTS cases at 6x5x4 voxels (Flair, T1c, labels 0-4 stored as float, as the real files)."""
    rng = np.random.default_rng(0)
    isbi = tmp_path / "datasets" / "isbi2012"
    (isbi / "images").mkdir(parents=True)
    (isbi / "masks").mkdir()
    for n in range(30):
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(isbi / "images" / f"{n}.png")
        if n < 25:
            mask = np.where(rng.random((12, 10)) < 0.3, 0, 255).astype(np.uint8)
            Image.fromarray(mask).save(isbi / "masks" / f"{n}.png")
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    for case in BRATS_CASES:
        folder = tmp_path / "datasets" / "brats2013-mini" / case
        folder.mkdir(parents=True)
        for channel in ("Flair", "T1c"):
            nib.save(nib.Nifti1Image(rng.normal(size=(6, 5, 4)).astype(np.float32), affine),
                     folder / f"{channel}_subtrMeanDivStd.nii.gz")
        labels = rng.integers(0, 5, (6, 5, 4)).astype(np.float32)
        nib.save(nib.Nifti1Image(labels, affine), folder / "OTMultiClass.nii.gz")
    return tmp_path / "datasets"


def _nnunet_python() -> list[str] | None:
    venv = peers.VENV / "bin" / "python"
    if venv.exists():
        return [str(venv)]
    if importlib.util.find_spec("nnunetv2") is not None:
        return [sys.executable]
    return None


READ_BACK = """
import json, sys
import numpy as np
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
raw, case, channels, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ds = json.load(open(f"{raw}/dataset.json"))
ending = ds["file_ending"]
images = [f"{raw}/imagesTr/{case}_{k:04d}{ending}" for k in range(channels)]
rw = determine_reader_writer_from_dataset_json(ds, images[0])()
data, _ = rw.read_images(images)
seg, _ = rw.read_seg(f"{raw}/labelsTr/{case}{ending}")
np.savez(out, data=data, seg=seg)
"""


def _nnunet_read(raw: Path, case: str, channels: int, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    python = _nnunet_python()
    if python is None:
        pytest.skip("nnunetv2 is not installed (python benchmarks/peers.py setup installs it)")
    out = tmp / f"{case}.npz"
    subprocess.run([*python, "-c", READ_BACK, str(raw), case, str(channels), str(out)], check=True,
                   capture_output=True, env=peers.nnunet_env(tmp / "nnunet", 1.0))
    got = np.load(out)
    return got["data"], got["seg"]


def test_isbi_conversion_labels_membrane_as_1_and_keeps_the_split(shared: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    train = peers.convert_isbi(shared, raw)
    assert train == [f"isbi_{n:03d}" for n in range(25)]
    tests = sorted(p.name for p in (raw / "imagesTs").iterdir())
    assert tests == [f"isbi_{n:03d}_0000.png" for n in range(25, 30)]
    doc = json.loads((raw / "dataset.json").read_text())
    assert doc["labels"] == {"background": 0, "membrane": 1} and doc["numTraining"] == 25
    mask = np.asarray(Image.open(shared / "isbi2012" / "masks" / "7.png"))
    label = np.asarray(Image.open(raw / "labelsTr" / "isbi_007.png"))
    np.testing.assert_array_equal(label, (mask == 0).astype(np.uint8))  # membrane (mask value 0) -> 1


def test_brats_conversion_keeps_channels_labels_and_geometry(shared: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    train = peers.convert_brats(shared, raw)
    assert train == [*peers.BRATS_TRAIN, *peers.BRATS_VAL]
    case = peers.BRATS_TRAIN[0]
    src = shared / "brats2013-mini" / case
    for k, channel in enumerate(("Flair", "T1c")):
        a = nib.load(src / f"{channel}_subtrMeanDivStd.nii.gz")
        b = nib.load(raw / "imagesTr" / f"{case}_{k:04d}.nii.gz")
        np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
    truth, label = nib.load(src / "OTMultiClass.nii.gz"), nib.load(raw / "labelsTr" / f"{case}.nii.gz")
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(truth.dataobj).astype(np.uint8))
    np.testing.assert_allclose(label.affine, truth.affine, atol=1e-5)
    assert not (raw / "labelsTr" / f"{peers.BRATS_TEST[0]}.nii.gz").exists()  # the test case has no label


def test_useg_reads_the_converted_cases_as_nnunet_raw_data(shared: Path, tmp_path: Path):
    from useg.check import check_dataset
    from useg.preprocess import load_case

    raw = tmp_path / "raw"
    peers.convert_brats(shared, raw)
    report = check_dataset(raw)
    assert report.ok, report.problems
    case = next(c for c in report.cases if c.name == peers.BRATS_TRAIN[0])
    image, labels = load_case(case, report.label_map)
    src = shared / "brats2013-mini" / case.name
    flair = np.asarray(nib.load(src / "Flair_subtrMeanDivStd.nii.gz").dataobj)
    np.testing.assert_allclose(image[0], flair, atol=1e-6)
    truth = np.asarray(nib.load(src / "OTMultiClass.nii.gz").dataobj).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(report.label_map.values)[labels], truth)


@pytest.mark.parametrize("dataset", ["isbi", "brats"])
def test_nnunet_reads_back_what_was_converted(dataset: str, shared: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    if dataset == "isbi":
        peers.convert_isbi(shared, raw)
        data, seg = _nnunet_read(raw, "isbi_003", 1, tmp_path)
        image = np.asarray(Image.open(shared / "isbi2012" / "images" / "3.png"))
        mask = np.asarray(Image.open(shared / "isbi2012" / "masks" / "3.png"))
        np.testing.assert_array_equal(data[0, 0], image)  # NaturalImage2DIO: (C, 1, H, W)
        np.testing.assert_array_equal(seg[0, 0], (mask == 0).astype(seg.dtype))
    else:
        peers.convert_brats(shared, raw)
        case = peers.BRATS_VAL[0]
        data, seg = _nnunet_read(raw, case, 2, tmp_path)
        src = shared / "brats2013-mini" / case
        # SimpleITK order (z, y, x): nnU-Net's arrays are the NIfTI arrays transposed
        t1c = np.asarray(nib.load(src / "T1c_subtrMeanDivStd.nii.gz").dataobj)
        np.testing.assert_allclose(data[1], t1c.transpose(2, 1, 0), atol=1e-6)
        truth = np.asarray(nib.load(src / "OTMultiClass.nii.gz").dataobj)
        np.testing.assert_array_equal(seg[0], truth.transpose(2, 1, 0))
