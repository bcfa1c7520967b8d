"""tera.topologies: GPU catalog, cluster descriptions, topology graphs and collective costs.

    >>> from tera import topologies
    >>> c = topologies.load("dgx-h100", gpus=64)
    >>> c.span(range(16))            # [Level(nvlink, 2 units ...), Level(leaf, 1 unit ...)]
    >>> topologies.collectives.all_reduce(c, range(16), 2**30)   # seconds

Importing this package is cheap: yaml is read on first use, networkx only by graph().
Errors in a description raise ClusterError ("<field>: <problem>; <fix>").
"""

from tera.topologies import collectives
from tera.topologies.catalog import GPU, catalog, get_gpu
from tera.topologies.cluster import Cluster, Level, from_dict, load, preset_names
from tera.topologies.errors import ClusterError
from tera.topologies.network import Network, Tier

__all__ = [
    "GPU",
    "Cluster",
    "ClusterError",
    "Level",
    "Network",
    "Tier",
    "catalog",
    "collectives",
    "from_dict",
    "get_gpu",
    "load",
    "preset_names",
]
