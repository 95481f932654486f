"""useg against nnU-Net v2 and MONAI BasicUNet, equal wall-clock training budgets, same machine.

Datasets (``--data`` is the folder holding ``isbi2012/`` and ``brats2013-mini/``; nothing is
copied into the repository, the tools' working files go to ``--work``):

* ``isbi``: ISBI 2012 membranes (2D), train on slices 0-24, test on 25-29. The membrane class
  (mask value 0) is scored: Dice, IoU, pixel error, adapted Rand error of the cells.
* ``brats``: the four BraTS 2013 mini cases (3D, Flair + T1c), the split of benchmarks/brats.py:
  train pat0005, pat0006, validate pat0003, test pat0004; Dice, IoU, HD95 of WT, TC, ET.

Tools, each given the same training budget in minutes (``--budget-min``), preprocessing outside it:

* ``useg``: its CLI, ``useg train --time-budget`` (default preset unless ``--useg-train-args``)
  and ``useg predict`` (``--useg-predict-args``), the validation split named with ``--val``.
* ``nnunet``: nnU-Net v2 through its own CLI in its own venv (``setup``): the data converted to
  its raw format, ``nnUNetv2_plan_and_preprocess`` (timed, outside the budget), ``nnUNetv2_train
  DATASET 2d|3d_fullres 0 -tr nnUNetTrainer_PeersBudget`` (benchmarks/nnunet_budget_trainer.py:
  short epochs, poly LR stretched to the epochs that fit, stops when the budget is spent) with
  fold 0 = the same train/validation split as useg, ``nnUNetv2_predict`` with its default
  mirroring, from ``checkpoint_final.pth``.
* ``monai``: MONAI BasicUNet with DiceCELoss, Adam 1e-3, the loop of benchmarks/isbi2012.py (2D
  by import; the 3D loop here is the same with 3D patches), sliding-window inference; trained on
  every training case (validation case included), last weights kept.

Every tool's predictions are read back as arrays and scored by one function per dataset built on
useg's metrics (``isbi2012.score``; ``useg.distances.evaluate_regions``). Each training and
prediction command runs as a child process: wall time, and the peak of the summed resident
memory of its process tree (the proportional set size of each process, polled from /proc every
0.5 s, so pages shared between forked workers count once).

    python benchmarks/peers.py setup                      # nnU-Net's venv: benchmarks/.venv-nnunet
    python benchmarks/peers.py run --dataset isbi --tools useg,nnunet,monai --budget-min 20 \\
        --device cpu --data ../shared/datasets --work /tmp/peers

Rows are appended to ``--out`` (benchmarks/results/peers.json): a list of {dataset, tool,
device, budget_min, dice, ...} with the machine (CPU model, ISA flags, GPU), date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from useg.files import atomic_path  # noqa: E402

VENV = HERE / ".venv-nnunet"
TRAINER = "nnUNetTrainer_PeersBudget"
TRAINER_FILE = HERE / "nnunet_budget_trainer.py"
TOOLS = ("useg", "nnunet", "monai")
ISBI_TEST = [str(i) for i in range(25, 30)]
BRATS_TRAIN = ("brats_2013_pat0005_1", "brats_2013_pat0006_1")
BRATS_VAL = ("brats_2013_pat0003_1",)
BRATS_TEST = ("brats_2013_pat0004_1",)
BRATS_LABELS = {"background": 0, "necrosis": 1, "oedema": 2, "non_enhancing": 3, "enhancing": 4}
NNUNET_IDS = {"isbi": (901, "Dataset901_ISBI2012", "2d"),  # id, folder, configuration
              "brats": (902, "Dataset902_BraTSmini", "3d_fullres")}


# ---------------------------------------------------------------------------------------------
# setup: nnU-Net in its own venv


def setup(cuda: bool) -> int:
    """Create benchmarks/.venv-nnunet with torch (CPU build unless ``cuda``) and nnunetv2, and put
    the budget trainer into its trainer folder."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    torch_req = "torch" if cuda else "torch==2.13.0"  # the pinned one is this machine's CPU build
    subprocess.run([*pip, torch_req], check=True)
    # nnunetv2 pulls timm -> torchvision -> a torch of its own choosing (a multi-GB CUDA build);
    # the constraint keeps the torch just installed.
    env = dict(os.environ)
    if not cuda:
        constraints = VENV / "peers-constraints.txt"
        constraints.write_text("torch==2.13.0\n", encoding="utf-8")
        env["PIP_CONSTRAINT"] = str(constraints)
    subprocess.run([*pip, "nnunetv2"], check=True, env=env)
    install_trainer()
    out = subprocess.run([str(VENV / "bin" / "python"), "-c",
                          "import nnunetv2, torch; from importlib.metadata import version; "
                          "print(version('nnunetv2'), torch.__version__)"],
                         check=True, capture_output=True, text=True)
    print(f"nnunetv2, torch: {out.stdout.strip()} in {VENV}; trainer {TRAINER} installed")
    return 0


def install_trainer() -> Path:
    """Copy the budget trainer into the venv's nnunetv2 trainer folder (found there by class name)."""
    found = sorted(VENV.glob("lib/python*/site-packages/nnunetv2/training/nnUNetTrainer"))
    if not found:
        raise SystemExit(f"no nnunetv2 in {VENV}; run `python benchmarks/peers.py setup` first")
    target = found[0] / "nnUNetTrainer_PeersBudget.py"
    shutil.copyfile(TRAINER_FILE, target)
    return target


# ---------------------------------------------------------------------------------------------
# child processes: time and peak memory


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree_pss_kib(root: int) -> int:
    """Summed proportional set size (KiB) of ``root`` and its descendants: pages shared between
    forked workers (nnU-Net's data loaders) counted once, not once per process."""
    kids, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
    return total


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` (output to ``log``); its wall seconds and peak process-tree memory (GiB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  $ {shlex.join(cmd)}  (log {log})", flush=True)
    peak, t0 = [0], time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], _tree_pss_kib(proc.pid))

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        rc = proc.wait()
        stop.set()
        watcher.join()
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
        raise SystemExit(f"{cmd[0]} failed (exit {rc}); the end of {log}:\n{tail}")
    return {"seconds": seconds, "peak_gib": peak[0] / 2**20}


# ---------------------------------------------------------------------------------------------
# datasets: splits, truth, scoring (one function per dataset, every tool)


def isbi_split(data: Path) -> tuple[list[str], list[str]]:
    """Training and validation slice names among 0-24: useg's own seeded 20% split."""
    from useg.check import check_dataset
    from useg.pipeline import split_cases

    report = check_dataset(data / "isbi2012")
    cases = [c for c in report.cases if c.name not in ISBI_TEST]
    train, val = split_cases(cases, val_fraction=0.2, seed=0)
    return [c.name for c in train], [c.name for c in val]


def truths(dataset: str, data: Path) -> tuple[list[np.ndarray], tuple[float, ...] | None]:
    """The test cases' true labels (ISBI: 0 membrane, 1 cell; BraTS: 0-4) and the voxel spacing."""
    from useg.io import read_image, read_mask

    if dataset == "isbi":
        import isbi2012

        return [isbi2012.load_slice(data / "isbi2012", n)[1] for n in ISBI_TEST], None
    case = data / "brats2013-mini" / BRATS_TEST[0]
    spacing = read_image(case / "OTMultiClass.nii.gz").spacing
    return [np.rint(read_mask(case / "OTMultiClass.nii.gz")[0]).astype(np.int64)], spacing


def score(dataset: str, preds: list[np.ndarray], true: list[np.ndarray], spacing) -> dict:
    """ISBI: isbi2012.score (membrane Dice/IoU, pixel error, adapted Rand); BraTS: region metrics."""
    if dataset == "isbi":
        import isbi2012

        return isbi2012.score(preds, true)
    from useg.distances import BRATS_REGIONS, evaluate_regions

    rows = {r["region"]: r for r in evaluate_regions(preds[0], true[0], BRATS_REGIONS, spacing)}
    out = {f"{m}_{k.lower()}": rows[k][m] for k in BRATS_REGIONS for m in ("dice", "iou", "hd95")}
    for m in ("dice", "iou", "hd95"):  # the mean over WT, TC, ET
        out[m] = float(np.mean([rows[k][m] for k in BRATS_REGIONS]))
    return out


def read_isbi_png(path: Path, membrane_value: int) -> np.ndarray:
    """A predicted PNG as ISBI classes (0 membrane, 1 cell), membrane stored as ``membrane_value``."""
    from useg.io import read_mask

    return (read_mask(path)[0] != membrane_value).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# useg: its CLI


def useg_cli() -> list[str]:
    return [sys.executable, "-m", "useg"]


def useg_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def run_useg(a: argparse.Namespace, work: Path) -> dict:
    """``useg train`` within the budget, ``useg predict`` on the test cases; the row's measurements."""
    run, pred, logs = work / "run", work / "pred", work / "logs"
    extra_train, extra_pred = shlex.split(a.useg_train_args), shlex.split(a.useg_predict_args)
    common = ["--device", a.device, "--quiet", "--overwrite"]
    if a.dataset == "isbi":
        data = a.data / "isbi2012"
        _, val = isbi_split(a.data)
        split = ["--exclude", ",".join(ISBI_TEST), "--val", ",".join(val)]
        inputs = [str(data / "images" / f"{n}.png") for n in ISBI_TEST]
    else:
        data = a.data / "brats2013-mini"
        split = ["--channels", "Flair,T1c", "--label", "OTMultiClass", "--exclude", BRATS_TEST[0],
                 "--val", ",".join(BRATS_VAL)]
        inputs = [str(data / BRATS_TEST[0])]
    train = run_measured([*useg_cli(), "train", str(data), "--out", str(run), *split,
                          "--time-budget", f"{a.budget_min:g}", *common, *extra_train],
                         logs / "train.log", useg_env())
    predict = run_measured([*useg_cli(), "predict", str(run), *inputs, "--out", str(pred), *common,
                            *extra_pred], logs / "predict.log", useg_env())
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    if a.dataset == "isbi":
        preds = [read_isbi_png(_one(pred, n), membrane_value=0) for n in ISBI_TEST]
    else:
        from useg.io import read_mask

        preds = [np.rint(read_mask(_one(pred, BRATS_TEST[0]))[0]).astype(np.int64)]
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    setting = {"train_args": extra_train or "default preset", "predict_args": extra_pred,
               "patch": plan["data"]["patch_size"], "width": plan["model"]["width"],
               "depth": plan["model"]["depth"]}
    return {"preds": preds, "train": train, "predict": predict, "steps": summary.get("steps"),
            "epochs": summary.get("epochs"), "setting": setting}


def _one(folder: Path, stem: str) -> Path:
    """The single prediction file in ``folder`` whose name starts with ``stem`` and a dot."""
    found = sorted(p for p in folder.iterdir() if p.name.startswith(f"{stem}.") and "_probs" not in p.name)
    if len(found) != 1:
        raise SystemExit(f"expected one prediction for {stem} in {folder}, found {[p.name for p in found]}")
    return found[0]


# ---------------------------------------------------------------------------------------------
# nnU-Net v2: raw-format conversion and its CLI


def nnunet_env(work: Path, budget_min: float) -> dict:
    env = dict(os.environ)
    for key in ("raw", "preprocessed", "results"):
        env[f"nnUNet_{key}"] = str(work / f"nnUNet_{key}")
        Path(env[f"nnUNet_{key}"]).mkdir(parents=True, exist_ok=True)
    env["PEERS_BUDGET_S"] = str(budget_min * 60.0)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # nnU-Net's venv is self-contained
    return env


def convert_isbi(data: Path, raw: Path) -> list[str]:
    """ISBI slices as nnU-Net raw data: label 1 = membrane (mask value 0), 0 = cell; the images
    linked, the test slices in imagesTs. Returns the training case ids."""
    from PIL import Image

    src = data / "isbi2012"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    train = [str(i) for i in range(25)]
    for n in train + ISBI_TEST:
        case = f"isbi_{int(n):03d}"
        folder = raw / ("imagesTs" if n in ISBI_TEST else "imagesTr")
        _link(src / "images" / f"{n}.png", folder / f"{case}_0000.png")
        if n in train:
            mask = np.asarray(Image.open(src / "masks" / f"{n}.png"))
            Image.fromarray((mask == 0).astype(np.uint8)).save(raw / "labelsTr" / f"{case}.png")
    _dataset_json(raw, {"0": "EM"}, {"background": 0, "membrane": 1}, len(train), ".png")
    return [f"isbi_{int(n):03d}" for n in train]


def convert_brats(data: Path, raw: Path) -> list[str]:
    """BraTS cases as nnU-Net raw data: channel 0 Flair, 1 T1c (linked), labels 0-4 as uint8."""
    import SimpleITK as sitk

    src = data / "brats2013-mini"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    train = [*BRATS_TRAIN, *BRATS_VAL]
    for case in train + list(BRATS_TEST):
        folder = raw / ("imagesTs" if case in BRATS_TEST else "imagesTr")
        for k, channel in enumerate(("Flair", "T1c")):
            _link(src / case / f"{channel}_subtrMeanDivStd.nii.gz", folder / f"{case}_{k:04d}.nii.gz")
        if case in train:
            label = sitk.ReadImage(str(src / case / "OTMultiClass.nii.gz"))
            label = sitk.Cast(sitk.Round(label), sitk.sitkUInt8)
            sitk.WriteImage(label, str(raw / "labelsTr" / f"{case}.nii.gz"))
    _dataset_json(raw, {"0": "FLAIR", "1": "T1c"}, BRATS_LABELS, len(train), ".nii.gz")
    return train


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())


def _dataset_json(raw: Path, channels: dict, labels: dict, n: int, ending: str) -> None:
    doc = {"channel_names": channels, "labels": labels, "numTraining": n, "file_ending": ending}
    (raw / "dataset.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")


def nnunet_splits(a: argparse.Namespace, train_ids: list[str]) -> list[dict]:
    """Fold 0 = useg's training/validation split, in nnU-Net's case ids."""
    if a.dataset == "isbi":
        _, val = isbi_split(a.data)
        val_ids = [f"isbi_{int(n):03d}" for n in val]
    else:
        val_ids = list(BRATS_VAL)
    return [{"train": [c for c in train_ids if c not in val_ids], "val": val_ids}]


def run_nnunet(a: argparse.Namespace, work: Path) -> dict:
    """Convert, plan and preprocess (timed apart), train within the budget, predict the test cases."""
    if not (VENV / "bin" / "nnUNetv2_train").exists():
        raise SystemExit(f"nnU-Net is not installed in {VENV}; run `python benchmarks/peers.py setup`")
    install_trainer()  # the benchmark's current trainer, even if the venv is older
    ident, name, config = NNUNET_IDS[a.dataset]
    config = a.nnunet_config or config
    env, logs = nnunet_env(work, a.budget_min), work / "logs"
    raw = work / "nnUNet_raw" / name
    shutil.rmtree(raw, ignore_errors=True)
    for key in ("preprocessed", "results"):
        shutil.rmtree(work / f"nnUNet_{key}" / name, ignore_errors=True)
    train_ids = (convert_isbi if a.dataset == "isbi" else convert_brats)(a.data, raw)
    nproc = str(max(1, os.cpu_count() or 1))
    prep = run_measured(["nnUNetv2_plan_and_preprocess", "-d", str(ident), "-c", config, "-np", nproc,
                         "--verify_dataset_integrity"], logs / "preprocess.log", env)
    pre = work / "nnUNet_preprocessed" / name
    splits = json.dumps(nnunet_splits(a, train_ids), indent=1)
    (pre / "splits_final.json").write_text(splits, encoding="utf-8")
    train = run_measured(["nnUNetv2_train", str(ident), config, "0", "-tr", TRAINER, "-device", a.device],
                         logs / "train.log", env)
    fold = work / "nnUNet_results" / name / f"{TRAINER}__nnUNetPlans__{config}" / "fold_0"
    budget = json.loads((fold / "peers_budget.json").read_text(encoding="utf-8"))
    pred = work / "pred"
    shutil.rmtree(pred, ignore_errors=True)
    predict = run_measured(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred),
                            "-d", str(ident), "-c", config, "-f", "0", "-tr", TRAINER, "-device", a.device,
                            "-npp", "1", "-nps", "1", "--disable_progress_bar"], logs / "predict.log", env)
    if a.dataset == "isbi":
        preds = [read_isbi_png(pred / f"isbi_{int(n):03d}.png", membrane_value=1) for n in ISBI_TEST]
    else:
        from useg.io import read_mask

        preds = [np.rint(read_mask(pred / f"{BRATS_TEST[0]}.nii.gz")[0]).astype(np.int64)]
    plans = json.loads((pre / "nnUNetPlans.json").read_text(encoding="utf-8"))["configurations"][config]
    arch = plans.get("architecture", {}).get("arch_kwargs", {})
    setting = {"trainer": TRAINER, "configuration": config, "fold": 0, "patch": plans["patch_size"],
               "batch_size": plans["batch_size"], "stages": arch.get("n_stages"),
               "epochs": len(budget["epochs"]), "iters_per_epoch": [e["iters"] for e in budget["epochs"]],
               "tta": "mirroring (nnU-Net default)", "checkpoint": "checkpoint_final.pth",
               "nnunetv2": _nnunet_version()}
    return {"preds": preds, "train": train, "predict": predict, "steps": budget["iterations"],
            "epochs": len(budget["epochs"]), "preprocess_seconds": round(prep["seconds"], 1),
            "setting": setting}


def _nnunet_version() -> str:
    out = subprocess.run([str(VENV / "bin" / "python"), "-c",
                          "from importlib.metadata import version; print(version('nnunetv2'))"],
                         capture_output=True, text=True)
    return out.stdout.strip()


# ---------------------------------------------------------------------------------------------
# MONAI BasicUNet: the loop of benchmarks/isbi2012.py, in a child process


def run_monai(a: argparse.Namespace, work: Path) -> dict:
    base = [sys.executable, str(Path(__file__).resolve()), "_monai", "--dataset", a.dataset, "--data",
            str(a.data), "--work", str(work), "--device", a.device, "--budget-min", f"{a.budget_min:g}"]
    train = run_measured([*base, "--stage", "train"], work / "logs" / "train.log", useg_env())
    predict = run_measured([*base, "--stage", "predict"], work / "logs" / "predict.log", useg_env())
    info = json.loads((work / "train_info.json").read_text(encoding="utf-8"))
    with np.load(work / "preds.npz") as z:
        preds = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
    return {"preds": preds, "train": train, "predict": predict, "steps": info["steps"], "epochs": None,
            "setting": info["setting"]}


def _brats_arrays(data: Path, names) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """z-scored (2, D, H, W) images and (D, H, W) labels 0-4 of the named BraTS cases."""
    from useg.check import check_dataset
    from useg.preprocess import load_arrays
    from useg.spec import DataSpec

    report = check_dataset(data / "brats2013-mini", DataSpec(channel_names=("Flair", "T1c"),
                                                             label_name="OTMultiClass"))
    cases = [c for c in report.cases if c.name in names]
    return load_arrays(cases, report.label_map)


MONAI_3D = {"patch": 80, "batch": 2}  # useg's planned BraTS patch (benchmarks/results/brats.json)


def monai_train_3d(data: Path, run: Path, budget_min: float, device: str) -> dict:
    """isbi2012.train_monai's loop for 3D: BasicUNet(3D), DiceCE, Adam 1e-3, random flipped patches."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    from useg import runtime

    dev = runtime.pick_device(device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images, labels = _brats_arrays(data, (*BRATS_TRAIN, *BRATS_VAL))
    net = BasicUNet(spatial_dims=3, in_channels=2, out_channels=len(BRATS_LABELS)).to(dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    p, steps, start = MONAI_3D["patch"], 0, time.perf_counter()
    net.train()
    while time.perf_counter() - start < budget_min * 60.0:
        xs, ys = [], []
        for _ in range(MONAI_3D["batch"]):
            k = int(rng.integers(len(images)))
            corner = [int(rng.integers(s - p + 1)) for s in labels[k].shape]
            box = tuple(slice(c, c + p) for c in corner)
            x, y = images[k][(slice(None), *box)], labels[k][None][(slice(None), *box)]
            for axis in (1, 2, 3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        loss = loss_fn(net(torch.from_numpy(np.stack(xs)).to(dev)), torch.from_numpy(np.stack(ys)).to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    run.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), run / "model.pt")
    return {"minutes": (time.perf_counter() - start) / 60.0, "steps": steps}


def monai_child(a: argparse.Namespace) -> int:
    """The ``_monai`` subcommand: train (``--stage train``) or predict the test cases."""
    import isbi2012
    import torch
    from monai.networks.nets import BasicUNet

    from useg import runtime

    torch.set_num_threads(os.cpu_count() or 1)
    run, two_d = a.work / "run", a.dataset == "isbi"
    if a.stage == "train":
        if two_d:
            _, info = isbi2012.train_monai(a.data / "isbi2012", run, a.budget_min, a.device)
            setting = {"patch": [256, 256], "batch": 8, "data": "slices 0-24"}
        else:
            info = monai_train_3d(a.data, run, a.budget_min, a.device)
            setting = {"patch": [MONAI_3D["patch"]] * 3, "batch": MONAI_3D["batch"],
                       "data": "3 training cases"}
        setting |= {"net": "BasicUNet", "loss": "DiceCELoss", "optimizer": "Adam 1e-3", "weights": "last"}
        (a.work / "train_info.json").write_text(json.dumps({"steps": info["steps"], "setting": setting}),
                                                encoding="utf-8")
        return 0
    dev = runtime.pick_device(a.device)
    net = BasicUNet(spatial_dims=2 if two_d else 3, in_channels=1 if two_d else 2,
                    out_channels=2 if two_d else len(BRATS_LABELS)).to(dev)
    net.load_state_dict(torch.load(run / "model.pt", map_location=dev))
    if two_d:
        preds = isbi2012.predict_monai(net, a.data / "isbi2012", a.device)
    else:
        preds = [monai_predict_3d(net, _brats_arrays(a.data, BRATS_TEST)[0][0], dev)]
    np.savez_compressed(a.work / "preds.npz", **{f"case_{i}": p for i, p in enumerate(preds)})
    return 0


def monai_predict_3d(net, image: np.ndarray, dev) -> np.ndarray:
    import torch
    from monai.inferers import sliding_window_inference

    net.eval()
    p = MONAI_3D["patch"]
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(image)[None].to(dev), roi_size=(p, p, p),
                                          sw_batch_size=2, predictor=net, overlap=0.5, mode="gaussian")
    return logits.argmax(1)[0].cpu().numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------
# the run: rows, machine, table


def machine(device: str) -> dict:
    """CPU model, cores and the ISA flags that decide bf16/AVX kernels; the GPU when one is used."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    out = {"cpu": model, "cores": os.cpu_count(),
           "isa": sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)}
    if device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def run_tool(tool: str, a: argparse.Namespace, true, spacing) -> dict:
    work = a.work / a.dataset / (a.label or tool)  # a second setting keeps its own folder
    work.mkdir(parents=True, exist_ok=True)
    print(f"[{a.dataset}/{tool}] {a.budget_min:g} min on {a.device} in {work}", flush=True)
    got = {"useg": run_useg, "nnunet": run_nnunet, "monai": run_monai}[tool](a, work)
    label = a.label or tool  # e.g. "nnunet-2d": the table keeps one row per (dataset, label, device, budget)
    row = {"dataset": a.dataset, "tool": label, "device": a.device, "budget_min": a.budget_min,
           **score(a.dataset, got["preds"], true, spacing),
           "train_minutes": round(got["train"]["seconds"] / 60.0, 2), "steps": got["steps"],
           "epochs": got["epochs"], "predict_seconds": round(got["predict"]["seconds"], 1),
           "preprocess_seconds": got.get("preprocess_seconds"),
           "peak_train_gib": round(got["train"]["peak_gib"], 2),
           "peak_predict_gib": round(got["predict"]["peak_gib"], 2), "setting": got["setting"]}
    print(f"[{a.dataset}/{tool}] {format_row(row)}", flush=True)
    return row


def append_rows(out: Path, rows: list[dict]) -> None:
    old = json.loads(out.read_text(encoding="utf-8")) if out.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(old + rows, indent=1, default=float) + "\n", encoding="utf-8")


def format_row(r: dict) -> str:
    extra = (f"pix err {r['pixel_error']:.4f} Rand err {r['rand_error']:.4f}" if r["dataset"] == "isbi"
             else f"WT/TC/ET {r['dice_wt']:.3f}/{r['dice_tc']:.3f}/{r['dice_et']:.3f} HD95 {r['hd95']:.1f}")
    peak = max(r["peak_train_gib"], r["peak_predict_gib"])
    return (f"{r['tool']:<7} {r['device']:<5} {r['budget_min']:>5g} min  Dice {r['dice']:.4f} "
            f"IoU {r['iou']:.4f} {extra}  train {r['train_minutes']:.1f} min, {r['steps']} steps, "
            f"predict {r['predict_seconds']:.0f} s, peak {peak:.1f} GiB")


def table(out: Path) -> list[str]:
    """One line per dataset and tool, one column per (device, budget): the latest row of each,
    as ISBI Dice / adapted Rand error and BraTS mean Dice / mean HD95 (mm)."""
    rows = json.loads(out.read_text(encoding="utf-8")) if out.exists() else []
    latest = {(r["dataset"], r["tool"], r["device"], r["budget_min"]): r for r in rows}
    columns = sorted({(k[2], k[3]) for k in latest})
    lines = ["dataset tool    " + "".join(f"| {d} {b:g} min".ljust(34) for d, b in columns)]
    for dataset, tool in sorted({(k[0], k[1]) for k in latest}):
        cells = []
        for d, b in columns:
            r = latest.get((dataset, tool, d, b))
            second = (None if r is None else r["rand_error"] if dataset == "isbi" else r["hd95"])
            cells.append("| -".ljust(34) if r is None else f"| {r['dice']:.4f} / {second:.4f}".ljust(34))
        lines.append(f"{dataset:<7} {tool:<7} " + "".join(cells))
    return lines


def cmd_run(a: argparse.Namespace) -> int:
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        raise SystemExit(f"unknown tools {unknown}; choose among {','.join(TOOLS)}")
    if a.label and len(tools) != 1:
        raise SystemExit("--label names the rows of one tool; give one tool in --tools")
    needed = "isbi2012" if a.dataset == "isbi" else "brats2013-mini"
    if not (a.data / needed).is_dir():
        raise SystemExit(f"{a.data} has no {needed}/; pass --data to the folder of the shared datasets")
    a.data, a.work = a.data.resolve(), a.work.resolve()
    true, spacing = truths(a.dataset, a.data)
    stamp = {"machine": machine(a.device), "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    rows = []
    for tool in tools:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")  # when this tool started
        row = run_tool(tool, a, true, spacing) | stamp | {"date": now}
        append_rows(a.out, [row])  # each row as soon as it is measured
        rows.append(row)
    print(f"\n{a.dataset}, {a.budget_min:g} min per tool on {a.device} ({stamp['machine']['cpu']}):")
    for row in rows:
        print("  " + format_row(row))
    print(f"{len(rows)} row(s) appended to {a.out}; all of it:")
    print("\n".join(table(a.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help=f"install nnU-Net v2 into {VENV.relative_to(ROOT)}")
    s.add_argument("--cuda", action="store_true", help="a CUDA torch instead of the pinned CPU build")
    r = sub.add_parser("run", help="train, predict and score the tools on one dataset")
    r.add_argument("--dataset", choices=("isbi", "brats"), required=True)
    r.add_argument("--tools", default=",".join(TOOLS), help="comma-separated among useg,nnunet,monai")
    r.add_argument("--budget-min", type=float, default=20.0, help="training minutes per tool")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets",
                   help="folder holding isbi2012/ and brats2013-mini/")
    r.add_argument("--work", type=Path, default=ROOT / "runs" / "peers", help="the tools' working files")
    r.add_argument("--out", type=Path, default=HERE / "results" / "peers.json", help="rows are appended here")
    r.add_argument("--useg-train-args", default="", help="extra `useg train` options, e.g. '--preset paper'")
    r.add_argument("--useg-predict-args", default="", help="extra `useg predict` options, e.g. '--tta'")
    r.add_argument("--nnunet-config", default=None, choices=("2d", "3d_fullres"),
                   help="nnU-Net's configuration (default: 2d for ISBI, 3d_fullres for BraTS)")
    r.add_argument("--label", default=None, help="the rows' tool name (default the tool), e.g. nnunet-2d "
                   "for a second setting of one tool; give one tool with it")
    t = sub.add_parser("table", help="print the results file, one column per device and budget")
    t.add_argument("--out", type=Path, default=HERE / "results" / "peers.json")
    c = sub.add_parser("_monai")  # internal: the MONAI child process
    c.add_argument("--dataset", required=True)
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--device", default="cpu")
    c.add_argument("--budget-min", type=float, required=True)
    c.add_argument("--stage", choices=("train", "predict"), required=True)
    a = p.parse_args(argv)
    if a.cmd == "setup":
        return setup(a.cuda)
    if a.cmd == "table":
        print("\n".join(table(a.out)))
        return 0
    if a.cmd == "_monai":
        return monai_child(a)
    return cmd_run(a)


if __name__ == "__main__":
    sys.exit(main())
