"""Write a benchmark's outputs: raw results.json, the markdown section, the chart, and the
section of BENCHMARKS.md it belongs to (replaced in place on a rerun, other sections kept)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .chart import can_draw, decode_chart
from .report import markdown, summarize

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
CHART_FILE = "decode_tokens_per_s.png"
BENCHMARKS_INTRO = """# Benchmarks

kiln side by side with CTranslate2 and `transformers`, produced by `kiln bench`: same weights,
same prompts, same number of new tokens, each engine in its own fresh process, warm-up first,
engines alternated, the same thread count for all, greedy decoding without early stop. Ratios
first, absolute figures second; an absolute figure holds only on the machine it came from.
"""


def write_outputs(results: dict, output: Path, benchmarks_md: Path | None) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    results = {**results, "summary": summary}
    paths = {"results": output / RESULTS_FILE, "table": output / TABLE_FILE,
             "chart": output / CHART_FILE}
    paths["results"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    machine = results["machine"]
    title = f"{machine['cpu']}, {results['options']['threads']} threads, {machine['date'][:10]}"
    chart = None
    if can_draw() and any(cell["decode_tokens_per_s"] for cell in summary):
        decode_chart(summary, paths["chart"], title)
        chart = paths["chart"]
    else:
        paths.pop("chart")
    paths["table"].write_text(markdown(results, summary, chart and chart.name), encoding="utf-8")
    if benchmarks_md is not None:
        link = chart and Path(os.path.relpath(chart, benchmarks_md.resolve().parent)).as_posix()
        section = markdown(results, summary, link)
        update_benchmarks_md(benchmarks_md, _section_id(output, benchmarks_md), title, section)
        paths["benchmarks_md"] = benchmarks_md
    return paths


def _section_id(output: Path, benchmarks_md: Path) -> str:
    """One section per output folder: rerunning the same benchmark replaces its own section."""
    try:
        return Path(os.path.relpath(output.resolve(), benchmarks_md.resolve().parent)).as_posix()
    except ValueError:  # another drive on Windows
        return output.resolve().as_posix()


def update_benchmarks_md(path: Path, section_id: str, title: str, body: str) -> None:
    begin, end = f"<!-- kiln bench: {section_id} -->", f"<!-- /kiln bench: {section_id} -->"
    section = f"{begin}\n## {title}\n\nRaw results: `{section_id}/{RESULTS_FILE}`.\n\n{body}{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else BENCHMARKS_INTRO
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")
