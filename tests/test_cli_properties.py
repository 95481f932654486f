"""A property of the whole command line, probed with values derived from its parser.

For every option of every subcommand (found by walking ``useg.cli_parser.build_parser()``: its subparsers,
their actions, each action's type, choices, nargs and store_true), hypothesis draws hostile and
boundary values (empty, zero, negative, huge, NaN, infinite, the wrong type, a missing file, a
folder, a name with spaces or non-ASCII letters, comma lists with bad items, an input folder as
the output) into a valid, quick base command on a tiny 2D or 3D dataset, and runs the CLI in
process. Whatever the values:

- the exit status is 0 or 2 (argparse's SystemExit counts), never an uncaught exception;
- exit 2 comes with a message on stderr, and never with a traceback;
- no input file (data, runs, predictions) is created, changed or removed: every output lands in
  the example's own folder, the current directory;
- nothing hidden is left behind there (temporary names, staging folders of ``train``).

Runs in a bounded time: a few derandomized examples per option (``USEG_PROPERTY_EXAMPLES`` raises
the count for a deeper local probe), the training options that decide the run's length bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import math
import os
import shutil
import signal
import tempfile
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from useg import cli, cli_parser

EXAMPLES = int(os.environ.get("USEG_PROPERTY_EXAMPLES", "2"))
LIMIT_S = 60  # one command of the probe: every base command takes about a second
PATCH = {2: "16,16", 3: "8,8,8"}
DEPTH = {2: "2", 3: "1"}


def _tiny(dims: int) -> list[str]:
    """The options that keep a training run to two steps of a four-channel network."""
    return ["--width", "4", "--depth", DEPTH[dims], "--patch", PATCH[dims], "--epochs", "1", "--iters", "2",
            "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--workers", "0", "--quiet"]


# ------------------------------------------------------------------------------- the parser, walked


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Subcommand name -> its parser, read from the parser's subparsers action."""
    parser = cli_parser.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action a user can give (positionals included), but --help."""
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def flag_of(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


# Untyped string options say nothing in the parser about what they hold: each dest is named here (a new
# option without a row fails test_every_option_has_values, so it cannot go unprobed).
INPUT_PATHS = {"data", "inputs", "run", "pred", "truth", "roi", "predictions"}
OUTPUT_PATHS = {"out"}
TEXTS = {
    "channels": ["", ",", "c0", "c0,c0", "images,masks", "é ü", "a,,b"],
    "label": ["", "c0", "masks", "é", "seg"],
    "mask_pattern": ["", "{stem}", "{stem}_seg", "{", "}", "{0}", "{stem.real}", "{stem!r}", "{stem:>300}",
                     "{x}", "{stem}{stem}", "../{stem}", "a/{stem}", "%s", "{{stem}}", " {stem} "],
    "image_pattern": ["", "{stem}", "{stem}_img", "{", "{0}", "{stem.x}", "{x}", "c{stem}", "../{stem}"],
    "regions": ["", ";", "brats", "WT=255", "A=", "=1", "A=x", "A=1;A=1", "A=999", "A=255;B=0,255",
                "A=1e3", "A=-1", "é=255", "A=1,,2"],
    "val": ["", ",", "c0", "c0,c0", "c1-c3", "0-3", "3-0", "0-99999999999", "nope", "c0,nope", " c1 ", "v0",
            "c0,c1,c2,c3,c4,c5", "v0,v1,v2", "é"],
    "exclude": ["", ",", "c0", "c0,c1,c2,c3,c4,c5", "v0,v1,v2", "0-99999999999", "nope", "v1", "c2-c4", "é"],
}
NUMBERS = ["0", "-1", "1", "2", "1.5", "-0", "1e3", "nan", "inf", "-inf", "1e308", "1e-308", "abc", "", " 3",
           "\u0663", "0x10", "1_0", "9" * 30]
# Options whose value sets the length of a run: only values up to these bounds are tried.
BOUNDED = {"epochs": 2, "iters": 3, "batch_size": 4, "workers": 2, "minutes": 0.05, "width": 64,
           "memory_gb": 1e6, "time_budget": 0.1, "folds": 3, "fold": 3}


def _beyond(text: str, bound: float) -> bool:
    """Whether ``text`` is a finite number above ``bound`` (words, NaN and infinities are tried anyway:
    the parser refuses them at once)."""
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and abs(value) > bound


def values_of(sub: str, action: argparse.Action) -> list:
    """The values to try for one option: strings for argv, or "@token" paths resolved per example."""
    if action.nargs == 0:  # store_true and friends: given, with everything else as in the base
        return [None]
    if action.choices:
        return [*action.choices, "", "bogus", str(next(iter(action.choices))).upper(), " "]
    if action.dest == "device":
        return ["cpu", "auto", "", "bogus", "cuda", "cuda:-1", "cuda:abc", "mps", "meta", "cpu:1", "CPU",
                "xla"]
    if action.dest in INPUT_PATHS:
        return ["", "@missing", "@spaces", "@empty_dir", "@text_file", "@other_dims", "@other_images", "@run",
                "@images", "@masks", "."]
    if action.dest in OUTPUT_PATHS:
        outs = ["", " ", "@spaces", "@nested", "@text_file", "@full_dir", "."]
        return outs + (["@images", "@data"] if sub in ("train", "predict") else [])
    if action.dest in TEXTS:
        return TEXTS[action.dest]
    if action.type is not None:  # a number or a list of numbers: the same hostile strings, bounded
        found = NUMBERS + (["1,2,3", "0,255", "255,0", "0,0", "0,0,255", "-1,255", "a,b", "1,,2", ",", "x",
                            "3x3", "0,16", "-16,16", "16,16", "8,8,8", "4096,4096", "4096,4096,4096"]
                           if action.type is cli_parser._ints else [])
        bound = BOUNDED.get(action.dest)
        if bound is not None:
            found = [v for v in found if not _beyond(v, bound)]
        return found
    raise AssertionError(f"useg {sub} {flag_of(action)}: add its dest {action.dest!r} to INPUT_PATHS, "
                         "OUTPUT_PATHS or TEXTS so the probe knows what it holds")


def cases() -> list[tuple[str, str | None]]:
    """(subcommand, option dest) for every option of every subcommand; (sub, None) where it has none."""
    found = []
    for name, parser in subcommands().items():
        dests = [a.dest for a in options(parser)]
        found.extend((name, d) for d in dests) if dests else found.append((name, None))
    return found


# ------------------------------------------------------------------------------------- the fixtures


def _write_3d(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for i in range(3):
        mask = np.zeros((12, 12, 12), np.uint8)
        mask[3:8, 3 + i:9, 2:9] = 1
        image = (rng.normal(0, 1, mask.shape) + mask * 3).astype(np.float32)
        for sub, arr in (("images", image), ("masks", mask)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 1.5, 1.0])), root / sub / f"v{i}.nii.gz")
    return root


def _tiny_demo(real):
    """The demo on six 32x32 images and a two-step network: its options are probed, not its size."""
    return functools.partial(real, n_train=4, n_test=2, shape=(32, 32), model={"width": 4, "depth": 2},
                             train={"epochs": 1, "iters_per_epoch": 2, "batch_size": 2, "workers": 0})


@pytest.fixture(scope="module")
def world(tmp_path_factory, write_squares):
    """Tiny 2D and 3D datasets, a run trained on each and its predictions, under ``inputs/``."""
    import torch

    from useg import demo, runtime

    root = tmp_path_factory.mktemp("property")
    inputs = root / "inputs"
    w = {"root": root, "work": root / "work", 2: {}, 3: {}}
    w["work"].mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads only spin
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "run_demo", _tiny_demo(demo.run_demo))
        # training takes every core; on a shared CPU their spin-waits make tiny convolutions 100x slower
        mp.setattr(runtime, "cpu_count", lambda: 1)
        for dims, write in ((2, write_squares), (3, _write_3d)):
            data = write(inputs / f"data{dims}d")
            run, pred = inputs / f"run{dims}d", inputs / f"pred{dims}d"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert cli.main(["train", str(data), "--out", str(run), *_tiny(dims)]) == 0
                assert cli.main(["predict", str(run), str(data / "images"), "--out", str(pred),
                                 "--quiet"]) == 0
            w[dims] = {"data": data, "run": run, "pred": pred}
        (inputs / "note.txt").write_text("not an image\n")
        yield w
    torch.set_num_threads(threads)


def base_command(sub: str, dims: int, w: dict, work: Path) -> list[str]:
    """A valid, quick command line for ``sub`` whose outputs all land in ``work`` (the current folder)."""
    d = w[dims]
    data, run, pred = str(d["data"]), str(d["run"]), str(d["pred"])
    if sub in ("export", "evaluate", "postprocess"):  # they write into the run or predictions: copies
        run = str(shutil.copytree(d["run"], work / "runcopy"))
        pred = str(shutil.copytree(d["pred"], work / "predcopy"))
    return {
        "check": ["check", data],
        "plan": ["plan", data, *_tiny(dims)[:6], "--device", "cpu"],
        "train": ["train", data, "--out", "run", *_tiny(dims)],
        "predict": ["predict", run, str(d["data"] / "images"), "--out", "masks", "--device", "cpu",
                    "--quiet"],
        "export": ["export", run, "--out", "model.pt", "--format", "torchscript", "--quiet"],  # ONNX: seconds
        "evaluate": ["evaluate", pred, data, "--out", "metrics"],
        "demo": ["demo", "--out", "demo", "--minutes", "0.05", "--device", "cpu", "--quiet"],
        "info": ["info"],
        "postprocess": ["postprocess", run, "--predictions", pred, "--truth", str(d["data"] / "masks"),
                        "--quiet"],
    }[sub]


def resolve(token, dims: int, w: dict, work: Path):
    """An "@token" path made real for this example; other values unchanged."""
    if not isinstance(token, str) or not token.startswith("@"):
        return token
    d, other = w[dims], w[5 - dims]
    if token == "@empty_dir":
        (work / "empty").mkdir(exist_ok=True)
    elif token == "@full_dir":
        (work / "full").mkdir(exist_ok=True)
        (work / "full" / "keep.txt").write_text("keep\n")
    elif token == "@text_file":
        (work / "note.txt").write_text("not an image\n")
    return str({"@missing": work / "missing", "@spaces": work / "a name é ü", "@empty_dir": work / "empty",
                "@text_file": work / "note.txt", "@full_dir": work / "full",
                "@nested": work / "a" / "b" / "c",
                "@other_dims": other["data"], "@other_images": other["data"] / "images", "@run": d["run"],
                "@images": d["data"] / "images", "@masks": d["data"] / "masks", "@data": d["data"]}[token])


def mutate(argv: list[str], action: argparse.Action, value) -> list[str]:
    """``argv`` with one option set to ``value`` (an option given again: argparse's last one wins)."""
    if action.option_strings:
        return [*argv, flag_of(action)] if action.nargs == 0 else [*argv, f"{flag_of(action)}={value}"]
    # a positional: its place in the base command is its rank among the positionals
    parser = subcommands()[argv[0]]
    rank = [a.dest for a in options(parser) if not a.option_strings].index(action.dest)
    argv = list(argv)
    if 1 + rank < len(argv) and not argv[1 + rank].startswith("--"):
        argv[1 + rank] = value
    else:  # an optional positional the base command leaves out (useg info [RUN])
        argv.insert(1 + rank, value)
    return argv


# ------------------------------------------------------------------------------------- the property


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder``: size, mtime in ns and, for small files, the SHA-256."""
    found = {}
    for p in sorted(folder.rglob("*")):
        st_ = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and st_.st_size < 1 << 20 else ""
        # a folder by its name only: reading never changes a file, and any new file shows by its own name
        found[str(p.relative_to(folder))] = (st_.st_size, st_.st_mtime_ns, digest) if p.is_file() else ()
    return found


class TooLong(BaseException):
    """Raised in the CLI by the example's alarm: a BaseException, so no ``except Exception`` hides it."""


def _too_long(signum, frame):
    raise TooLong(f"still running after {LIMIT_S} s")


@contextlib.contextmanager
def time_limit(seconds: float):
    """SIGALRM after ``seconds``: a hang (``--val 0-99999999999`` expanded for hours) fails the example
    with its stack. Hypothesis catches a test timeout and runs the example again, so the limit is here."""
    previous = signal.signal(signal.SIGALRM, _too_long)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(argv: list[str]) -> tuple[int, str]:
    """The exit status of ``useg ARGV`` in process (SystemExit's code counts) and its stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            with time_limit(LIMIT_S):
                status = cli.main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except BaseException:  # noqa: BLE001 - the property: no exception ever reaches the user
            raise AssertionError(f"useg {' '.join(map(repr, argv))} raised:\n{traceback.format_exc()}"
                                 f"\nstderr:\n{err.getvalue()}") from None
    return status, err.getvalue()


def check_example(w: dict, sub: str, dims: int, mutations: list[tuple[argparse.Action, object]]) -> None:
    inputs = w["root"] / "inputs"
    work = Path(tempfile.mkdtemp(dir=w["work"]))
    here = os.getcwd()
    before = snapshot(inputs)
    os.chdir(work)  # relative paths (a name with spaces, ".") land in the example's own folder
    try:
        argv = base_command(sub, dims, w, work)
        for action, value in mutations:
            argv = mutate(argv, action, resolve(value, dims, w, work))
        status, err = run_cli(argv)
        shown = f"useg {' '.join(map(repr, argv))}"
        assert status in (0, 2), f"{shown} exited {status}:\n{err}"
        assert "Traceback" not in err, f"{shown} printed a traceback:\n{err}"
        if status == 2:
            assert err.strip(), f"{shown} exited 2 without a word on stderr"
        after = snapshot(inputs)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"{shown} changed input files: {changed[:8]}"
        hidden = [str(p.relative_to(work)) for p in work.rglob(".*")]
        assert not hidden, f"{shown} left hidden (temporary or staging) files behind: {hidden[:8]}"
        staged = [p.name for p in w["work"].iterdir() if p.name.startswith(".")]  # beside a run at "."
        assert not staged, f"{shown} left a staging folder: {staged}"
    finally:
        os.chdir(here)
        shutil.rmtree(work, ignore_errors=True)


# no shrinking: a failure already names its whole command line, and shrinking would rerun slow examples
PROBE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                 phases=[Phase.explicit, Phase.reuse, Phase.generate],
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                        HealthCheck.filter_too_much])


def test_every_option_has_values():
    """The walk finds every subcommand, and each option gets hostile values (a new one cannot hide)."""
    subs = subcommands()
    assert {"check", "plan", "train", "predict", "export", "evaluate", "demo", "info"} <= set(subs)
    for name, parser in subs.items():
        for action in options(parser):
            assert values_of(name, action), f"useg {name} {flag_of(action)} gets no value to try"


@pytest.mark.parametrize("sub, dest", cases())
@PROBE
@given(data=st.data())
def test_any_option_value_exits_0_or_2_and_writes_only_its_outputs(world, sub, dest, data):
    parser = subcommands()[sub]
    actions = {a.dest: a for a in options(parser)}
    dims = data.draw(st.sampled_from([2, 3]), label="dims")
    mutations = []
    if dest is not None:
        first = actions[dest]
        mutations.append((first, data.draw(st.sampled_from(values_of(sub, first)), label=dest)))
        others = [a for a in actions.values() if a.dest != dest]
        if others and data.draw(st.booleans(), label="a second option"):
            second = data.draw(st.sampled_from(others), label="second")
            mutations.append((second, data.draw(st.sampled_from(values_of(sub, second)), label=second.dest)))
    check_example(world, sub, dims, mutations)

