"""The HTML page: one self-contained document, CSS inline, figures as inline SVG, no script,
no external resource (no http(s) link, font or image).

Sections, found by id: summary, step-time, memory, schedule, placement, alternatives. Each
summary number sits in an element with data-key (the summary() key) and data-value (its
exact value), so that tests and scripts can read the page without parsing units.
"""

from __future__ import annotations

from html import escape

from tera.planner.report import units

SECTION_IDS = ("summary", "step-time", "memory", "schedule", "placement", "alternatives")

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --card: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink);
       font: 15px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 34px 0 6px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
code { font: 13px/1.4 "DejaVu Sans Mono", Menlo, Consolas, monospace; }
.sub { color: var(--muted); margin: 0 0 18px; }
.cards { display: grid; grid-template-columns: repeat(3, 1fr); gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
        padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 13px; }
.card .value { font-size: 24px; font-weight: 600; }
.card .note { color: var(--muted); font-size: 13px; }
.bad { color: #cf222e; }
.good { color: #1a7f37; }
table { border-collapse: collapse; width: 100%; margin-top: 14px; font-size: 14px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; }
tr.chosen td { background: #fff8c5; }
.caption { color: var(--muted); font-size: 14px; margin: 4px 0 8px; }
.note { color: #9a6700; }
figure { margin: 0; }
.wide { overflow-x: auto; }
svg { max-width: 100%; height: auto; display: block; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""


def _value(key: str, value, text: str) -> str:
    """A summary number: the human text, with its exact value for machines."""
    return f'<span data-key="{key}" data-value="{escape(repr(value))}">{escape(text)}</span>'


def _card(label: str, value_html: str, note: str) -> str:
    return (
        f'<div class="card"><div class="label">{escape(label)}</div>'
        f'<div class="value">{value_html}</div><div class="note">{note}</div></div>'
    )


def summary_section(s: dict) -> str:
    fits = (
        '<span class="good">fits</span>' if s["fits"] else '<span class="bad">DOES NOT FIT</span>'
    )
    tflops = s["model_tflops_per_gpu"]
    mfu_note = "of dense BF16 peak" + (f", {tflops:.0f} TFLOP/s per GPU" if tflops else "")
    cards = [
        _card(
            "step time",
            _value("step_time_s", s["step_time_s"], units.duration(s["step_time_s"])),
            f"{s['microbatches']} micro-batches; global batch {s['global_batch']:,} "
            f"x {s['seq_len']:,} tokens",
        ),
        _card(
            "tokens/s per GPU",
            _value(
                "tokens_per_s_per_gpu",
                s["tokens_per_s_per_gpu"],
                units.count(s["tokens_per_s_per_gpu"]),
            ),
            f"{units.count(s['tokens_per_s'])} tokens/s on {s['gpus']:,} GPUs",
        ),
        _card("MFU", _value("mfu", s["mfu"], units.percent(s["mfu"])), escape(mfu_note)),
        _card(
            "peak memory per GPU",
            _value("peak_memory_gib", s["peak_memory_gib"], units.gib(s["peak_memory_gib"])),
            f"of {escape(units.gib(s['hbm_gib']))} HBM: {fits}",
        ),
        _card(
            "cost per million tokens",
            _value(
                "usd_per_million_tokens",
                s["usd_per_million_tokens"],
                units.usd(s["usd_per_million_tokens"]),
            ),
            f"{escape(units.usd(s['usd_per_step']))} per step at "
            f"${s['price_per_gpu_hour_usd']:g} per GPU-hour",
        ),
        _card("solver certificate", *_certificate(s["certificate"])),
    ]
    facts = [
        ("model", escape(s["model"])),
        (
            "cluster",
            f"{escape(s['cluster'])}: {s['gpus']:,} {escape(s['gpu'])} GPUs "
            f"({s['nodes']:,} node{'s' if s['nodes'] > 1 else ''} of {s['gpus_per_node']})",
        ),
        ("layout", f'<code data-key="layout">{breakable(s["layout"])}</code>'),
        ("precision", escape(s["precision"])),
    ]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    return (
        f'<div class="cards">{"".join(cards)}</div>'
        f'<table class="facts"><tbody>{rows}</tbody></table>'
    )


def _certificate(certificate: dict | None) -> tuple[str, str]:
    if certificate is None:
        return "none", "a hand-written layout: not searched"
    kind = certificate["objective_kind"]

    def value(x: float) -> str:
        if kind == "step_time":
            return f"{units.duration(x)} per step"
        if kind == "cost":
            return f"{units.usd(x)} per million tokens"
        return f"{x:,.0f} GPUs"

    status = escape(certificate["status"])
    note = (
        f"objective {value(certificate['objective'])}, bound {value(certificate['bound'])}, "
        f"gap {units.percent(certificate['gap'])}"
    )
    return f'<span data-key="certificate.status">{status}</span>', escape(note)


def breakable(text: str) -> str:
    """Escaped text that may wrap after its commas and colons only (layout strings)."""
    return escape(text).replace(",", ",<wbr>").replace(":", ":<wbr>")


def alternatives_table(alternatives: list[dict], chosen: str) -> str:
    if not alternatives:
        return '<p class="caption">A hand-written layout: the plan holds no alternatives.</p>'
    first = alternatives[0]["step_time_s"]
    head = (
        "<tr><th class='num'>#</th><th class='num'>GPUs</th><th>layout</th>"
        "<th class='num'>step time</th><th class='num'>vs #1</th>"
        "<th class='num'>tokens/s per GPU</th><th class='num'>MFU</th>"
        "<th class='num'>peak memory</th><th>fits</th></tr>"
    )
    rows = []
    for a in alternatives:
        css = ' class="chosen"' if a["layout_string"] == chosen else ""
        rows.append(
            f"<tr{css}><td class='num'>{a['rank']}</td><td class='num'>{a['gpus']:,}</td>"
            f'<td><code title="{escape(a["layout_string"])}">'
            f"{breakable(units.short_layout(a['layout_string']))}</code></td>"
            f"<td class='num'>{units.duration(a['step_time_s'])}</td>"
            f"<td class='num'>+{units.percent(a['step_time_s'] / first - 1)}</td>"
            f"<td class='num'>{units.count(a['tokens_per_s_per_gpu'])}</td>"
            f"<td class='num'>{units.percent(a['mfu'])}</td>"
            f"<td class='num'>{units.gib(a['peak_memory_gib'])}</td>"
            f"<td>{'yes' if a['fits'] else '<span class=bad>no</span>'}</td></tr>"
        )
    table = f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="wide">{table}</div>'  # scrolls sideways rather than overflow


def section(section_id: str, title: str, caption: str, body: str) -> str:
    caption_html = f'<p class="caption">{caption}</p>' if caption else ""
    return f'<section id="{section_id}"><h2>{escape(title)}</h2>{caption_html}{body}</section>'


def document(title: str, subtitle: str, sections: list[str], footer: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n"
        f'<body><main><header><h1>{escape(title)}</h1><p class="sub">{subtitle}</p></header>\n'
        + "\n".join(sections)
        + f"\n<footer>{footer}</footer></main></body></html>\n"
    )
