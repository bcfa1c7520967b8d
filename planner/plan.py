"""The plan: the versioned, self-describing JSON that `tera-plan search -o` writes and
`tera-run` reads.

A plan holds everything a launch needs without re-running the planner: the model
(`ModelSpec.to_dict()`) and the cluster (`Cluster.to_dict()`, sized to the world) each
with a sha256 digest, the global batch, sequence length and precision, the resolved layout
(every key set, `dp` and `partition` included) and its layout string, the mesh sizes
(innermost axis first), the rank map ([node, local GPU] of every rank), the pipeline
stages (which blocks each virtual chunk of each stage runs, and the stage's recompute
mode), the cost model's prediction (`Estimate.to_dict()`), the solver certificate (null
for a plan made from a hand-written layout) and provenance (tera, python, torch, ortools
and networkx versions, creation time in UTC).

Invariants `Plan.from_dict` / `Plan.load` check, each failure a PlanError that names the
field and the fix ("plan.<field>: <problem>; <fix>"), never a traceback:
  - the file exists and is JSON holding an object; `schema_version` is one this tera reads;
    every key is known and present with the right type;
  - the model and cluster parse and their digests equal the recomputed ones, so an edited
    model or cluster is caught;
  - the layout resolves against the model, world size, batch and sequence and equals its
    resolved self, and the layout string is its `str`;
  - mesh, ranks and stages are exactly what the resolved layout and the cluster give: they
    are derived data, stored so that readers (exports, tera-run, people) need not derive
    them, and a hand-edited plan that disagrees with its layout is refused;
  - the prediction holds at least step_time_s, fits, peak_memory_gib, mfu, breakdown_s and
    memory_gib, and describes this plan (its gpus, global_batch, seq_len, precision and
    layout, where present, are the plan's);
  - the certificate is null or holds exactly status (OPTIMAL | FEASIBLE), objective,
    objective_kind (step_time | cost | gpus), bound and gap >= 0;
  - the alternatives (the search's ranked plans, best first, this plan among them; empty
    for a plan made from a hand-written layout) each hold rank, gpus, layout_string,
    step_time_s, tokens_per_s_per_gpu, mfu, peak_memory_gib and fits.
`Plan.load(path)` of `plan.save(path)` equals `plan`, and a plan is a function of its
inputs: it holds no clock time (no creation date, no solver seconds), so the same search
writes the same bytes.

SCHEMA_VERSION bumps on any incompatible change: a key renamed, removed, retyped or given
a new meaning, and also a new top-level key, because unknown keys are refused (a typo in a
hand-edited plan must not be silently ignored). A reader refuses versions it does not know.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tera.models.spec import ModelSpec, SpecError
from tera.planner.errors import InputError
from tera.planner.layout import INT_KEYS, Layout, LayoutError, shown_key
from tera.topologies import Cluster, ClusterError
from tera.topologies import from_dict as cluster_from_dict

SCHEMA_VERSION = 2  # 2: no created time or solver seconds; alternatives added
READABLE_VERSIONS = (2,)  # schema versions this tera reads

# The precisions the cost model knows (tera.planner.cost.PRECISIONS; a test keeps them
# equal). Kept here so that reading a plan does not import the cost model.
PRECISIONS = ("bf16", "fp8", "fp32")
CERTIFICATE_KEYS = ("status", "objective", "objective_kind", "bound", "gap")
CERTIFICATE_STATUSES = ("OPTIMAL", "FEASIBLE")
OBJECTIVE_KINDS = ("step_time", "cost", "gpus")  # solve.objective.OBJECTIVES (a test)
PREDICTION_KEYS = {  # required key -> JSON type name
    "step_time_s": "number",
    "fits": "boolean",
    "peak_memory_gib": "number",
    "mfu": "number",
    "breakdown_s": "object",
    "memory_gib": "object",
}
PROVENANCE_KEYS = ("tera", "python", "torch", "ortools", "networkx")
ALTERNATIVE_KEYS = {  # key of each alternatives entry -> JSON type name
    "rank": "integer",
    "gpus": "integer",
    "layout_string": "string",
    "step_time_s": "number",
    "tokens_per_s_per_gpu": "number",
    "mfu": "number",
    "peak_memory_gib": "number",
    "fits": "boolean",
}
KEY_TYPES = {  # top-level key -> JSON type name, in file order
    "schema_version": "integer",
    "model": "object",
    "model_digest": "string",
    "cluster": "object",
    "cluster_digest": "string",
    "global_batch": "integer",
    "seq_len": "integer",
    "precision": "string",
    "layout": "object",
    "layout_string": "string",
    "mesh": "object",
    "ranks": "array",
    "stages": "array",
    "prediction": "object",
    "certificate": "object or null",
    "alternatives": "array",
    "provenance": "object",
}
REGENERATE = "restore it or write the plan again with tera-plan search -o"


class PlanError(InputError):
    """A plan that is malformed or disagrees with itself. `field` names the (dotted) key;
    the message is "<where>.<field>: <problem>; <fix>" with `where` "plan" by default."""

    def __init__(self, field_name: str, problem: str, fix: str, *, where: str = "plan"):
        self.problem = problem
        self.fix = fix
        self.prefix = f"{where}." if field_name else where
        super().__init__(field_name, problem, fix)


def provenance() -> dict[str, str | None]:
    """Versions of tera and the packages a plan depends on (None when one is not
    installed, read from package metadata so torch is never imported)."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "tera": version("tera"),
        "python": platform.python_version(),
        "torch": version("torch"),
        "ortools": version("ortools"),
        "networkx": version("networkx"),
    }


def model_digest(spec: ModelSpec) -> str:
    """sha256 of the canonical JSON of the model description."""
    blob = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Plan:
    spec: ModelSpec
    cluster: Cluster  # sized to the world
    layout: Layout  # resolved: dp and partition set
    global_batch: int
    seq_len: int
    precision: str  # bf16 | fp8 | fp32
    prediction: dict = field(hash=False)  # Estimate.to_dict() of this layout
    certificate: dict | None = field(hash=False)  # None: made from a hand-written layout
    provenance: dict = field(hash=False)
    alternatives: list = field(default_factory=list, hash=False)  # ALTERNATIVE_KEYS each

    @classmethod
    def build(
        cls,
        spec: ModelSpec,
        cluster: Cluster,
        layout: Layout,
        global_batch: int,
        seq_len: int,
        precision: str,
        prediction: dict,
        certificate: dict | None = None,
        alternatives: list | None = None,
    ) -> Plan:
        """A checked plan with provenance filled in. `layout` must be resolved against
        (spec, cluster.num_gpus, global_batch, seq_len). Prediction and certificate are
        stored as their JSON form (tuples become lists), so that a loaded plan is equal."""
        _check_int("global_batch", global_batch)
        _check_int("seq_len", seq_len)
        _check_precision(precision)
        _check_resolved(layout, spec, cluster, global_batch, seq_len)
        plan = cls(
            spec=spec,
            cluster=cluster,
            layout=layout,
            global_batch=global_batch,
            seq_len=seq_len,
            precision=precision,
            prediction=_as_json("prediction", prediction),
            certificate=_as_json("certificate", certificate),
            provenance=provenance(),
            alternatives=_as_json("alternatives", alternatives or []),
        )
        _check_prediction(plan.prediction, plan)
        _check_certificate(plan.certificate)
        _check_alternatives(plan.alternatives, plan)
        return plan

    # ---- derived views ---------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.cluster.num_gpus

    def mesh(self) -> dict[str, list[list]]:
        """Axis sizes of the dense and expert meshes, innermost (stride 1) first."""
        shape = self.layout.mesh
        return {
            m: [[axis, size] for axis, size in shape.sizes(m).items()] for m in ("dense", "expert")
        }

    def rank_map(self) -> list[list[int]]:
        """[node, local GPU] of every rank, indexed by rank."""
        return [list(self.cluster.node_of(rank)) for rank in range(self.world_size)]

    def stages(self) -> list[dict[str, Any]]:
        """Per pipeline stage: its recompute mode and its virtual chunks in chunk order,
        each with its first and last block (inclusive). Chunk c runs on stage c % pp and
        the chunks hold consecutive blocks from block 0."""
        pp = self.layout.pp
        stages = [
            {"stage": s, "recompute": mode, "chunks": []}
            for s, mode in enumerate(self.layout.stage_recompute)
        ]
        first = 0
        for chunk, blocks in enumerate(self.layout.chunk_sizes(self.spec.layers)):
            stages[chunk % pp]["chunks"].append(
                {"chunk": chunk, "first_layer": first, "last_layer": first + blocks - 1}
            )
            first += blocks
        return stages

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.spec.to_dict(),
            "model_digest": model_digest(self.spec),
            "cluster": self.cluster.to_dict(),
            "cluster_digest": self.cluster.digest(),
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "layout": self.layout.to_dict(),
            "layout_string": str(self.layout),
            "mesh": self.mesh(),
            "ranks": self.rank_map(),
            "stages": self.stages(),
            "prediction": self.prediction,
            "certificate": self.certificate,
            "alternatives": self.alternatives,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, indent 1, with lists of numbers or strings on one line
        and the rank map one node per line (16384 ranks make 2048 short lines)."""
        data = self.to_dict()
        per_node = self.cluster.gpus_per_node
        rows = [data["ranks"][i : i + per_node] for i in range(0, self.world_size, per_node)]
        items = [
            f" {json.dumps(key)}: {_rank_rows(rows) if key == 'ranks' else _to_json(value, 1)}"
            for key, value in data.items()
        ]
        Path(path).write_text("{\n" + ",\n".join(items) + "\n}\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and validate a plan file (see the module docstring)."""
        path = Path(path)
        fix = "give the path of a plan written by tera-plan search -o"
        try:
            text = path.read_bytes().decode("utf-8")
        except (FileNotFoundError, NotADirectoryError):
            raise PlanError("file", f"{str(path)!r} not found", fix) from None
        except IsADirectoryError:
            raise PlanError("file", f"{str(path)!r} is a directory", fix) from None
        except (OSError, ValueError) as exc:  # no permission, a name the OS refuses, not UTF-8
            raise PlanError("file", f"cannot read {str(path)!r} ({exc})", fix) from exc

        def refuse_constant(name: str):
            raise PlanError("file", f"{str(path)!r} holds {name}, which is not JSON", fix)

        try:
            data = json.loads(text, parse_constant=refuse_constant)
        except json.JSONDecodeError as exc:
            raise PlanError(
                "file",
                f"{str(path)!r} is not JSON (line {exc.lineno} column {exc.colno}: {exc.msg})",
                fix,
            ) from exc
        except RecursionError:
            raise PlanError("file", f"{str(path)!r} nests too deeply to be a plan", fix) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> Plan:
        """Validate a plan's JSON object and build the Plan. `where` prefixes the error
        messages (e.g. "runs[3].plan" when the plan is embedded in another document)."""
        try:
            return cls._from_dict(data)
        except PlanError as exc:
            if where == "plan":
                raise
            raise PlanError(exc.field, exc.problem, exc.fix, where=where) from exc

    @classmethod
    def _from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(
                "", f"expected a JSON object, got {_json_type(data)}", "write a plan object"
            )
        _check_version(data)
        unknown = sorted(set(data) - set(KEY_TYPES))
        if unknown:
            raise PlanError(
                shown_key(unknown[0]),
                "unknown key",
                f"remove it; a plan holds {', '.join(KEY_TYPES)}",
            )
        for key, kind in KEY_TYPES.items():
            if key not in data:
                raise PlanError(key, "missing", f"add it ({kind}), or {REGENERATE}")
            if not _is(data[key], kind):
                raise PlanError(
                    key, f"expected {kind}, got {_json_type(data[key])}", f"fix it, or {REGENERATE}"
                )
        spec = _parse_model(data["model"])
        if data["model_digest"] != model_digest(spec):
            raise PlanError(
                "model_digest",
                "does not match the model: the model was edited after the plan was made",
                "plan again for the edited model (tera-plan search -o), or undo the edit",
            )
        cluster = _parse_cluster(data["cluster"])
        if data["cluster_digest"] != cluster.digest():
            raise PlanError(
                "cluster_digest",
                "does not match the cluster: the cluster was edited after the plan was made",
                "plan again for the edited cluster (tera-plan search -o), or undo the edit",
            )
        global_batch, seq_len = data["global_batch"], data["seq_len"]
        _check_int("global_batch", global_batch)
        _check_int("seq_len", seq_len)
        _check_precision(data["precision"])
        layout = _parse_layout(data["layout"])
        _check_resolved(layout, spec, cluster, global_batch, seq_len)
        _check_provenance(data["provenance"])
        _check_certificate(data["certificate"])
        plan = cls(
            spec=spec,
            cluster=cluster,
            layout=layout,
            global_batch=global_batch,
            seq_len=seq_len,
            precision=data["precision"],
            prediction=_as_json("prediction", data["prediction"]),  # a copy, never NaN
            certificate=_as_json("certificate", data["certificate"]),
            provenance=_as_json("provenance", data["provenance"]),
            alternatives=_as_json("alternatives", data["alternatives"]),
        )
        if data["layout_string"] != str(layout):
            raise PlanError(
                "layout_string",
                f"{data['layout_string']!r} disagrees with the layout {str(layout)!r}",
                REGENERATE,
            )
        _check_derived("mesh", data["mesh"], plan.mesh())
        _check_ranks(data["ranks"], plan.rank_map())
        _check_stages(data["stages"], plan.stages())
        _check_prediction(data["prediction"], plan)
        _check_alternatives(plan.alternatives, plan)
        return plan


# ---- writing ------------------------------------------------------------------------------
def _to_json(value: Any, level: int) -> str:
    """Strict JSON (no NaN), indent 1 per level, a list of scalars on one line."""
    pad = " " * level
    if isinstance(value, dict) and value:
        items = [f"{pad} {json.dumps(str(k))}: {_to_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        items = [f"{pad} {_to_json(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, allow_nan=False)


def _rank_rows(rows: list[list[list[int]]]) -> str:
    """The rank map, one row of compact [node,gpu] pairs per line."""
    lines = [",".join(f"[{node},{gpu}]" for node, gpu in row) for row in rows]
    return "[\n  " + ",\n  ".join(lines) + "\n ]"


# ---- parsing the parts ----------------------------------------------------------------------
def _split(message: str, prefix: str) -> tuple[str, str]:
    """'<prefix>: <problem>; <fix>' -> (problem, fix)."""
    body = message[len(prefix) + 2 :] if message.startswith(prefix + ": ") else message
    problem, _, fix = body.partition("; ")
    return problem, fix or "fix it"


def _parse_model(data: dict) -> ModelSpec:
    try:
        return ModelSpec.from_dict(data)
    except SpecError as exc:
        name = "model" if exc.field == "model" else f"model.{exc.field}"
        raise PlanError(name, *_split(str(exc), exc.field)) from exc
    except (TypeError, ValueError) as exc:  # a value the spec's own checks did not foresee
        raise PlanError("model", f"invalid ({exc})", f"fix the model, or {REGENERATE}") from exc


def _parse_cluster(data: dict) -> Cluster:
    try:
        return cluster_from_dict(data)
    except ClusterError as exc:
        name = "cluster" if exc.field == "cluster" else f"cluster.{exc.field}"
        raise PlanError(name, exc.problem, exc.fix) from exc
    except (TypeError, ValueError) as exc:
        raise PlanError("cluster", f"invalid ({exc})", f"fix the cluster, or {REGENERATE}") from exc


def _parse_layout(data: dict) -> Layout:
    """Layout.from_dict after checking keys and types, which it leaves to the caller."""
    known = {f.name for f in dataclasses.fields(Layout)}
    for key, value in data.items():
        name = f"layout.{shown_key(key)}"
        if key not in known:
            raise PlanError(name, "unknown key", f"use one of {', '.join(sorted(known))}")
        if key in INT_KEYS:
            low = 0 if key == "zero" else 1
            if not (value is None and key == "dp") and not (_is(value, "integer") and value >= low):
                raise PlanError(name, f"expected an integer >= {low}, got {value!r}", "fix it")
        elif key == "partition":
            if value is not None and not (
                isinstance(value, list) and all(_is(v, "integer") and v >= 1 for v in value)
            ):
                raise PlanError(
                    name, f"expected a list of positive integers, got {value!r}", "fix it"
                )
        elif not isinstance(value, str):
            raise PlanError(name, f"expected a string, got {value!r}", "fix it")
    try:
        return Layout.from_dict(data)
    except LayoutError as exc:
        raise PlanError(f"layout.{exc.field}", *_split(str(exc), f"layout.{exc.field}")) from exc


def _check_resolved(
    layout: Layout, spec: ModelSpec, cluster: Cluster, global_batch: int, seq_len: int
) -> None:
    try:
        resolved = layout.resolve(spec, cluster.num_gpus, global_batch, seq_len)
    except LayoutError as exc:
        raise PlanError(f"layout.{exc.field}", *_split(str(exc), f"layout.{exc.field}")) from exc
    if resolved != layout:
        raise PlanError(
            "layout",
            f"{str(layout)!r} is not resolved (resolving gives {str(resolved)!r})",
            "store the resolved layout (Layout.resolve)",
        )


# ---- checks ---------------------------------------------------------------------------------
def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "object or null":
        return value is None or isinstance(value, dict)
    raise AssertionError(kind)


def _json_type(value: Any) -> str:
    for kind in ("boolean", "integer", "number", "string", "array", "object"):
        if _is(value, kind):
            return kind
    return "null" if value is None else type(value).__name__


def _as_json(name: str, value: Any) -> Any:
    """The value as a reader of the file will see it (strict JSON: no NaN or infinity)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise PlanError(
            name, f"not storable as JSON ({exc})", "pass plain numbers, strings, lists, dicts"
        ) from exc


def _check_version(data: dict) -> None:
    readable = ", ".join(map(str, READABLE_VERSIONS))
    if "schema_version" not in data:
        raise PlanError(
            "schema_version", "missing", f"this tera reads schema versions {readable}; {REGENERATE}"
        )
    version = data["schema_version"]
    if not _is(version, "integer") or version not in READABLE_VERSIONS:
        raise PlanError(
            "schema_version",
            f"{version!r} is not a version this tera reads ({readable})",
            "write it again with this tera (tera-plan search -o), or use the tera that made it",
        )


def _check_int(name: str, value: Any) -> None:
    if not _is(value, "integer") or value < 1:
        raise PlanError(name, f"must be a positive integer, got {value!r}", "fix it")


def _check_precision(precision: Any) -> None:
    if precision not in PRECISIONS:
        raise PlanError("precision", f"unknown {precision!r}", f"use {'|'.join(PRECISIONS)}")


def _check_derived(name: str, stored: Any, expected: Any) -> None:
    if stored != expected:
        raise PlanError(
            name, f"{stored!r} disagrees with the layout, which gives {expected!r}", REGENERATE
        )


def _check_ranks(stored: list, expected: list[list[int]]) -> None:
    if len(stored) != len(expected):
        raise PlanError(
            "ranks", f"{len(stored)} ranks for a world of {len(expected)} GPUs", REGENERATE
        )
    for rank, (got, want) in enumerate(zip(stored, expected, strict=True)):
        if got != want:
            raise PlanError(
                "ranks", f"rank {rank} is {got!r}, the cluster places it at {want!r}", REGENERATE
            )


def _check_stages(stored: list, expected: list[dict]) -> None:
    if len(stored) != len(expected):
        raise PlanError("stages", f"{len(stored)} stages for pp={len(expected)}", REGENERATE)
    for s, (got, want) in enumerate(zip(stored, expected, strict=True)):
        if got != want:
            raise PlanError(
                "stages", f"stage {s} is {got!r}, the layout gives {want!r}", REGENERATE
            )


def _check_prediction(prediction: dict, plan: Plan) -> None:
    fix = "store Estimate.to_dict() of this layout (tera.planner.evaluate)"
    if not isinstance(prediction, dict):
        raise PlanError("prediction", f"expected an object, got {_json_type(prediction)}", fix)
    for key, kind in PREDICTION_KEYS.items():
        if key not in prediction:
            raise PlanError(f"prediction.{key}", "missing", fix)
        if not _is(prediction[key], kind):
            raise PlanError(
                f"prediction.{key}", f"expected {kind}, got {_json_type(prediction[key])}", fix
            )
    own = {
        "gpus": plan.world_size,
        "global_batch": plan.global_batch,
        "seq_len": plan.seq_len,
        "precision": plan.precision,
        "layout": plan.layout.to_dict(),
    }
    for key, value in own.items():
        if key in prediction and prediction[key] != value:
            raise PlanError(
                f"prediction.{key}",
                f"{prediction[key]!r} but the plan's is {value!r}: a prediction for another plan",
                fix,
            )


def _check_certificate(certificate: dict | None) -> None:
    if certificate is None:
        return
    fix = "store the solver's certificate, or null for a hand-written layout"
    if not isinstance(certificate, dict):
        raise PlanError("certificate", f"expected an object, got {_json_type(certificate)}", fix)
    keys = set(certificate)
    if keys != set(CERTIFICATE_KEYS):
        missing, extra = set(CERTIFICATE_KEYS) - keys, keys - set(CERTIFICATE_KEYS)
        name = shown_key(sorted(missing or extra)[0])
        problem = "missing" if missing else "unknown key"
        keys_text = ", ".join(CERTIFICATE_KEYS)
        raise PlanError(f"certificate.{name}", problem, f"{fix}; it holds {keys_text}")
    if certificate["status"] not in CERTIFICATE_STATUSES:
        raise PlanError(
            "certificate.status",
            f"{certificate['status']!r} is not a solution status",
            f"use {'|'.join(CERTIFICATE_STATUSES)}",
        )
    if certificate["objective_kind"] not in OBJECTIVE_KINDS:
        raise PlanError(
            "certificate.objective_kind",
            f"unknown {certificate['objective_kind']!r}",
            f"use {'|'.join(OBJECTIVE_KINDS)}",
        )
    for key in ("objective", "bound", "gap"):
        value = certificate[key]
        if not _is(value, "number") or not math.isfinite(value):
            raise PlanError(f"certificate.{key}", f"expected a finite number, got {value!r}", fix)
    if certificate["gap"] < 0:
        raise PlanError("certificate.gap", f"{certificate['gap']} is negative", "it is >= 0")


def _check_alternatives(alternatives: list, plan: Plan) -> None:
    fix = "store the search's ranked plans, or [] for a hand-written layout"
    if not isinstance(alternatives, list):
        raise PlanError("alternatives", f"expected an array, got {_json_type(alternatives)}", fix)
    for i, entry in enumerate(alternatives):
        where = f"alternatives[{i}]"
        if not isinstance(entry, dict):
            raise PlanError(where, f"expected an object, got {_json_type(entry)}", fix)
        for key, kind in ALTERNATIVE_KEYS.items():
            if key not in entry:
                raise PlanError(f"{where}.{key}", "missing", fix)
            if not _is(entry[key], kind) or kind == "number" and not math.isfinite(entry[key]):
                raise PlanError(f"{where}.{key}", f"expected a {kind}, got {entry[key]!r}", fix)
        extra = sorted(set(entry) - set(ALTERNATIVE_KEYS))
        if extra:
            raise PlanError(f"{where}.{shown_key(extra[0])}", "unknown key", f"remove it; {fix}")
        if entry["rank"] != i + 1:
            raise PlanError(f"{where}.rank", f"{entry['rank']} out of order", f"it is {i + 1}")
    own = (plan.world_size, str(plan.layout))
    if alternatives and own not in [(a["gpus"], a["layout_string"]) for a in alternatives]:
        raise PlanError(
            "alternatives", f"do not include this plan's layout {own[1]!r} on {own[0]} GPUs", fix
        )


def _check_provenance(prov: dict) -> None:
    fix = "restore it; provenance() builds it"
    for key in PROVENANCE_KEYS:
        if key not in prov:
            raise PlanError(f"provenance.{key}", "missing", fix)
        if not (prov[key] is None or isinstance(prov[key], str)):
            raise PlanError(f"provenance.{key}", f"expected a string, got {prov[key]!r}", fix)
