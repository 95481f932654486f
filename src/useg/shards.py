"""Prediction shared over processes: which inputs this rank takes, and one agreement before writing.

``torchrun --nproc_per_node=N -m useg predict RUN IN --out OUT`` starts N copies of
``useg predict``. Each reads its place from torchrun's environment (``RANK``, ``WORLD_SIZE``,
:func:`current`) and takes inputs ``r, r + W, r + 2W, ...`` (round robin, so every rank gets a
mix of early and late, large and small files). An output belongs to the rank of its input, so
no two ranks ever write the same file, and the exclusive claim of each output
(:func:`useg.files.atomic_path`) still stops any other writer. What the ranks check:

* names (two inputs with one output, an output on an input, ``--out`` a file or an input
  folder) over all inputs, on every rank: the same answer everywhere, nothing to agree on;
* whether an output already exists, by its owner only (another rank may be writing its own
  meanwhile), then :func:`agree`: under a process group every rank learns whether any rank
  refused, before any rank writes (one all-reduce of a flag, the only collective besides the
  join), so a refusal stops the whole job with nothing written. Without a process
  group (``RANK`` / ``WORLD_SIZE`` set by another launcher, or by hand) each rank refuses alone.

With ``skip_existing`` (``useg predict --continue``) an output that exists is complete (outputs
appear only through an atomic rename) and its input is skipped: a job that was stopped picks up
where it was, with or without torchrun, with the same number of ranks or another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import runtime
from .errors import UsegError


@dataclass(frozen=True)
class Shard:
    """This process's share of the inputs."""

    rank: int = 0  # this process, in [0, world)
    world: int = 1  # processes sharing the inputs

    def take(self, items: Sequence) -> list:
        """Items ``rank, rank + world, ...``.

        >>> Shard(1, 3).take("abcdefg")
        ['b', 'e']
        >>> Shard().take([1, 2])
        [1, 2]
        """
        return list(items[self.rank::self.world])


def current() -> Shard:
    """This process's shard from ``RANK`` and ``WORLD_SIZE`` (torchrun's); the whole without them.

    Raises:
        UsegError: they are not integers with ``0 <= RANK < WORLD_SIZE``.
    """
    raw = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    try:
        rank, world = int(raw[0]), int(raw[1])
    except ValueError:
        rank = world = -1
    if world < 1 or not 0 <= rank < world:
        raise UsegError(f"RANK={raw[0]} and WORLD_SIZE={raw[1]} in the environment are no process of a job; "
                        "unset them or launch with torchrun")
    return Shard(rank, world)


def pending(targets: Sequence[Path], shard: Shard, overwrite: bool = False,
            skip_existing: bool = False) -> list[int]:
    """Indices of the outputs this rank writes: its share, less those already there with ``skip_existing``.

    Args:
        targets: every rank's outputs, one per input, in input order (the same list on every rank).
        shard: this rank's place.
        overwrite: replace outputs that exist.
        skip_existing: keep outputs that exist (they are complete) and skip their inputs.

    Raises:
        UsegError: an output of this rank exists without ``overwrite`` or ``skip_existing``, or
            (under a process group) one of another rank's does; nothing has been written then.
    """
    if overwrite and skip_existing:
        raise ValueError("overwrite and skip_existing exclude each other; choose one")
    problem, todo = None, []
    for i in shard.take(range(len(targets))):
        if targets[i].exists() and not overwrite:
            if skip_existing:
                continue
            problem = problem or (f"{targets[i]} already exists; pass --overwrite to replace it, --continue "
                                  "to keep it and predict the rest, or choose another --out")
        todo.append(i)
    agree(problem, shard)
    return todo


def agree(problem: str | None, shard: Shard) -> None:
    """Raise ``problem`` here, and on every other rank of the process group when any rank has one.

    Every rank calls this once, at the same point, before it writes anything (it is an all-reduce
    under a process group, a plain check without one).

    Raises:
        UsegError: ``problem`` (this rank's), or that another rank refused.
    """
    import torch.distributed as td

    others = False
    if shard.world > 1 and td.is_available() and td.is_initialized():
        others = runtime.any_rank(problem is not None, runtime.Dist(shard.rank, shard.world))
    if problem is not None:
        raise UsegError(problem)
    if others:
        raise UsegError("another rank of this job refused its outputs (its message says why), so none was "
                        "written; fix that and run again")


@contextlib.contextmanager
def joined(device: str = "auto") -> Iterator[str]:
    """Inside a torchrun job (``WORLD_SIZE`` > 1 and its rendezvous ``MASTER_ADDR``): join its process
    group (for :func:`agree`), with this rank's device (``cuda:LOCAL_RANK``) or its share of the CPU
    threads (:func:`useg.runtime.global_state`). Otherwise nothing changes. There is no barrier at
    the end: each rank's outputs are its own, and a rank whose share was done already (``--continue``)
    must not wait hours, past the group's timeout, for the others; torchrun waits for them all.

    Yields:
        The device to predict on, as a name for :meth:`useg.predict.Segmenter.load`.
    """
    if current().world > 1 and "MASTER_ADDR" in os.environ:
        with runtime.global_state(device, barrier=False) as (_, dev):
            yield str(dev)
    else:
        yield device
