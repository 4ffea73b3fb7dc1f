"""Every rank learns what went wrong on any rank: the one "did any rank fail?" collective.

A step that can fail on one rank only (verifying a cache shard, writing a checkpoint part, taking a lock) must
end with every rank knowing, or the healthy ranks wait in the next collective until the timeout. Each rank
passes its own problem (or None); all of them get every failing rank's message back, so rank 0 can report a
finding made on another node. Messages travel as bytes in tensors (two all_gathers), never pickled.

`run_everywhere` is the pattern built on it: run this rank's share of a step, catch what it raises, agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

MAX_MESSAGE_BYTES = 2048


def describe(problem: BaseException) -> str:
    return str(problem) or type(problem).__name__


def gather_failures(problem: BaseException | None, device: torch.device | str = "cpu") -> dict[int, str]:
    """{rank: message} of every rank whose `problem` is not None; {} when all succeeded. Collective: every
    rank of the default process group must call it (a single process needs no group)."""
    text = describe(problem).encode()[:MAX_MESSAGE_BYTES] if problem is not None else b""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {0: text.decode(errors="replace")} if problem is not None else {}
    world = dist.get_world_size()
    length = torch.tensor([len(text) + (problem is not None)], dtype=torch.int64, device=device)  # 0: no problem
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    if not any(sizes):
        return {}
    buffer = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    buffer[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else buffer[:0]
    buffers = [torch.zeros_like(buffer) for _ in range(world)]
    dist.all_gather(buffers, buffer)
    return {rank: bytes(b[:n - 1].cpu().tolist()).decode(errors="replace")
            for rank, (b, n) in enumerate(zip(buffers, sizes)) if n}


def first_failure(failures: dict[int, str]) -> str:
    """One line naming the lowest failing rank and its message (what rank 0 prints for all of them)."""
    rank = min(failures)
    more = f" (and {len(failures) - 1} more rank{'s' if len(failures) > 2 else ''})" if len(failures) > 1 else ""
    return f"rank {rank}: {failures[rank]}{more}"


@dataclass(frozen=True)
class Agreement:
    """What every rank knows after `run_everywhere`: its own error (None when its share worked) and every
    failing rank's message."""

    own: BaseException | None
    failures: dict[int, str]

    @property
    def failed(self) -> bool:
        """Whether the step failed on any rank (the same answer on every rank)."""
        return bool(self.failures)

    def first(self) -> str:
        return first_failure(self.failures)

    def raise_failure(self, error: Callable[[str], BaseException],
                      keep_own: Callable[[BaseException], bool] = lambda e: True) -> None:
        """Nothing when no rank failed. Otherwise every rank raises: a rank whose own share failed its own error
        when `keep_own` accepts it, every other rank `error(first_failure)`."""
        if not self.failures:
            return
        if self.own is not None and keep_own(self.own):
            raise self.own
        raise error(self.first()) from self.own


def run_everywhere(work: Callable[[], object] | None, device: torch.device | str = "cpu", *,
                   catch: type[BaseException] | tuple[type[BaseException], ...] = Exception) -> Agreement:
    """Run this rank's share of a step (`work`; None: this rank only joins the agreement), catching `catch`,
    then agree on whether it failed anywhere. Collective: every rank calls it, whatever its share. An error
    outside `catch` propagates at once, without the agreement."""
    own = None
    try:
        if work is not None:
            work()
    except catch as e:
        own = e
    return Agreement(own, gather_failures(own, device))


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is True on any rank. Collective."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
