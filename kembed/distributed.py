"""Multi-process runs (``accelerate launch`` or ``torchrun``): a thin layer over
``accelerate.PartialState``, which owns the process group.

In a plain single process every helper is a cheap no-op (rank 0 of 1, no process group, no
environment variables needed). Under N processes the main process (rank 0) alone writes the
run directory, work that splits by item (scoring questions, sampling RLAG pairs) is spread with
:func:`shard` and put back in order with :func:`gather`, and training is data-parallel through
the ``transformers.Trainer``.

Every function that talks to the other ranks (:func:`barrier`, :func:`per_rank`,
:func:`gather`, :func:`from_main`, :func:`full_state_dict` of sharded weights) is a
collective: all ranks must call it, in the same order.

CPU processes: on a machine without CUDA, or with ``ACCELERATE_USE_CPU=1``, the ranks form a
gloo group (``accelerate/cpu-2proc.yaml``); to train on the CPU of a machine with GPUs, hide
them (``CUDA_VISIBLE_DEVICES=``) or set that variable.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence


def state():
    """The process's ``accelerate.PartialState``: a shared singleton, set up (and the process
    group joined, when launched) on the first call, then returned as it is; the
    ``transformers.Trainer`` sets it up again with the same settings. Alone, it needs no
    environment variables and starts nothing.

    It asks for CPU processes on a machine without CUDA or under ``ACCELERATE_USE_CPU`` (a
    gloo group when launched with several): accelerate starts a CPU group only when told to.

    Raises:
        RuntimeError, ValueError: from accelerate/torch when a launch is misconfigured (e.g.
            the rendezvous address cannot be reached).
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def shutdown() -> None:
    """Leave the process group at the end of a command that succeeded: wait for every rank, then
    destroy the group (``PartialState.destroy_process_group``) while the interpreter is fully
    alive. A collective: every rank calls it, after its last collective.

    Left to interpreter exit, the group's gloo worker threads may still be tearing down when
    Python finalizes, and a rank whose command finished aborts ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#179291), so the launcher reports a failure.
    Not called after a failure: the other ranks may be inside a collective, and waiting for
    them would hang.

    A no-op in a single process, when no group was joined, and when torch was never imported
    (``kembed --help``). The process cannot take part in collectives afterwards.
    """
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        barrier()
        state().destroy_process_group()


def world_size() -> int:
    """Number of processes (1 without a launcher)."""
    return state().num_processes


def rank() -> int:
    """This process's global index, 0 .. world_size() - 1."""
    return state().process_index


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0; always true alone)."""
    return state().is_main_process


def barrier() -> None:
    """Wait until every process gets here (returns at once in a single process)."""
    state().wait_for_everyone()


def shard(items: Sequence) -> list:
    """This rank's share of ``items``: ``items[rank::world_size]`` (all of them alone).

    Interleaving keeps the shares within one item of each other; :func:`gather` restores the
    original order.
    """
    return list(items[rank()::world_size()])


def per_rank(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (a collective;
    ``[obj]`` alone)."""
    if world_size() == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def gather(shard_results: Sequence, n: int) -> list:
    """All ranks' results of their :func:`shard` of ``n`` items, in the original item order,
    on every rank (a collective).

    Args:
        shard_results: one result per item of this rank's ``shard(items)``, in that order.
        n: ``len(items)``.

    Returns:
        The ``n`` results, result ``i`` belonging to ``items[i]``; in a single process,
        ``list(shard_results)``.

    Raises:
        ValueError: the ranks returned a number of results other than their shares of ``n``.
    """
    world = world_size()
    parts = per_rank(list(shard_results))
    sizes = [len(p) for p in parts]
    expected = [len(range(r, n, world)) for r in range(world)]
    if sizes != expected:
        raise ValueError(f"gather: the ranks hold {sizes} results, their shares of {n} items are {expected}")
    return [parts[i % world][i // world] for i in range(n)]


def from_main(obj: Any) -> Any:
    """The main process's ``obj``, on every rank (a collective; ``obj`` alone). For values
    that must agree everywhere but are made on one process, such as a timestamped run name."""
    if world_size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def device(placement_device: str) -> str:
    """The device this rank puts its model on: ``cuda:<local index>`` when several processes
    share CUDA devices, else ``placement_device`` unchanged (``"cpu"``, or ``"cuda"`` alone)."""
    if placement_device == "cuda" and world_size() > 1:
        return str(state().device)
    return placement_device


def is_sharded(model) -> bool:
    """True when ``model``'s weights are split across ranks (FSDP2 DTensors, DeepSpeed ZeRO-3
    partitions): then every forward pass is a collective, so ranks must run the same forwards
    in step, and a full state dict needs every rank (:func:`full_state_dict`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def splits_work(model) -> bool:
    """True when per-item work with ``model`` (scoring, sampling) should be split over the
    ranks with :func:`shard` / :func:`gather`: several processes, and weights that each rank
    holds whole. With sharded weights every rank must run all of it, in step."""
    return world_size() > 1 and not is_sharded(model)


def full_state_dict(model) -> dict | None:
    """The full (unsharded) state dict of ``model`` for saving, or None when its weights are
    not sharded (``save_pretrained`` then reads them itself). With sharded weights this is a
    collective; the dict is complete on the main process (FSDP2: on CPU; ZeRO-3: copies made
    while the partitions are gathered) and None elsewhere.
    """
    if not is_sharded(model):
        return None
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            full = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if is_main() else None
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    # tied weights (one parameter under two names) share one tensor again, so that
    # save_pretrained writes them once, as it does from the model itself
    first = {}
    for name, value in model.state_dict(keep_vars=True).items():
        full[name] = full[first.setdefault(id(value), name)]
    return full
