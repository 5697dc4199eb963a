"""3D parallelism: the (pp, dp, tp) process layout and DeepSpeed's mpu (docs/parallelism.md)."""

from ghostvis.parallel.topology import Topology

__all__ = ["Topology"]
