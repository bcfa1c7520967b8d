"""Fuzzing every input boundary of the CLIs (issue 8, item 2): hypothesis-generated model
YAML, cluster YAML, layout strings, plan JSON and numeric flags, fed to
`tera.planner.cli.main` in process.

The property, for every example: the exit status is 0, 2 or 3 (1 is an internal error, a
bug), nothing on stderr is a traceback, and a refusal is exactly one line starting
"error: " or "infeasible: ". An example that runs longer than HANG_S raises Hang, which
no `except Exception` can swallow, so a hang fails the test instead of stalling it.

Every example stays cheap: the model fuzz resolves an impossible batch (3 sequences on 8
data-parallel ranks), so a model that parses is refused at the layout, before the trace;
a smaller set traces mutations of tiny-moe in full. Hypothesis is derandomized, so CI
replays the same examples; the last test checks that at least 2,000 ran.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import signal
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tera.models.spec import PRESET_DIR as MODEL_PRESETS
from tera.planner.cli import EXPORT_FORMATS, build_parser, main
from tera.planner.plan import Plan, PlanError
from tera.topologies.cluster import PRESET_DIR as CLUSTER_PRESETS

from .test_plan import make_plan

HANG_S = 20  # far above any example (the slowest trace takes about 0.2 s)
MIN_EXAMPLES = 2000
EXAMPLES = {  # fuzz test -> max_examples; their sum is the run's size
    "test_model_yaml_mutations": 450,
    "test_model_yaml_documents": 150,
    "test_model_yaml_mutations_traced": 80,
    "test_cluster_yaml_mutations": 400,
    "test_cluster_yaml_documents": 100,
    "test_layout_strings": 460,
    "test_plan_json_mutations": 400,
    "test_numeric_flags": 300,
}
ran: Counter[str] = Counter()  # fuzz test -> examples actually run


def fuzz(name: str):
    """Hypothesis settings for fuzz test `name`: derandomized, no example database, a
    generous deadline (a shared 2-core machine) that still flags a slow path."""
    return settings(
        max_examples=EXAMPLES[name],
        derandomize=True,
        database=None,
        deadline=5000,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Hang(BaseException):
    """An example ran past HANG_S (a BaseException: the CLI's `except Exception` and its
    internal-error path let it through)."""


def _alarm(signum, frame):
    raise Hang(f"an example ran longer than {HANG_S} s")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of tera-plan `argv`, in process, within HANG_S."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue()


def check_outcome(argv: list[str]) -> tuple[int, str]:
    """Run the CLI and assert the fuzz property; returns (status, the error line or '')."""
    code, _, err = run_cli(argv)
    assert "Traceback" not in err, err
    assert code in (0, 2, 3), f"exit {code} for {argv}:\n{err}"
    if code == 0:
        return code, ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines for {argv}:\n{err}"
    prefix = "infeasible: " if code == 3 else "error: "
    assert lines[0].startswith(prefix), lines[0]
    return code, lines[0]


@pytest.fixture(scope="module", autouse=True)
def warm():
    """Import torch and trace tiny-moe once, so that no example pays for it."""
    code, _, err = run_cli([*EVALUATE, "--gpus", "8", "--layout", "tp=1", "--global-batch", "8"])
    assert code == 0, err


# ---- values and mutations ------------------------------------------------------------------
NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**30, -(10**30)]),
    st.integers(-5, 600),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, -0.0, 1e-300, 1e308]),
)
WRONG = st.one_of(
    NUMBERS,
    st.none(),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", "8", "eight", "1e3", "tp=2", "null", "-"]),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2),
)


def paths(doc, prefix=()) -> list[tuple]:
    """Every key path of a nested document (dict keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += paths(value, (*prefix, index))
    return found


KEYS = st.one_of(
    st.sampled_from(["extra", "layerz", "gpu", "1", "Hidden", "a\nb", "a\u2028b"]),
    st.text(max_size=4),
)
SCALES = [0.5, 3, 1e-12, 1e12, 1e-300, 1e300]


@st.composite
def mutated(draw, doc):
    """`doc` after one to three random edits: a key deleted, renamed or added, or a value
    replaced by a wrong type, a negative, zero, huge or non-finite number or a string; or
    a number moved to a nearby or an extreme value of the right type (so that a mutant
    may still parse and fail deeper, or not at all)."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        where = paths(doc)
        if not where:
            break
        path = draw(st.sampled_from(where))
        *parents, last = path
        parent = doc
        for part in parents:
            parent = parent[part]
        ops = ["delete", "replace", "replace", "nearby", "nearby", "add", "rename"]
        op = draw(st.sampled_from(ops))
        value = parent[last]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if op == "delete":
            del parent[last]
        elif op == "nearby" and isinstance(value, int) and number:
            parent[last] = draw(st.sampled_from([value - 1, value + 1, value * 2, value // 2, 3]))
        elif op == "nearby" and number:
            parent[last] = value * draw(st.sampled_from(SCALES))
        elif op in ("replace", "nearby"):
            parent[last] = draw(WRONG)
        elif op == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(WRONG)
        elif op == "rename" and isinstance(parent, dict):
            parent[str(last).upper() + "_"] = parent.pop(last)
    return doc


def serialised(doc, damage: str, position: int, insert: str) -> bytes:
    """`doc` as YAML, then damaged: cut at `position`, `insert`ed there, or not at all."""
    text = yaml.safe_dump(doc, sort_keys=False).encode()
    cut = position % (len(text) + 1)
    if damage == "truncate":
        return text[:cut]
    if damage == "insert":
        return text[:cut] + insert.encode("utf-8", "surrogateescape") + text[cut:]
    if damage == "non-utf8":
        return text[:cut] + b"\xff\xfe\xc3" + text[cut:]
    return text


DAMAGE = st.sampled_from(["none", "none", "none", "truncate", "insert", "non-utf8"])
INSERTS = st.one_of(
    st.sampled_from([":", "- ", "{", "]", "\t", "  ", "&a", "*a", "!!python/name:os.system", '"']),
    st.text(max_size=6),
)


def deep(depth: int, block: bool) -> bytes:
    """A document nested `depth` deep: flow lists, or block mappings."""
    if block:
        return "".join(f"{'  ' * i}k:\n" for i in range(depth)).encode()
    return ("[" * depth + "]" * depth).encode()


def raw_documents():
    """Whole files that are not a model or a cluster: random YAML values, deep nesting,
    random text and bytes."""
    scalars = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8))
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=12,
    )
    return st.one_of(
        values.map(lambda v: yaml.safe_dump(v).encode()),
        # past the parser's recursion limit (about 500 levels) at 600; deep parses are slow
        st.builds(deep, st.sampled_from([3, 60, 300, 600]), st.booleans()),
        st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogateescape")),
        st.binary(max_size=60),
    )


def presets(directory: Path) -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(directory.glob("*.yaml"))}


MODELS = presets(MODEL_PRESETS)
CLUSTERS = presets(CLUSTER_PRESETS)
EVALUATE = ["evaluate", "tiny-moe", "--cluster", "dgx-h100", "--seq-len", "64"]
# tp=1 on 8 GPUs is dp=8, which a batch of 3 sequences cannot fill: every model that parses
# is refused at layout.mbs, before the (slow) trace.
REFUSED_AT_RESOLVE = ["--gpus", "8", "--layout", "tp=1", "--global-batch", "3"]


def model_argv(path: Path) -> list[str]:
    return ["evaluate", str(path), "--cluster", "dgx-h100", "--seq-len", "64", *REFUSED_AT_RESOLVE]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The directory every example writes its file to (one file per example at a time)."""
    return tmp_path_factory.mktemp("fuzz")


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


# ---- model YAML ----------------------------------------------------------------------------
@fuzz("test_model_yaml_mutations")
@given(
    st.sampled_from(sorted(MODELS)).flatmap(lambda name: mutated(MODELS[name])),
    DAMAGE,
    st.integers(0, 10**6),
    INSERTS,
)
def test_model_yaml_mutations(scratch, doc, damage, position, insert):
    ran["test_model_yaml_mutations"] += 1
    path = write(scratch, "model.yaml", serialised(doc, damage, position, insert))
    code, line = check_outcome(model_argv(path))
    assert code == 2  # a model that parses is refused at the batch
    if damage == "none" and "layout." in line:
        assert line.startswith("error: layout.mbs: "), line


@fuzz("test_model_yaml_documents")
@given(raw_documents())
def test_model_yaml_documents(scratch, data):
    ran["test_model_yaml_documents"] += 1
    path = write(scratch, "model.yaml", data)
    code, _ = check_outcome(model_argv(path))
    assert code == 2


@fuzz("test_model_yaml_mutations_traced")
@given(mutated(MODELS["tiny-moe"]))
def test_model_yaml_mutations_traced(scratch, doc):
    """Mutants of tiny-moe that parse are traced and costed: the model's own checks must
    refuse what the trace or the cost model cannot handle."""
    ran["test_model_yaml_mutations_traced"] += 1
    path = write(scratch, "model.yaml", yaml.safe_dump(doc).encode())
    argv = ["evaluate", str(path), "--cluster", "dgx-h100", "--gpus", "8", "--seq-len", "16"]
    check_outcome([*argv, "--layout", "tp=1", "--global-batch", "8"])


# ---- cluster YAML --------------------------------------------------------------------------
@fuzz("test_cluster_yaml_mutations")
@given(
    st.sampled_from(sorted(CLUSTERS)).flatmap(lambda name: mutated(CLUSTERS[name])),
    DAMAGE,
    st.integers(0, 10**6),
    INSERTS,
    st.sampled_from([True, True, True, False]),
)
def test_cluster_yaml_mutations(scratch, doc, damage, position, insert, resize):
    ran["test_cluster_yaml_mutations"] += 1
    path = write(scratch, "c.yaml", serialised(doc, damage, position, insert))
    gpus = ["--gpus", "8"] if resize else []
    argv = ["evaluate", "tiny-moe", "--cluster", str(path), "--seq-len", "64", *gpus]
    check_outcome([*argv, "--layout", "tp=1", "--global-batch", "8"])


@fuzz("test_cluster_yaml_documents")
@given(raw_documents())
def test_cluster_yaml_documents(scratch, data):
    ran["test_cluster_yaml_documents"] += 1
    path = write(scratch, "c.yaml", data)
    code, _ = check_outcome(
        ["evaluate", "tiny-moe", "--cluster", str(path), "--seq-len", "64", *REFUSED_AT_RESOLVE]
    )
    assert code == 2


# ---- layout strings ------------------------------------------------------------------------
LAYOUT_KEYS = ["tp", "pp", "vpp", "ep", "etp", "cp", "dp", "dp_replicate", "zero", "mbs"]
LAYOUT_WORDS = ["recompute", "schedule", "partition", "order", "bogus", "TP", "t p", ""]
LAYOUT_VALUES = st.one_of(
    st.sampled_from(["1", "2", "4", "8", "0", "-1", "3", "16", "1.5", "2e3", "", " 2", "²", "٢"]),
    st.integers(0, 2**70).map(str),
    st.sampled_from(["selective", "full", "none", "full:none", "interleaved", "1f1b", "3:1"]),
    st.sampled_from(["1:1:1:1", "2:2", "4", "0:4", "1::3", "tp-cp-pp-dp", "TP-CP-DP-PP"]),
    st.text(max_size=6),
)


@st.composite
def layout_strings(draw):
    """Near-misses of valid layouts (known and unknown keys, repeats, bad numbers, a
    missing '=', other separators) and random text."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.text(max_size=40))
    items = []
    for _ in range(draw(st.integers(0, 5))):
        key = draw(st.sampled_from(LAYOUT_KEYS + LAYOUT_WORDS))
        equals = draw(st.sampled_from(["=", "=", "=", ":", "==", " = ", ""]))
        items.append(f"{key}{equals}{draw(LAYOUT_VALUES)}")
    return draw(st.sampled_from([",", ",", ",", ";", " ", ", "])).join(items)


@fuzz("test_layout_strings")
@given(layout_strings(), st.sampled_from(["tiny-moe", "mixtral-8x7b", "deepseek-v3"]))
def test_layout_strings(text, model):
    """Each layout against tiny-moe (traced once) or, with a batch no layout of 8 GPUs
    divides, against a large preset (refused before its trace)."""
    ran["test_layout_strings"] += 1
    batch = "16" if model == "tiny-moe" else "3"
    argv = ["evaluate", model, "--cluster", "dgx-h100", "--gpus", "8", "--seq-len", "64"]
    check_outcome([*argv, "--global-batch", batch, "--layout", text])


# ---- plan JSON -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plan_doc() -> dict:
    """A valid plan's JSON object (16 GPUs, tp2 pp2 ep4, a certificate, alternatives)."""
    return make_plan().to_dict()


def plan_text(doc, damage: str, position: int, depth: int) -> str:
    """The plan as JSON text, then damaged: NaN and Infinity (literals JSON does not
    allow), a value nested `depth` deep, a cut, or a stray '{"'."""
    text = json.dumps(doc, indent=1)
    cut = position % (len(text) + 1)
    if damage == "nan":
        return text.replace('"seq_len": 256', '"seq_len": NaN', 1).replace("0.05", "Infinity")
    if damage == "deep":
        nested = "[" * depth + "]" * depth
        return text.replace('"provenance": {', f'"provenance": {{"deep": {nested}, ', 1)
    return {"truncate": text[:cut], "insert": text[:cut] + '{"' + text[cut:]}.get(damage, text)


@given(data=st.data())
@fuzz("test_plan_json_mutations")
def test_plan_json_mutations(scratch, plan_doc, data):
    ran["test_plan_json_mutations"] += 1
    doc = data.draw(mutated(plan_doc))
    damages = ["none"] * 6 + ["truncate", "insert", "nan", "deep"]
    damage = data.draw(st.sampled_from(damages))
    text = plan_text(doc, damage, data.draw(st.integers(0, 10**6)), data.draw(st.integers(1, 5000)))
    path = write(scratch, "plan.json", text.encode())
    try:  # the Python API refuses with PlanError and nothing else
        Plan.load(path)
    except PlanError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("plan")
    check_outcome(["export", str(path), "--format", data.draw(st.sampled_from(EXPORT_FORMATS))])


# ---- numeric flags ---------------------------------------------------------------------------
REQUIRED = {  # command -> its required arguments (placeholders: only the parser runs)
    "evaluate": ["m", "--cluster", "c", "--layout", "l", "--global-batch", "8", "--seq-len", "8"],
    "search": ["m", "--cluster", "c", "--global-batch", "8", "--seq-len", "8"],
    "estimate": ["m", "--cluster", "c", "--tokens", "1T", "--global-batch", "8", "--seq-len", "8"],
}
FLAGS = {  # (command, numeric flag) -> the least value it takes, and whether that is allowed
    **{("evaluate", f): (1, True) for f in ("--gpus", "--global-batch", "--seq-len")},
    ("evaluate", "--imbalance"): (1, True),
    ("search", "--top"): (1, True),
    ("search", "--time-limit"): (0, False),
    ("search", "--reserve-gib"): (0, True),
    ("search", "--price-per-gpu-hour"): (0, False),
    ("search", "--tokens"): (0, False),
    ("search", "--days"): (0, False),
    ("estimate", "--gpus"): (1, True),
    ("estimate", "--days"): (0, False),
    ("estimate", "--price-per-gpu-hour"): (0, False),
    ("estimate", "--pue"): (1, True),
    ("estimate", "--grid-gco2-per-kwh"): (0, True),
    ("estimate", "--restart-minutes"): (0, True),
    ("estimate", "--checkpoint-gbps-per-node"): (0, False),
    ("estimate", "--gpu-hours-per-interruption"): (0, False),
    ("estimate", "--node-power-kw"): (0, False),
    ("estimate", "--time-limit"): (0, False),
}
FLAG_TEXT = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "0", "-0", "-1", "-5", "0.5", "1", "1e400", "1e-400"]),
    st.sampled_from(["1e18", "99999999999999999999", "2T", "0T", "nanT", "infT", "1x", "", " 3"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=5),
)


@fuzz("test_numeric_flags")
@given(st.sampled_from(sorted(FLAGS)), FLAG_TEXT)
def test_numeric_flags(command_flag, text):
    """A numeric flag is refused in one line, or parses to a finite number in its range."""
    ran["test_numeric_flags"] += 1
    command, flag = command_flag
    size = [] if command != "estimate" or flag in ("--gpus", "--days") else ["--gpus", "8"]
    argv = [command, *REQUIRED[command], *size, f"{flag}={text}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:
            assert exit_.code == 2
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: argument "), err.getvalue()
            return
    value = getattr(args, flag[2:].replace("-", "_"))
    assert isinstance(value, (int, float)) and math.isfinite(value), (flag, text, value)
    low, allowed = FLAGS[command_flag]
    assert value >= low if allowed else value > low, (flag, text, value)


# ---- the size of the run -------------------------------------------------------------------
def test_the_fuzz_ran_at_least_2000_examples():
    """Hypothesis may stop early once a strategy's space is exhausted, so count the runs."""
    missing = sorted(set(EXAMPLES) - set(ran))
    if missing:
        pytest.skip(f"run the whole file: {', '.join(missing)} did not run")
    assert sum(EXAMPLES.values()) >= MIN_EXAMPLES
    assert sum(ran.values()) >= MIN_EXAMPLES, dict(ran)
