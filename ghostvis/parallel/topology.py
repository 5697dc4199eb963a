"""Process groups for a (pp, dp, cp, tp) layout and the `mpu` object DeepSpeed reads them from
(docs/parallelism.md).

Ranks are laid out as DeepSpeed's `PipeModelDataParallelTopology` lays them out (axes pipe, data, model;
model fastest), with the context-parallel axis between data and model:
rank = ((pp_rank · dp + dp_rank) · cp + cp_rank) · tp + tp_rank. So the ranks of one tensor-parallel group
are neighbours (one node, NVLink), CP groups (an all-gather per layer) come next, and a `PipelineModule`
given `topology.grid` builds pipeline groups of exactly the ranks our TP layers use.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, ProcessTopology

from ghostvis.cli import UserError
from ghostvis.parallel.context import ContextParallel


class LayoutError(UserError, ValueError):
    """--tp/--pp/--cp that do not fit the world size or each other; the message names the fix."""


class Topology:
    """The layout of this run and its process groups. It is also the `mpu` for `deepspeed.initialize`:
    DeepSpeed reduces gradients over `get_data_parallel_group()` and the gradient norm over
    `get_model_parallel_group()` (every TP × PP rank of one data-parallel replica), counting a replicated
    parameter only on TP rank 0 and a `tensor_model_parallel` one on every TP rank.

    Context-parallel ranks hold the same parameters, like data-parallel replicas, so DeepSpeed's
    data-parallel group is the CP × DP ranks: ZeRO partitions over all of them and one reduction averages
    the gradient over both (ghostvis/parallel/context.py scales each CP rank's share so that average is
    right). `dp_size`/`dp_rank` count replicas, which is what data sharding and batch sizes use."""

    def __init__(self, tp: int = 1, pp: int = 1, cp: int = 1) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if min(tp, pp, cp) < 1:
            raise LayoutError(f"--tp, --pp and --cp must be >= 1, got --tp {tp} --pp {pp} --cp {cp}")
        if cp > 1 and pp > 1:
            raise LayoutError(f"--cp {cp} with --pp {pp}: context parallelism runs without pipeline stages; "
                              "use --pp 1 (and --tp/--cp/ZeRO to spread the model)")
        if world % (tp * pp * cp):
            sizes = f"--tp {tp} × --pp {pp}" + (f" × --cp {cp}" if cp > 1 else "")
            raise LayoutError(f"{sizes} = {tp * pp * cp} does not divide the world size {world}; launch a multiple "
                              f"of {tp * pp * cp} ranks or change --tp/--pp/--cp")
        self.tp_size, self.pp_size, self.cp_size = tp, pp, cp
        self.dp_size = world // (tp * pp * cp)
        if cp == 1:
            self.grid = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=self.dp_size)
        else:
            self.grid = ProcessTopology(axes=["pipe", "data", "context", "model"], dims=[pp, self.dp_size, cp, tp])
        coord = self.grid.get_coord(rank)
        self.tp_rank, self.pp_rank, self.dp_rank = coord.model, coord.pipe, coord.data
        self.cp_rank = coord.context if cp > 1 else 0
        # every rank creates every group, in the same order (new_group is collective)
        self._tp_ranks, self._tp_group = self._axis_group("model", rank)
        self._pp_ranks, self._pp_group = self._axis_group("pipe", rank)
        self._dp_ranks, self._dp_group = self._axis_group("data", rank)
        replicas = [{"data": d} for d in range(self.dp_size)]
        if cp > 1:
            _, cp_group = self._axis_group("context", rank)
            self.context_parallel = ContextParallel(cp_group)
            self._zero_ranks, self._zero_group = self._member_group(
                [self.grid.filter_match(pipe=p, model=t) for p in range(pp) for t in range(tp)], rank)
            replicas = [{"data": d, "context": c} for d in range(self.dp_size) for c in range(cp)]
        else:
            self.context_parallel = None
            self._zero_ranks, self._zero_group = self._dp_ranks, self._dp_group
        self._mp_ranks, self._mp_group = self._member_group([self.grid.filter_match(**r) for r in replicas], rank)

    def _axis_group(self, axis: str, rank: int) -> tuple[list[int], dist.ProcessGroup]:
        return self._member_group(self.grid.get_axis_comm_lists(axis), rank)

    @staticmethod
    def _member_group(lists: list[list[int]], rank: int) -> tuple[list[int], dist.ProcessGroup]:
        mine: tuple[list[int], dist.ProcessGroup] | None = None
        for ranks in lists:
            ranks = sorted(ranks)
            group = dist.group.WORLD if len(ranks) == dist.get_world_size() else dist.new_group(ranks)
            if rank in ranks:
                mine = (ranks, group)
        assert mine is not None, f"rank {rank} is in no group of {lists}"
        return mine

    def __repr__(self) -> str:
        cp = f", cp={self.cp_size}" if self.cp_size > 1 else ""
        return f"Topology(tp={self.tp_size}, pp={self.pp_size}{cp}, dp={self.dp_size})"

    @property
    def model_parallel(self) -> bool:
        """True when TP, PP or CP is on (DeepSpeed then needs this object as its mpu)."""
        return self.tp_size * self.pp_size * self.cp_size > 1

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        """The group the model's TP layers take; None at tp=1 (plain layers, no communication)."""
        return self._tp_group if self.tp_size > 1 else None

    # ---- the mpu interface (Megatron names, as DeepSpeed calls them) ----
    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self._tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._tp_ranks[0]

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self._pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size

    # DeepSpeed's data-parallel group: the replicas and, within each, the CP ranks (see the class docstring)
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._zero_group

    def get_data_parallel_rank(self) -> int:
        return self._zero_ranks.index(dist.get_rank())

    def get_data_parallel_world_size(self) -> int:
        return len(self._zero_ranks)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._zero_ranks)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        """All TP × PP ranks of this data-parallel (and context-parallel) rank (DeepSpeed's "model parallel")."""
        return self._mp_group

    def get_model_parallel_rank(self) -> int:
        return self._mp_ranks.index(dist.get_rank())

    def get_model_parallel_world_size(self) -> int:
        return len(self._mp_ranks)
