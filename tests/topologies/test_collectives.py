"""Algorithm choice and API behaviour of tera.topologies.collectives."""

from __future__ import annotations

import math

import pytest

from tera.topologies import collectives as C
from tera.topologies import load

H200 = load("dgx-h200", gpus=8)
H100 = load("dgx-h100", gpus=1024)


def test_single_rank_and_empty_message_cost_nothing():
    for kind in C.KINDS[:-1]:
        assert C.best(kind, H100, [5], 2**30).seconds == 0.0
        assert C.best(kind, H100, range(8), 0).seconds == 0.0
    assert C.send_recv(H100, 3, 3, 2**20) == 0.0


def test_nccl_switches_from_ring_ll_to_nvls_near_2mib():
    # hardware-facts nccl_model.observed_selection_h200_nccl_2_27_7: Ring/LL <= 1 MiB,
    # NVLS/Simple >= 2 MiB, NVLS only at >= 5 GPUs
    small, large = (C.best("all_reduce", H200, range(8), s) for s in (2**20, 2**21))
    assert (small.algo, small.protocol) == ("ring", "LL")
    assert (large.algo, large.protocol) == ("nvls", "Simple")
    assert C.best("all_reduce", H200, range(4), 2**30).algo == "ring"
    assert C.best("all_reduce", H200, range(5), 2**30).algo == "nvls"
    a100 = load("dgx-a100", gpus=8)  # NVLS is H100+
    assert C.best("all_reduce", a100, range(8), 2**30).algo == "ring"


def test_tree_for_small_messages_at_scale():
    assert C.best("all_reduce", H100, range(1024), 2**16).algo == "tree"
    assert C.best("all_reduce", H100, range(16), 2**32).algo == "ring"
    # PAT needs one GPU per node
    assert C.best("all_gather", H100, range(0, 1024, 8), 2**24).algo == "pat"
    with pytest.raises(ValueError, match="cannot use pat"):
        C.best("all_gather", H100, range(16), 2**24, algo="pat")


def test_forced_algorithm_and_protocol():
    t_ring = C.all_reduce(H200, range(8), 2**30, algo="ring")
    t_best = C.all_reduce(H200, range(8), 2**30)
    assert t_ring > t_best
    assert C.best("all_reduce", H200, range(8), 2**10, protocol="Simple").protocol == "Simple"
    with pytest.raises(ValueError):
        C.all_reduce(H200, range(8), 2**30, algo="tree")  # one node: no tree in this model
    with pytest.raises(ValueError, match="unknown collective"):
        C.best("gather", H200, range(8), 1)


def test_bus_bandwidth_factors():
    assert C.bus_bandwidth("all_reduce", 8, 8e9, 1.0) == pytest.approx(14e9)
    assert C.bus_bandwidth("all_gather", 8, 8e9, 1.0) == pytest.approx(7e9)
    assert C.bus_bandwidth("reduce_scatter", 4, 8e9, 2.0) == pytest.approx(3e9)
    assert C.bus_bandwidth("alltoall", 2, 8e9, 1.0) == pytest.approx(4e9)
    assert C.bus_bandwidth("broadcast", 8, 8e9, 1.0) == pytest.approx(8e9)
    assert C.bus_bandwidth("send_recv", 2, 8e9, 1.0) == pytest.approx(8e9)


def test_alltoall_across_nodes_is_nic_bound():
    t_intra = C.all_to_all(H100, range(8), 2**30)
    t_inter = C.all_to_all(H100, range(32), 2**30)
    assert t_inter > 5 * t_intra
    # alltoall cannot aggregate NICs: 4 NICs per GPU give no more than one
    from tera.topologies import from_dict

    d = H100.to_dict()
    d["node"]["nics"]["count"] = 32
    d["gpus"] = 64
    fat = from_dict(d)
    assert C.all_to_all(fat, range(64), 2**30) == pytest.approx(
        C.all_to_all(load("dgx-h100", gpus=64), range(64), 2**30)
    )


def test_send_recv_uses_the_right_level():
    t_nvlink = C.send_recv(H100, 0, 1, 2**34)
    t_ib = C.send_recv(H100, 0, 8, 2**34)  # NCCL NVLink model vs one NDR NIC at 0.96
    assert t_ib / t_nvlink == pytest.approx((20.6 * 18) / (50 * 12 / 12.5), rel=1e-3)


def test_nvl72_rack_is_one_nvlink_level():
    c = load("gb200-nvl72")
    in_rack = C.all_reduce(c, [0, 1, 2], 2**30, algo="ring")  # trays 0 and 1 of rack 0
    across = C.all_reduce(c, [0, 72, 144], 2**30, algo="ring")  # 3 racks over IB
    assert across > 10 * in_rack  # 48 GB/s per GPU of IB vs NVLink's 722 GB/s
    assert math.isfinite(C.all_reduce(c, range(72), 2**30))


def test_local_cpu_is_priced_by_its_measured_loopback():
    c = load("local-cpu")
    t = C.all_reduce(c, range(2), 64 * 2**20)
    busbw = C.bus_bandwidth("all_reduce", 2, 64 * 2**20, t)
    assert 0.5e9 < busbw <= 1.16e9
