"""Launch files that run `tera-run plan.json` on the plan's nodes: torchrun lines, an
sbatch script and a Kubernetes JobSet.

tera's rank map places ranks contiguously: node n holds ranks n*G .. n*G+G-1 (G GPUs per
node). Each launcher keeps that: torchrun uses a static rendezvous at node 0 with an
explicit --node-rank (a c10d rendezvous would number nodes in the order they join), srun
numbers tasks node by node, and the JobSet derives the node rank from its job and pod
indices.

Topology: under the default rank order (tp-cp-dp-pp, pp outermost) a pipeline stage is a
contiguous block of world/pp ranks, hence of consecutive nodes, and its data-parallel and
expert all-to-all traffic stays inside it. Keeping a stage under as few leaf switches as
possible keeps that traffic off the spine. Slurm gets `--switches` (the fewest leaves the
job fits in; Slurm's topology/tree plugin hands out nodes switch by switch, so consecutive
node ranks, one stage, share leaves); the JobSet gets one child Job per stage with
exclusive placement on a leaf-switch node label when a stage fits under one leaf.
"""

from __future__ import annotations

import math
import re

import yaml

from tera.planner.exports import MASTER_PORT, summary
from tera.planner.plan import Plan

LEAF_LABEL = "tera.dev/leaf-switch"  # a node label naming each node's leaf switch


def _run(plan_path: str) -> str:
    return f"tera-run {plan_path}"


def torchrun(plan: Plan, plan_path: str) -> str:
    c = plan.cluster
    lines = [
        f"# {summary(plan)}",
        "# run line n on node n; MASTER_ADDR is node 0's address, reachable from every node.",
        "# static rendezvous at node 0, so node n holds ranks "
        f"n*{c.gpus_per_node} .. n*{c.gpus_per_node}+{c.gpus_per_node - 1}, as the plan says.",
    ]
    for node in range(c.num_nodes):
        lines.append(
            f"torchrun --nnodes {c.num_nodes} --nproc-per-node {c.gpus_per_node} "
            f'--node-rank {node} --master-addr "$MASTER_ADDR" --master-port {MASTER_PORT} '
            f"--no-python {_run(plan_path)}"
        )
    return "\n".join(lines) + "\n"


def leaf_switches(plan: Plan) -> int | None:
    """The fewest leaf switches the job's nodes fit under, or None without a switch tier
    (one scale-up domain) or with an unbounded leaf."""
    c = plan.cluster
    tiers = c.tiers
    if not tiers or tiers[0].fan_in is None:
        return None
    leaf_gpus = tiers[0].fan_in * c.scaleup_domain
    return math.ceil(plan.world_size / leaf_gpus)


def stage_groups(plan: Plan) -> tuple[int, int] | None:
    """(groups, nodes per group) when each pipeline stage is a run of whole nodes
    (default rank order, world/pp a multiple of the node), else None."""
    c, lay = plan.cluster, plan.layout
    per_stage = plan.world_size // lay.pp
    if lay.order != "tp-cp-dp-pp" or lay.pp == 1 or per_stage % c.gpus_per_node:
        return None
    return lay.pp, per_stage // c.gpus_per_node


def slurm(plan: Plan, plan_path: str) -> str:
    c = plan.cluster
    name = _name(plan)
    lines = [
        "#!/bin/bash",
        f"# {summary(plan)}",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={c.num_nodes}",
        f"#SBATCH --ntasks-per-node={c.gpus_per_node}",
        f"#SBATCH --gpus-per-node={c.gpus_per_node}",
        "#SBATCH --exclusive",
    ]
    switches = leaf_switches(plan)
    if switches is not None:
        lines += [
            "# Topology hint: the fewest leaf switches the job fits under. Slurm's topology/tree",
            "# plugin allocates nodes switch by switch and srun numbers tasks node by node, so",
            "# the consecutive nodes of one pipeline stage share leaf switches and the stage's",
            "# data-parallel and all-to-all traffic stays off the spine.",
            f"#SBATCH --switches={switches}",
        ]
    lines += [
        "set -euo pipefail",
        "# rendezvous at the first node of the allocation (tera-run reads SLURM_PROCID,",
        "# SLURM_NTASKS and SLURM_LOCALID for the ranks)",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_ADDR MASTER_PORT={MASTER_PORT}",
        f"srun --kill-on-bad-exit=1 {_run(plan_path)}",
    ]
    return "\n".join(lines) + "\n"


def kubernetes(plan: Plan, plan_path: str) -> str:
    """A JobSet (jobset.x-k8s.io/v1alpha2): one Indexed child Job per pipeline stage (or one
    for the whole world), a pod per node, each pod running torchrun for its node's GPUs."""
    c = plan.cluster
    name = _name(plan)
    groups = stage_groups(plan)
    jobs, per_job = groups if groups else (1, c.num_nodes)
    leaf_nodes = None
    tiers = c.tiers
    if tiers and tiers[0].fan_in is not None:
        leaf_nodes = tiers[0].fan_in * c.scaleup_domain // c.gpus_per_node
    gpus = c.gpus_per_node
    master = f"{name}-node-0-0.{name}"  # JobSet pod DNS: <jobset>-<job>-<job index>-<pod>
    command = (
        f"torchrun --nnodes {c.num_nodes} --nproc-per-node {gpus} "
        f"--node-rank $((JOB_INDEX * {per_job} + JOB_COMPLETION_INDEX)) "
        f"--master-addr {master} --master-port {MASTER_PORT} "
        f"--no-python tera-run /etc/tera/{plan_path.rsplit('/', 1)[-1]}"
    )
    pod = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "trainer",
                "image": "REPLACE_WITH_YOUR_IMAGE",  # an image with tera installed
                "command": ["bash", "-c", command],
                "env": [
                    {
                        "name": "JOB_INDEX",
                        "valueFrom": {
                            "fieldRef": {
                                "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"
                            }
                        },
                    }
                ],
                "ports": [{"containerPort": MASTER_PORT}],
                "resources": {
                    "limits": {"nvidia.com/gpu": gpus},
                    "requests": {"nvidia.com/gpu": gpus},
                },
                "volumeMounts": [{"name": "plan", "mountPath": "/etc/tera", "readOnly": True}],
            }
        ],
        "volumes": [{"name": "plan", "configMap": {"name": f"{name}-plan"}}],
    }
    annotations = {}
    if groups and leaf_nodes is not None and per_job <= leaf_nodes:
        # one pipeline stage per leaf switch: the stage's traffic stays under its leaf
        annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] = LEAF_LABEL
    job = {
        "name": "node",
        "replicas": jobs,
        "template": {
            "spec": {
                "parallelism": per_job,
                "completions": per_job,
                "completionMode": "Indexed",
                "backoffLimit": 0,
                "template": {"metadata": {"labels": {"app": name}}, "spec": pod},
            }
        },
    }
    if annotations:
        job["template"]["metadata"] = {"annotations": annotations}
    manifest = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"network": {"enableDNSHostnames": True}, "replicatedJobs": [job]},
    }
    placement = (
        f"each of the {jobs} pipeline stages ({per_job} node(s)) on its own leaf switch: "
        f"label nodes with {LEAF_LABEL}=<switch name>"
        if annotations
        else "one child Job for the whole world (a stage is not a run of whole nodes that fits "
        "under one leaf switch)"
    )
    header = [
        f"# {summary(plan)}",
        f"# placement: {placement}.",
        f"# first: kubectl create configmap {name}-plan --from-file={plan_path}",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(manifest, sort_keys=False)


def _name(plan: Plan) -> str:
    """A DNS-1123 label for the job: tera-<model>, lower case, at most 40 characters."""
    text = re.sub(r"[^a-z0-9-]+", "-", f"tera-{plan.spec.name}".lower()).strip("-")
    return text[:40].rstrip("-")
