"""tera-plan show and the HTML report (issue 7 items 2 and 4): the page is self-contained and
holds every section with the plan's numbers, the schedule comes from a simulation whose
properties hold, the placement colours come from ranks.py, Chromium loads the page without
console errors and draws something, and the CLI answers bad input in one line."""

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from tera.models import load_spec
from tera.planner.cost import CostModel
from tera.planner.layout import Layout
from tera.planner.plan import Plan
from tera.planner.ranks import process_groups
from tera.planner.report import MAX_DRAWN_OPS, drawn_microbatches, render_html, summary, units
from tera.planner.report.browser import find_chromium, ink, load
from tera.planner.report.page import SECTION_IDS, breakable
from tera.planner.report.placement import colours
from tera.planner.report.schedule import BACKWARD, FORWARD, Op, simulate, stage_order
from tera.planner.solve import search
from tera.planner.solve.search import DEFAULT_PRICE_PER_GPU_HOUR
from tera.planner.trace import trace
from tera.topologies import load as load_cluster

from .test_cli import assert_one_line_error, run
from .test_plan import make_plan


# ---- plans and pages ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """tiny-moe on 8 H100, the search's best of 3 (interleaved, pp=2, vpp=2), saved."""
    plan = search("tiny-moe", "dgx-h100", 16, 128, gpus=8, top=3).to_plan()
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    plan.save(path)
    return Plan.load(path), path


@pytest.fixture(scope="module")
def big():
    """A hand-written 256-GPU layout, pp=4 vpp=2, of an 8-layer tiny-moe, with the made-up
    prediction of test_plan (so no certificate and no alternatives)."""
    spec = dataclasses.replace(load_spec("tiny-moe"), layers=8)
    text = "tp=2,pp=4,vpp=2,schedule=interleaved,ep=8,mbs=1"
    return make_plan(text, spec=spec, gpus=256, global_batch=512, seq_len=256, certificate=None)


@pytest.fixture(scope="module")
def page(searched):
    return render_html(searched[0])


@pytest.fixture(scope="module")
def big_page(big):
    return render_html(big)


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the text of each data-key element."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.values: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self._open: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if "data-key" in attributes:
            self._open = attributes["data-key"]
            if "data-value" in attributes:
                self.values[self._open] = attributes["data-value"]

    def handle_data(self, data):
        if self._open:
            self.texts[self._open] = self.texts.get(self._open, "") + data

    def handle_endtag(self, tag):
        self._open = None


def elements(html: str) -> _Elements:
    parser = _Elements()
    parser.feed(html)
    return parser


def svgs(html: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", html, flags=re.S)


# ---- the page -------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["page", "big_page"])
def test_page_is_self_contained_with_every_section(which, request):
    html = request.getfixturevalue(which)
    parsed = elements(html)
    ids = [attrs.get("id") for _, attrs in parsed.tags]
    for section in SECTION_IDS:
        assert ids.count(section) == 1, section
    tags = {tag for tag, _ in parsed.tags}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed"}
    for tag, attrs in parsed.tags:
        for name in ("src", "href", "xlink:href"):
            value = attrs.get(name) or ""
            assert not value or value.startswith("#"), (tag, name, value)  # in-page only
    assert not re.search(r"https?://(?!www\.w3\.org/)", html)  # SVG namespaces only
    assert "@import" not in html and "@font-face" not in html
    assert all(ref.startswith("#") for ref in re.findall(r"url\(([^)]*)\)", html))


@pytest.mark.parametrize("which", ["page", "big_page"])
def test_the_figures_are_svg_that_parses(which, request):
    figures = svgs(request.getfixturevalue(which))
    assert len(figures) == 4  # step time, memory, schedule, placement
    for figure in figures:
        root = ET.fromstring(figure)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.findall(".//{http://www.w3.org/2000/svg}path")  # something is drawn
    ids = re.findall(r'\bid="([^"]+)"', "".join(figures))
    assert len(ids) == len(set(ids)), "two inlined figures define the same id"


def test_summary_numbers_are_the_plans(searched, page):
    plan = searched[0]
    parsed = elements(page)
    for key in ("step_time_s", "tokens_per_s_per_gpu", "mfu", "peak_memory_gib"):
        assert float(parsed.values[key]) == plan.prediction[key], key
    assert parsed.texts["step_time_s"] == units.duration(plan.prediction["step_time_s"])
    assert parsed.texts["mfu"] == units.percent(plan.prediction["mfu"])
    assert parsed.texts["layout"] == str(plan.layout)
    assert parsed.texts["certificate.status"] == plan.certificate["status"]
    for alternative in plan.alternatives:
        assert breakable(units.short_layout(alternative["layout_string"])) in page
    assert "The cost model now gives" not in page  # the searched plan is today's model


def test_a_hand_written_plan_shows_its_own_numbers_and_says_the_model_differs(big, big_page):
    parsed = elements(big_page)
    assert float(parsed.values["step_time_s"]) == big.prediction["step_time_s"]  # made up
    assert "The cost model now gives" in big_page  # so the charts say they were re-costed
    assert "hand-written layout" in big_page and big.certificate is None
    assert "4 stages, 2 chunks per stage" in big_page


def test_summary_dict(searched):
    plan = searched[0]
    s = summary(plan)
    json.dumps(s)  # JSON-ready
    assert s["step_time_s"] == plan.prediction["step_time_s"]
    assert s["microbatches"] == plan.prediction["microbatches"]
    assert s["tokens_per_s"] == pytest.approx(s["tokens_per_s_per_gpu"] * s["gpus"])
    assert s["alternatives"] == plan.alternatives and s["certificate"] == plan.certificate
    assert s["usd_per_million_tokens"] == pytest.approx(
        s["gpus"] * s["step_time_s"] / 3600 * DEFAULT_PRICE_PER_GPU_HOUR / (16 * 128) * 1e6
    )


def test_units_carry_their_unit():
    assert units.duration(9.84e-5) == "98.4 µs"
    assert units.duration(23.2) == "23.2 s"
    assert units.duration(150) == "2.50 min"
    assert units.gib(73.4) == "73.4 GiB" and units.gib(0.0126) == "12.9 MiB"
    assert units.usd(0.52) == "$0.52" and units.usd(5.5e-7) == "$0.00000055"
    assert units.percent(0.376) == "37.6%" and units.percent(1.7e-4) == "0.017%"


# ---- the cost model's per-chunk times -------------------------------------------------------
@pytest.mark.parametrize("text", ["tp=2,pp=2", "tp=2,pp=4,vpp=2,schedule=interleaved"])
def test_chunk_times_add_up_to_the_stage_times(text):
    spec = dataclasses.replace(load_spec("tiny-moe"), layers=8)
    layout = Layout.parse(text).resolve(spec, 16, 64, 128)
    model = CostModel(trace(spec, 128), load_cluster("dgx-h100", gpus=16), layout, 64, "bf16")
    chunks = model.chunk_times()
    assert [len(row) for row in chunks] == [layout.vpp] * layout.pp
    for stage, row in zip(model.stages, chunks, strict=True):
        whole = model.stage_time(stage)
        assert sum(t.forward for t in row) == pytest.approx(whole.forward, rel=1e-12)
        assert sum(t.backward for t in row) == pytest.approx(whole.backward, rel=1e-12)
        assert all(t.forward > 0 and t.backward > 0 for t in row)


# ---- the schedule simulator -----------------------------------------------------------------
def uniform(stages: int, vpp: int, f: float, b: float):
    return [[f / vpp] * vpp for _ in range(stages)], [[b / vpp] * vpp for _ in range(stages)]


@pytest.mark.parametrize("stages,microbatches", [(1, 4), (2, 1), (4, 8), (4, 3), (8, 32)])
def test_1f1b_makespan_with_equal_stages(stages, microbatches):
    f, b = 1.0, 2.0
    timeline = simulate(*uniform(stages, 1, f, b), microbatches)
    assert timeline.makespan == pytest.approx((microbatches + stages - 1) * (f + b))
    expected_bubble = (stages - 1) / (microbatches + stages - 1)
    assert timeline.bubble_fraction == pytest.approx(expected_bubble)


@pytest.mark.parametrize("stages,vpp,microbatches", [(2, 2, 2), (4, 2, 8), (4, 4, 16)])
def test_interleaving_shrinks_the_bubble(stages, vpp, microbatches):
    f, b = 1.0, 2.0
    plain = simulate(*uniform(stages, 1, f, b), microbatches)
    interleaved = simulate(*uniform(stages, vpp, f, b), microbatches)
    assert interleaved.bubble_fraction < plain.bubble_fraction
    # Megatron's interleaved bubble: (pp - 1) / vpp stage-steps instead of pp - 1
    expected = microbatches * (f + b) + (stages - 1) * (f + b) / vpp
    assert interleaved.makespan == pytest.approx(expected)


def test_megatron_interleaved_order_on_a_small_case():
    F, B = FORWARD, BACKWARD
    # pp=2, vpp=2, 2 micro-batches: stage 0 warms up with all 4 virtual forwards
    assert stage_order(0, 2, 2, 2) == [
        Op(F, 0, 0), Op(F, 1, 0), Op(F, 0, 1), Op(F, 1, 1),
        Op(B, 0, 1), Op(B, 1, 1), Op(B, 0, 0), Op(B, 1, 0),
    ]  # fmt: skip
    # stage 1 warms up with 2, then alternates
    assert stage_order(1, 2, 2, 2) == [
        Op(F, 0, 0), Op(F, 1, 0), Op(F, 0, 1), Op(B, 0, 1),
        Op(F, 1, 1), Op(B, 1, 1), Op(B, 0, 0), Op(B, 1, 0),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="divisible by pp"):
        stage_order(0, 4, 2, 6)


@pytest.mark.parametrize("seed", range(6))
def test_every_op_runs_once_in_order_without_overlap(seed):
    rng = random.Random(seed)
    stages, vpp = rng.choice([(1, 1), (2, 1), (3, 1), (4, 1), (2, 2), (4, 2), (3, 3)])
    microbatches = stages * rng.randint(1, 4)
    forward = [[rng.uniform(0.5, 2.0) for _ in range(vpp)] for _ in range(stages)]
    backward = [[rng.uniform(0.5, 4.0) for _ in range(vpp)] for _ in range(stages)]
    timeline = simulate(forward, backward, microbatches)
    ends, starts = {}, {}
    for slot in timeline.slots:
        key = (slot.op.kind, slot.op.microbatch, slot.op.chunk * stages + slot.stage)
        assert key not in ends  # each op once
        starts[key], ends[key] = slot.start, slot.end
        seconds = (forward if slot.op.kind == FORWARD else backward)[slot.stage][slot.op.chunk]
        assert slot.end - slot.start == pytest.approx(seconds)
    chunks = stages * vpp
    assert len(ends) == 2 * microbatches * chunks
    needs = {}  # op -> the ops it waits for
    for kind, mb, g in starts:
        if kind == FORWARD:
            needs[(kind, mb, g)] = [(FORWARD, mb, g - 1)] if g > 0 else []
        else:
            later = [(BACKWARD, mb, g + 1)] if g < chunks - 1 else []
            needs[(kind, mb, g)] = [(FORWARD, mb, g), *later]
    for stage in range(stages):
        mine = sorted((s for s in timeline.slots if s.stage == stage), key=lambda s: s.start)
        assert [s.op for s in mine] == stage_order(stage, stages, vpp, microbatches)
        free = 0.0
        for slot in mine:  # no overlap, and no wait beyond the stage and the inputs
            key = (slot.op.kind, slot.op.microbatch, slot.op.chunk * stages + stage)
            ready = max([free] + [ends[need] for need in needs[key]])
            assert slot.start == pytest.approx(ready, abs=1e-12)
            free = slot.end


def test_drawn_microbatches_are_capped_and_schedulable():
    assert drawn_microbatches(2, 2, 2) == 2  # a small step is drawn whole
    assert drawn_microbatches(120, 8, 1) == 16  # 2 * pp: warm-up, steady state, drain
    for m, pp, vpp in [(960, 16, 4), (512, 16, 8), (64, 64, 1), (30, 3, 1)]:
        shown = drawn_microbatches(m, pp, vpp)
        assert pp <= shown <= m
        assert vpp == 1 or shown % pp == 0
        assert shown == pp or 2 * shown * pp * vpp <= MAX_DRAWN_OPS


# ---- the placement map ----------------------------------------------------------------------
def test_placement_colours_follow_the_process_groups():
    plan = make_plan("tp=2,pp=2,ep=4,etp=1")  # DESIGN.md's 16-rank example
    groups = process_groups(plan.layout.mesh)
    by_axis = colours(plan)
    tp = by_axis["tp"]
    assert groups["tp"][0] == [0, 1] and groups["tp"][1] == [2, 3]
    assert tp[0] == tp[1] and tp[0] != tp[2]
    for group in groups["tp"]:
        assert len({tp[r] for r in group}) == 1
    ep = by_axis["ep"]
    assert groups["ep"][0] == [0, 1, 2, 3]
    assert len({ep[r] for r in range(4)}) == 1 and ep[3] != ep[4]
    pp = by_axis["pp"]  # coloured by stage: the rank's place in its pp group [r, r + 8]
    assert pp[0] == pp[7] and pp[0] != pp[8] and pp[8] == pp[15]


# ---- Chromium -------------------------------------------------------------------------------
def chromium_or_skip() -> str:
    """The chromium binary; installs Debian's `chromium` when missing and allowed."""
    binary = find_chromium()
    if binary is None and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=900).returncode:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
            subprocess.run(install, capture_output=True, timeout=900)
        binary = find_chromium()
    if binary is None:
        pytest.skip(
            "chromium is not installed and `apt-get install -y chromium` was not possible "
            "(needs root and apt-get) or failed"
        )
    return binary


def test_chromium_loads_the_page_without_console_errors_and_draws_it(page, tmp_path):
    binary = chromium_or_skip()
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    (tmp_path / "error.html").write_text(
        '<!DOCTYPE html><html><body><h1>control</h1><script>console.error("x")</script>'
        "<p>text enough to not be blank</p></body></html>"
    )
    (tmp_path / "blank.html").write_text("<!DOCTYPE html><html><body></body></html>")

    report = load(tmp_path / "report.html", tmp_path / "report.png", 1200, 1600, binary)
    assert report.console == ()
    drawn = ink(report.png)
    assert not drawn.blank(), drawn
    assert drawn.share > 0.05 and drawn.colours > 100, drawn  # charts, not a line of text

    # the same checks catch a console error and a blank page
    error = load(tmp_path / "error.html", tmp_path / "error.png", 1200, 1600, binary)
    assert any('"x"' in line for line in error.console), error.console
    blank = load(tmp_path / "blank.html", tmp_path / "blank.png", 1200, 1600, binary)
    assert blank.console == () and ink(blank.png).blank()


# ---- the CLI --------------------------------------------------------------------------------
def test_show_prints_a_summary(capsys, searched):
    plan, path = searched
    code, out, _ = run(capsys, "show", str(path))
    assert code == 0
    assert units.duration(plan.prediction["step_time_s"]) in out
    assert "MFU" in out and "GiB" in out and "$" in out and "OPTIMAL" in out
    assert "top plans" in out


def test_show_json_prints_the_summary(capsys, searched):
    plan, path = searched
    code, out, _ = run(capsys, "show", str(path), "--json")
    assert code == 0
    assert json.loads(out) == json.loads(json.dumps(summary(plan)))


def test_show_html_writes_the_page(capsys, searched, tmp_path):
    _, path = searched
    target = tmp_path / "report.html"
    code, out, _ = run(capsys, "show", str(path), "--html", str(target))
    assert code == 0 and f"wrote {target}" in out
    html = target.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and all(f'id="{i}"' in html for i in SECTION_IDS)


def test_show_bad_input_is_one_line(capsys, searched, tmp_path):
    code, _, err = run(capsys, "show", str(tmp_path / "missing.json"))
    assert_one_line_error(code, err, "plan.file", "not found")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema_version": 2,')
    code, _, err = run(capsys, "show", str(corrupt))
    assert_one_line_error(code, err, "plan.file", "not JSON")
    code, _, err = run(capsys, "show", str(searched[1]), "--html", str(tmp_path / "no" / "x.html"))
    assert_one_line_error(code, err, "html", "cannot write")
