"""Presets, resizing, errors, the catalog against hardware-facts.yaml, span and serialisation."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tera import topologies
from tera.topologies import Cluster, ClusterError, catalog, collectives, from_dict, load
from tera.topologies.catalog import facts_ids

FACTS = Path(__file__).parents[3] / "shared" / "reference" / "hardware-facts.yaml"

BASE = {
    "name": "t",
    "gpus": 64,
    "node": {"gpu": "h100_sxm", "gpus": 8, "nics": {"count": 8, "gbps": 400, "kind": "ib"}},
    "network": {"kind": "fat_tree", "levels": 2, "radix": 64, "oversubscription": 1},
}


def variant(path: str, value, base=BASE):
    """BASE with the dotted `path` set to `value` (or deleted when value is ...)."""
    data = copy.deepcopy(base)
    *parents, key = path.split(".")
    d = data
    for p in parents:
        d = d[p]
    if value is ...:
        del d[key]
    else:
        d[key] = value
    return data


# ---- presets ---------------------------------------------------------------------------------
def test_preset_names():
    names = topologies.preset_names()
    for required in (
        "dgx-a100",
        "dgx-h100",
        "hgx-h800",
        "dgx-h200",
        "dgx-b200",
        "gb200-nvl72",
        "local-cpu",
    ):
        assert required in names


@pytest.mark.parametrize("name", topologies.preset_names())
def test_presets_load_and_cost(name):
    c = load(name)
    assert isinstance(c, Cluster) and c.name == name and c.num_gpus > 0
    assert c.describe().startswith(f"{name}: {c.num_gpus} x ")
    ranks = range(min(c.num_gpus, 16))
    assert collectives.all_reduce(c, ranks, 2**30) > 0
    assert Cluster.from_dict(c.to_dict()) == c


def test_describe_dgx_h100():
    assert load("dgx-h100").describe() == (
        "dgx-h100: 2048 x H100 SXM (256 nodes x 8), NVLink 450 GB/s, 8x400 Gb/s IB per node, "
        "fat-tree 3 levels 1:1"
    )


def test_gb200_rack_is_one_scaleup_domain():
    c = load("gb200-nvl72")
    assert (c.gpus_per_node, c.scaleup_domain) == (4, 72)
    levels = c.span(range(72))
    assert [lv.name for lv in levels] == ["nvlink"] and levels[0].units == 1
    levels = c.span(range(144))
    assert [lv.name for lv in levels] == ["nvlink", "leaf"] and levels[0].units == 2
    assert c.node_of(73) == (18, 1) and c.domain_of(73) == 1


def test_resize():
    c = load("dgx-h100", gpus=16)
    assert (c.num_gpus, c.num_nodes) == (16, 2)
    one = load("dgx-h100", gpus=4)  # fewer than a node: one partial node
    assert (one.num_gpus, one.num_nodes, one.gpus_per_node) == (4, 1, 8)
    assert load("dgx-h100", gpus=16384).num_nodes == 2048
    assert load("gb200-nvl72", gpus=8).num_nodes == 2
    for name in topologies.preset_names():  # every preset sizes to 16K GPUs
        big = load(name, gpus=16384)
        assert big.num_gpus == 16384 and big.span([0, 16383])[-1].units == 1
    grown = load("dgx-b200", gpus=4096)  # 16 SUs: a third (core) level, as in [S33]
    assert grown.network.levels == 3 and grown.network.oversubscription == (1.0, 1.0)
    with pytest.raises(ClusterError) as e:
        load("dgx-h100", gpus=12)
    assert e.value.field == "gpus" and "use 8 or 16" in str(e.value)


def test_load_yaml_path(tmp_path):
    import yaml

    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(BASE))
    c = load(p)
    assert c.name == "t" and c.num_gpus == 64
    assert load(str(p), gpus=8).num_gpus == 8


# ---- errors ----------------------------------------------------------------------------------
def test_unknown_preset_suggests():
    with pytest.raises(ClusterError) as e:
        load("dgx-h10")
    assert e.value.field == "cluster"
    assert str(e.value).startswith("cluster: unknown preset 'dgx-h10'; did you mean dgx-h100")


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nnode:\n  gpu: h100\n   gpus: 8\n")
    with pytest.raises(ClusterError) as e:
        load(p)
    assert e.value.field == "yaml" and e.value.line == 4 and "line 4" in str(e.value)


def test_missing_file():
    with pytest.raises(ClusterError) as e:
        load("/nonexistent/cluster.yaml")
    assert e.value.field == "cluster"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"name: x\xff\n", "x.yaml is not UTF-8 (byte 0xff at offset 7)"),
        (b"[" * 600 + b"]" * 600, "x.yaml nests too deeply to parse"),
        ("".join(f"{'  ' * i}k:\n" for i in range(600)).encode(), "nests too deeply"),
    ],
    ids=["not-utf8", "deep-flow", "deep-block"],
)
def test_a_file_that_does_not_read_as_yaml_is_refused(tmp_path, content, problem):
    p = tmp_path / "x.yaml"
    p.write_bytes(content)
    with pytest.raises(ClusterError) as e:
        load(p)
    assert e.value.field == "yaml" and problem in str(e.value)


def test_a_path_that_cannot_be_read_is_refused(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ClusterError, match=r"^cluster: cannot read .*dir.yaml': Is a directory"):
        load(tmp_path / "dir.yaml")
    with pytest.raises(ClusterError, match=r"^cluster: unknown preset 'xxxx"):
        load("x" * 5000)  # a name too long for the file system: not a path


CASES = [
    ("node.gpus", ..., "node.gpus: missing;"),
    ("gpus", ..., "gpus: missing;"),
    ("network", ..., "network: missing;"),
    ("node.gpu_count", 8, "node.gpu_count: unknown field;"),
    ("network.radixx", 64, "network.radixx: unknown field; did you mean radix?"),
    ("node.gpus", "eight", "node.gpus: must be an integer, got 'eight';"),
    ("node.nics.gbps", "400G", "node.nics.gbps: must be a number, got '400G';"),
    ("node.nics.gbps", 0, "node.nics.gbps: must be > 0, got 0;"),
    ("node.gpus", -8, "node.gpus: must be > 0, got -8;"),
    ("gpus", 12, "gpus: 12 is not a multiple of gpus_per_node 8; use 8 or 16"),
    ("node.gpu", "h1000", "node.gpu: unknown GPU 'h1000';"),
    ("network.kind", "fat-tree", "network.kind: unknown value 'fat-tree'; did you mean fat_tree?"),
    ("network.levels", 4, "network.levels: fat_tree supports 2 or 3 switch levels, got 4;"),
    (
        "network.oversubscription",
        0.5,
        "network.oversubscription: must be >= 1, got 0.5; use 1 for non-blocking",
    ),
    ("network.oversubscription", [1, 2], "network.oversubscription: 2 ratios for 2 switch levels;"),
    ("node.nics.count", 3, "node.nics.count: 3 NICs cannot be shared evenly by 8 GPUs;"),
    ("node.nics.kind", "infiniband", "node.nics.kind: unknown value 'infiniband';"),
    (
        "gpus",
        4096,
        "gpus: 4096 GPUs exceed what this fat-tree 2 levels 1:1 holds (2048); use levels: 3",
    ),
    ("network.radix", 12, "network.radix: a leaf's 6 down ports cannot take the 8 NICs"),
    ("node.scaleup", {"domain": 12}, "node.scaleup.domain: 12 GPUs is not a whole number"),
    ("node", [1], "node: must be a mapping, got list [1];"),
    ("node.nics.gbps", float("nan"), "node.nics.gbps: must be a finite number, got float nan;"),
    ("node.nics.gbps", float("inf"), "node.nics.gbps: must be a finite number, got float inf;"),
    ("node.scaleup", {"uni_gbs": 10**400}, "node.scaleup.uni_gbs: must be a finite number"),
    ("node.line\u2028break", 1, "node.'line\\u2028break': unknown field;"),
    ("name", "two\nlines", "name: 'two\\nlines' is not one line of text; rename it"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), CASES, ids=[f"{p}={v!r}" for p, v, _ in CASES]
)
def test_cluster_errors(path, value, message):
    with pytest.raises(ClusterError) as e:
        from_dict(variant(path, value))
    assert str(e.value).startswith(message), str(e.value)
    assert e.value.field == message.split(":")[0]
    assert isinstance(e.value, ValueError)
    assert str(e.value) == f"{e.value.field}: {e.value.problem}; {e.value.fix}"


def test_inline_gpu():
    gpu = {
        "name": "X1",
        "bf16_tflops": 100,
        "hbm_gb": 40,
        "hbm_gbs": 1000,
        "scaleup": {"uni_gbs": 200, "links": 8, "kind": "switch"},
    }
    c = from_dict(variant("node.gpu", gpu))
    assert c.gpu.bf16_flops == 100e12 and c.gpu.hbm_bytes == 40e9 and c.scaleup_bw == 200e9
    with pytest.raises(ClusterError) as e:
        from_dict(variant("node.gpu", {"name": "X1", "hbm_gb": 40, "hbm_gbs": 1}))
    assert e.value.field == "node.gpu.bf16_tflops"
    with pytest.raises(ClusterError) as e:
        from_dict(variant("node.gpu", {k: v for k, v in gpu.items() if k != "scaleup"}))
    assert e.value.field == "node.scaleup.uni_gbs"


# ---- catalog == hardware-facts ---------------------------------------------------------------
def test_catalog_matches_hardware_facts():
    if not FACTS.exists():
        pytest.skip(f"hardware-facts.yaml not found at {FACTS}")
    import yaml

    facts = {g["id"]: g for g in yaml.safe_load(FACTS.read_text())["gpus"]}
    nccl = yaml.safe_load(FACTS.read_text())["nccl_model"]["per_link_uni_gbs"]
    per_link = {
        "ampere": nccl["sm80_nvlink"],
        "hopper": nccl["sm90_nvlink"],
        "blackwell": nccl["sm100_nvlink"],
    }
    required = {
        "h100_sxm",
        "h200",
        "h800",
        "a100_40gb",
        "a100_80gb",
        "b200",
        "gb200",
        "mi300x",
        "cpu",
    }
    assert required <= set(catalog())
    assert catalog()["h100_sxm"] is topologies.get_gpu("H100")
    for gid, fid in facts_ids().items():
        gpu = catalog()[gid]
        if fid is None:
            assert "measured" in gpu.source
            continue
        f = facts[fid]
        assert gpu.arch == f["arch"]
        assert gpu.bf16_flops == f["bf16_tflops"] * 1e12
        assert gpu.fp8_flops == (None if f["fp8_tflops"] is None else f["fp8_tflops"] * 1e12)
        assert gpu.tf32_flops == f["tf32_tflops"] * 1e12
        assert gpu.hbm_bytes == f["hbm_gb"] * 1e9
        assert gpu.hbm_bw == f["hbm_bw_gbs"] * 1e9
        assert gpu.scaleup_uni_bw == f["scaleup"]["uni_gbs"] * 1e9
        assert gpu.tdp_w == f["tdp_w"]
        links = f["scaleup"].get("links", f["scaleup"].get("peer_links"))
        assert gpu.scaleup_links == links
        if gpu.nccl_link_bw is not None:
            assert gpu.nccl_link_bw == per_link[gpu.arch] * 1e9
            if "nccl_model_uni_gbs_per_link" in f["scaleup"]:
                assert gpu.nccl_link_bw == f["scaleup"]["nccl_model_uni_gbs_per_link"] * 1e9


# ---- span ------------------------------------------------------------------------------------
def test_span_levels():
    c = load("dgx-h100")  # leaves of 4 nodes, pods of 32 leaves
    assert [lv.name for lv in c.span([3])] == ["nvlink"]
    lv = c.span(range(8))
    assert len(lv) == 1 and lv[0].units == 1 and lv[0].ranks_per_unit == 8
    assert lv[0].bw_per_gpu == 450e9
    lv = c.span([0, 8, 16, 24])
    assert [x.name for x in lv] == ["nvlink", "leaf"] and lv[0].units == 4
    assert lv[1].bw_per_gpu == 50e9 and lv[1].ranks_per_unit == 4
    lv = c.span([0, 32 * 4 * 8])  # another pod
    assert [x.name for x in lv] == ["nvlink", "leaf", "spine", "core"]
    assert c.node_of(13) == (1, 5)
    with pytest.raises(ValueError):
        c.span([c.num_gpus])


def test_span_oversubscription_and_nic_sharing():
    data = variant(
        "network", {"kind": "fat_tree", "levels": 3, "radix": 16, "oversubscription": [2, 4]}
    )
    data = variant("node.nics", {"count": 2, "gbps": 400}, data)
    c = from_dict(variant("gpus", 8 * 512, data))
    # 2 x 400 Gb/s shared by 8 GPUs = 12.5 GB/s each; 4 nodes per leaf, 8 leaves per pod
    levels = c.span([0, 4 * 8 * 8])
    assert [lv.name for lv in levels] == ["nvlink", "leaf", "spine", "core"]
    assert [lv.bw_per_gpu for lv in levels] == [450e9, 12.5e9, 6.25e9, 1.5625e9]
    assert [lv.units for lv in levels] == [2, 2, 2, 1]


def test_mesh_pair_gets_one_link():
    c = from_dict(variant("node.gpu", "mi300x"))
    assert c.span([0, 1])[0].bw_per_gpu == 64e9
    assert c.span(range(8))[0].bw_per_gpu == 448e9
    assert c.span(range(8))[0].name == "xgmi"


# ---- serialisation and import cost -----------------------------------------------------------
def test_round_trip_and_digest():
    c = load("dgx-b200", gpus=256)
    assert Cluster.from_dict(c.to_dict()) == c
    assert c.digest() == Cluster.from_dict(c.to_dict()).digest()
    assert c.digest() != load("dgx-b200", gpus=512).digest()
    code = "from tera.topologies import load; print(load('dgx-b200', gpus=256).digest())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == c.digest()


def test_import_is_cheap():
    code = textwrap.dedent("""
        import sys, time
        t = time.perf_counter()
        import tera.topologies
        dt = time.perf_counter() - t
        assert 'torch' not in sys.modules and 'networkx' not in sys.modules, 'heavy import'
        print(dt)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 0.3
