"""From raw runs to figures: medians and spreads per case and engine, kiln / peer ratios, the
fraction of the memory-bandwidth ceiling, and the markdown tables that go into BENCHMARKS.md."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

# metric -> (where it lives, True if higher is better)
METRICS = {
    "decode_tokens_per_s": ("measurement", True),
    "prefill_tokens_per_s": ("measurement", True),
    "ttft_s": ("measurement", False),
    "total_s": ("measurement", False),
    "peak_rss_bytes": ("process", False),
    "peak_device_bytes": ("process", False),
    "load_s": ("process", False),
    "import_s": ("process", False),
}
RATIO_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "total_s",
                 "peak_rss_bytes", "load_s")
# kiln's targets against CTranslate2 int8 (the same weight type): decode tokens/s at least
# TARGET_DECODE x, peak RSS and load time at most 1x. The table names each one missed.
TARGET_DECODE = 2.5
TARGET_AT_MOST_ONE = ("peak_rss_bytes", "load_s")
MiB = 1024**2


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def case_key(record: dict) -> tuple:
    return (record["model"], record["batch"], record["prompt_tokens"])


def summarize(results: dict) -> list[dict]:
    """One cell per (model, batch, prompt, engine), in the order the runs were made."""
    folders = {(f["model"], f["engine"]): f for f in results.get("folders", [])}
    cells: dict[tuple, dict] = {}
    for record in results["runs"]:
        key = (*case_key(record), record["label"])
        cell = cells.setdefault(key, {
            "model": record["model"], "batch": record["batch"],
            "prompt_tokens": record["prompt_tokens"], "engine": record["label"],
            "errors": [], "values": {metric: [] for metric in METRICS}})
        if record.get("error"):
            cell["errors"].append(record["error"])
            continue
        for metric, (where, _) in METRICS.items():
            sources = record.get("measurements", []) if where == "measurement" else [record]
            cell["values"][metric].extend(s[metric] for s in sources if s.get(metric) is not None)
    bandwidth = results.get("bandwidth_gb_s")
    summary = []
    for cell in cells.values():
        values = cell.pop("values")
        cell.update({metric: _spread(values[metric]) for metric in METRICS})
        folder = folders.get((cell["model"], cell["engine"]), {})
        cell["size_bytes"] = folder.get("size_bytes")
        cell["bytes_per_step"] = folder.get("bytes_per_step")
        cell["ceiling_fraction"] = _ceiling_fraction(cell, bandwidth)
        cell["weights_gb_s"] = _streamed_gb_s(cell)
        summary.append(cell)
    return summary


def _streamed_gb_s(cell: dict) -> float | None:
    """Weight bytes decoding streams per second: steps/s x bytes per step."""
    decode = cell["decode_tokens_per_s"]
    if not decode or not cell["bytes_per_step"]:
        return None
    return decode["median"] / cell["batch"] * cell["bytes_per_step"] / 1e9


def _ceiling_fraction(cell: dict, bandwidth_gb_s: float | None) -> float | None:
    """Decode speed over the memory-bound ceiling: a step reads the weights once for the whole
    batch, so steps/s (tokens/s / batch) x bytes per step / bandwidth."""
    decode = cell["decode_tokens_per_s"]
    if not decode or not cell["bytes_per_step"] or not bandwidth_gb_s:
        return None
    steps_per_s = decode["median"] / cell["batch"]
    return steps_per_s * cell["bytes_per_step"] / (bandwidth_gb_s * 1e9)


def ratios(summary: list[dict]) -> list[dict]:
    """kiln:T / peer:T for each peer run with the same type name, per case."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for cell in summary:
        by_case.setdefault(case_key(cell), {})[cell["engine"]] = cell
    rows = []
    for key, cells in by_case.items():
        for label, kiln_cell in cells.items():
            engine, _, dtype = label.partition(":")
            dtype = dtype.partition("@")[0]  # kiln:int8@onednn is compared with peer:int8
            if engine != "kiln":
                continue
            for peer in ("ctranslate2", "transformers"):
                peer_cell = cells.get(f"{peer}:{dtype}")
                if peer_cell is None:
                    continue
                row = {"model": key[0], "batch": key[1], "prompt_tokens": key[2],
                       "kiln": label, "peer": peer_cell["engine"],
                       "failed": [c["engine"] for c in (kiln_cell, peer_cell)
                                  if c["decode_tokens_per_s"] is None and c["errors"]]}
                for metric in RATIO_METRICS:
                    mine, theirs = kiln_cell[metric], peer_cell[metric]
                    row[metric] = (mine["median"] / theirs["median"]
                                   if mine and theirs and theirs["median"] else None)
                rows.append(row)
    return rows


# ---------------------------------------------------------------- markdown


def _table(header: list[str], rows: Iterable[list[str]], right_from: int) -> str:
    """Columns from `right_from` on are figures, aligned right."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _figure(spread: dict | None, scale: float = 1.0) -> str:
    if not spread:
        return "–"
    median, low, high = (spread[k] * scale for k in ("median", "min", "max"))
    if spread["n"] == 1 or low == high:
        return _number(median)
    return f"{_number(median)} ({_number(low)}–{_number(high)})"


def _error_text(errors: list[str]) -> str:
    first = errors[0].replace("|", "\\|").replace("\n", " ")
    return f"error: {first[:120]}{'…' if len(first) > 120 else ''}"


def missed_targets(row: dict) -> list[str] | None:
    """The targets a kiln / ctranslate2 int8 row misses (None: no target for this pair)."""
    if not (row["peer"].startswith("ctranslate2:int8") and row["kiln"].startswith("kiln:int8")):
        return None
    missed = []
    decode = row.get("decode_tokens_per_s")
    if decode is None or decode < TARGET_DECODE:
        missed.append(f"decode < {TARGET_DECODE:g}×")
    names = {"peak_rss_bytes": "peak RSS", "load_s": "load"}
    missed += [f"{names[m]} > 1×" for m in TARGET_AT_MOST_ONE
               if row.get(m) is None or row[m] > 1.0]
    return missed


def ratio_table(rows: list[dict]) -> str:
    header = ["model", "batch", "prompt", "kiln / peer", "decode tok/s", "prefill tok/s", "TTFT",
              "total", "peak RSS", "load", "targets missed"]
    body = []
    for r in rows:
        lead = [r["model"], str(r["batch"]), str(r["prompt_tokens"]), f"{r['kiln']} / {r['peer']}"]
        if r["failed"]:
            body.append(lead + [f"{' and '.join(r['failed'])} failed"] + ["–"] * 6)
            continue
        missed = missed_targets(r)
        verdict = "–" if missed is None else (", ".join(missed) or "none")
        body.append(lead + [_ratio(r[m]) for m in RATIO_METRICS] + [verdict])
    return _table(header, body, right_from=4)


def absolute_table(summary: list[dict]) -> str:
    gpu = any(cell["peak_device_bytes"] for cell in summary)  # a column only on a GPU run
    header = ["model", "batch", "prompt", "engine", "decode tok/s", "prefill tok/s", "TTFT ms",
              "total s", "peak RSS MiB", *(["peak GPU MiB"] if gpu else []), "load s",
              "weights GB/s", "of bandwidth ceiling"]
    body = []
    for cell in summary:
        lead = [cell["model"], str(cell["batch"]), str(cell["prompt_tokens"]), cell["engine"]]
        if cell["decode_tokens_per_s"] is None and cell["errors"]:
            body.append(lead + [_error_text(cell["errors"])] + ["–"] * (len(header) - 5))
            continue
        fraction = cell["ceiling_fraction"]
        body.append(lead + [
            _figure(cell["decode_tokens_per_s"]), _figure(cell["prefill_tokens_per_s"]),
            _figure(cell["ttft_s"], 1000), _figure(cell["total_s"]),
            _figure(cell["peak_rss_bytes"], 1 / MiB),
            *([_figure(cell["peak_device_bytes"], 1 / MiB)] if gpu else []),
            _figure(cell["load_s"]),
            "–" if cell.get("weights_gb_s") is None else f"{cell['weights_gb_s']:.1f}",
            "–" if fraction is None else f"{fraction:.0%}"])
    return _table(header, body, right_from=4)


def folder_table(folders: list[dict]) -> str:
    header = ["model", "engine", "folder", "size on disk MiB", "weights read per step MiB"]
    body = []
    for folder in folders:
        if folder.get("error"):
            body.append([folder["model"], folder["engine"], _error_text([folder["error"]]), "–", "–"])
            continue
        per_step = folder.get("bytes_per_step")
        body.append([folder["model"], folder["engine"], f"`{folder['name']}`",
                     f"{folder['size_bytes'] / MiB:.1f}",
                     "–" if per_step is None else f"{per_step / MiB:.1f}"])
    return _table(header, body, right_from=3)


def markdown(results: dict, summary: list[dict], chart: str | None = None) -> str:
    """The section for BENCHMARKS.md: command, machine, date, ratios, absolute figures."""
    machine, options = results["machine"], results["options"]
    bandwidth = results.get("bandwidth_gb_s")
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items()
                         if version)
    memory = machine.get("memory_bytes")
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"- Machine: {machine['cpu']}, {machine['physical_cores']} physical cores "
        f"({machine['logical_cpus']} logical)"
        + (f", {memory / 1024**3:.0f} GiB RAM" if memory else "")
        + (f"; GPU {machine['gpu']['name']}, {machine['gpu']['memory_bytes'] / 1024**3:.0f} GiB"
           if machine.get("gpu") else "")
        + f"; {options['threads']} threads for every engine; device {options['device']}",
        f"- Date: {machine['date']}",
        f"- Memory read bandwidth ({options['device']}): {bandwidth:.1f} GB/s (sum of a "
        f"{options['bandwidth_gib']:g} GiB tensor, median of 5)" if bandwidth
        else "- Memory read bandwidth: not measured",
        f"- Versions: {versions}",
        f"- Each figure: median (min–max) over {options['runs']} fresh "
        f"process{'es' if options['runs'] != 1 else ''} per engine and case, "
        f"engines alternated; greedy, {options['new_tokens']} new tokens with min_length (no "
        "early stop); random prompts, same for every engine.",
        "",
        "Ratios, kiln / peer with the same weight type (above 1 is better for tokens/s, below 1 "
        "is better for times and memory). Targets against CTranslate2 int8: decode tokens/s >= "
        f"{TARGET_DECODE:g}×, peak RSS and load time <= 1×; the last column names those missed:",
        "",
        ratio_table(ratios(summary)) if ratios(summary) else "(no pair of kiln and peer figures)",
        "",
        "Absolute figures. TTFT is a 1-token generation (the prefill); decode tok/s is "
        "batch × (N − 1) / (time(N tokens) − time(1 token)); the bandwidth ceiling is steps/s × "
        "weight bytes read per step (embedding lookup excluded, KV cache not counted) / bandwidth:",
        "",
        absolute_table(summary),
        "",
        "Model folders:",
        "",
        folder_table(results.get("folders", [])),
    ]
    if chart:
        lines += ["", f"![decode tokens/s per case and engine]({chart})"]
    return "\n".join(lines) + "\n"
