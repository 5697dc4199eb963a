"""Process groups for a (pp, dp, tp) layout and the `mpu` object DeepSpeed reads them from (docs/parallelism.md).

Ranks are laid out as DeepSpeed's `PipeModelDataParallelTopology` lays them out (axes pipe, data, model;
model fastest): rank = (pp_rank · dp + dp_rank) · tp + tp_rank. So the ranks of one tensor-parallel group
are neighbours (one node, NVLink), and a `PipelineModule` given `topology.grid` builds pipeline groups of
exactly the ranks our TP layers use.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology


class Topology:
    """The layout of this run and its process groups. It is also the `mpu` for `deepspeed.initialize`:
    DeepSpeed reduces gradients over `get_data_parallel_group()` and the gradient norm over
    `get_model_parallel_group()` (every TP × PP rank of one data-parallel replica), counting a replicated
    parameter only on TP rank 0 and a `tensor_model_parallel` one on every TP rank."""

    def __init__(self, tp: int = 1, pp: int = 1) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp < 1 or pp < 1:
            raise ValueError(f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
        if world % (tp * pp):
            raise ValueError(f"--tp {tp} × --pp {pp} = {tp * pp} does not divide the world size {world}; "
                             f"launch a multiple of {tp * pp} ranks or change --tp/--pp")
        self.tp_size, self.pp_size, self.dp_size = tp, pp, world // (tp * pp)
        self.grid = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=self.dp_size)
        coord = self.grid.get_coord(rank)
        self.tp_rank, self.pp_rank, self.dp_rank = coord.model, coord.pipe, coord.data
        # every rank creates every group, in the same order (new_group is collective)
        self._tp_ranks, self._tp_group = self._axis_group("model", rank)
        self._pp_ranks, self._pp_group = self._axis_group("pipe", rank)
        self._dp_ranks, self._dp_group = self._axis_group("data", rank)
        self._mp_ranks, self._mp_group = self._member_group(
            [self.grid.filter_match(data=d) for d in range(self.dp_size)], rank)

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
        return f"Topology(tp={self.tp_size}, pp={self.pp_size}, dp={self.dp_size})"

    @property
    def model_parallel(self) -> bool:
        """True when TP or PP is on (DeepSpeed then needs this object as its mpu)."""
        return self.tp_size * self.pp_size > 1

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

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp_ranks)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        """All TP × PP ranks of this data-parallel replica (DeepSpeed's "model parallel")."""
        return self._mp_group

    def get_model_parallel_rank(self) -> int:
        return self._mp_ranks.index(dist.get_rank())

    def get_model_parallel_world_size(self) -> int:
        return len(self._mp_ranks)
