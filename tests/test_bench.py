"""`kiln bench` on a tiny Pythia shape: every engine's worker, the whole run, the reports."""

from __future__ import annotations

import json

import pytest

from kiln.bench import report
from kiln.bench.chart import can_draw
from kiln.bench.folders import BenchModel, EngineType, engine_folder, tokenizer_size
from kiln.bench.models import PythiaShape
from kiln.bench.publish import update_benchmarks_md
from kiln.bench.run import BenchOptions, parse_model_config, run_bench, run_worker
from kiln.bench.weights import ctranslate2_bytes_per_step, safetensors_bytes_per_step

pytest.importorskip("ctranslate2")
pytest.importorskip("transformers")

TINY = PythiaShape(hidden_size=64, num_layers=2, num_heads=4, vocab_size=512, tokenizer_size=500,
                   max_positions=128)
TINY_MODEL = BenchModel("tiny", TINY)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-work")


@pytest.mark.parametrize("label", ["kiln:float32", "kiln:int8@int_mm", "ctranslate2:int8",
                                   "transformers:float32"])
def test_worker_reports_every_figure(work_dir, label):
    engine = EngineType.parse(label)
    folder = engine_folder(TINY_MODEL, engine, work_dir)
    options = BenchOptions(new_tokens=4, threads=2)
    record = run_worker(engine, str(folder), tokenizer_size(work_dir / "tiny" / "hf"), batch=2,
                        prompt_tokens=8, options=options, runs=2)
    assert "error" not in record, record["error"]
    assert record["engine"] == engine.engine and record["batch"] == 2
    assert 0 < record["import_s"] < 60 and 0 < record["load_s"] < 60
    assert 20 * 2**20 < record["peak_rss_bytes"] < 4 * 2**30
    assert record["compute_type_used"]
    if engine.backend:  # the worker's Generator ran the named int8 backend
        assert record["int8_backend_used"] == engine.backend
    assert len(record["measurements"]) == 2
    for run in record["measurements"]:
        assert run["ttft_s"] > 0 and run["total_s"] > 0
        assert run["prefill_tokens_per_s"] == pytest.approx(2 * 8 / run["ttft_s"])
        if run["total_s"] > run["ttft_s"]:  # a tiny model's 4 tokens can drown in timer noise
            assert run["decode_tokens_per_s"] == pytest.approx(
                2 * 3 / (run["total_s"] - run["ttft_s"]))
        else:
            assert run["decode_tokens_per_s"] is None


def test_folders_are_built_once(work_dir):
    engine = EngineType.parse("ctranslate2:float32")
    folder = engine_folder(TINY_MODEL, engine, work_dir)
    stamp = (folder / "model.bin").stat().st_mtime_ns
    assert engine_folder(TINY_MODEL, engine, work_dir) == folder
    assert (folder / "model.bin").stat().st_mtime_ns == stamp


def test_bytes_read_per_step_leave_out_the_input_embedding(work_dir):
    hf = engine_folder(TINY_MODEL, EngineType("transformers", "float32"), work_dir)
    kiln_folder = engine_folder(TINY_MODEL, EngineType("kiln", "float32"), work_dir)
    ct2_float = engine_folder(TINY_MODEL, EngineType("ctranslate2", "float32"), work_dir)
    ct2_int8 = engine_folder(TINY_MODEL, EngineType("ctranslate2", "int8"), work_dir)
    hidden, vocab = TINY.hidden_size, TINY.vocab_size
    layer = 4 * (4 * hidden * hidden + 8 * hidden * hidden)  # qkv + dense, mlp in + out; float32
    expected = 2 * layer + 4 * vocab * hidden  # + the output head
    assert safetensors_bytes_per_step(hf) == pytest.approx(expected, rel=0.03)
    assert safetensors_bytes_per_step(kiln_folder) == pytest.approx(expected, rel=0.03)
    assert safetensors_bytes_per_step(hf, itemsize=2) == pytest.approx(expected / 2, rel=0.03)
    assert ctranslate2_bytes_per_step(ct2_float) == pytest.approx(expected, rel=0.03)
    assert ctranslate2_bytes_per_step(ct2_int8) == pytest.approx(expected / 4, rel=0.1)


def test_run_writes_results_table_chart_and_benchmarks_md(work_dir, tmp_path):
    output, benchmarks_md = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    benchmarks_md.write_text("# Benchmarks\n\nA hand-written note.\n")
    options = BenchOptions(
        models=["tiny"], model_configs={"tiny": TINY}, batch=[1], prompt_tokens=[4],
        new_tokens=4, runs=1, engines=["kiln:float32", "ctranslate2:float32", "kiln:nonsense"],
        threads=2, work_dir=work_dir, output=output, benchmarks_md=benchmarks_md,
        bandwidth_gib=0.01)
    run_bench(options)

    results = json.loads((output / "results.json").read_text())
    assert results["bandwidth_gb_s"] > 0 and results["machine"]["cpu"]
    assert results["command"].startswith("kiln bench --models tiny --batch 1 --prompt-tokens 4")
    cells = {cell["engine"]: cell for cell in results["summary"]}
    assert cells["kiln:nonsense"]["errors"] and cells["kiln:nonsense"]["decode_tokens_per_s"] is None
    for label in ("kiln:float32", "ctranslate2:float32"):
        assert not cells[label]["errors"]
        assert cells[label]["ttft_s"]["median"] > 0 and cells[label]["peak_rss_bytes"]["n"] == 1
        assert cells[label]["bytes_per_step"] > 0
    table = (output / "results.md").read_text()
    assert "| tiny | 1 | 4 | kiln:float32 / ctranslate2:float32 |" in table
    assert "error: ValueError" in table
    text = benchmarks_md.read_text()
    assert text.startswith("# Benchmarks\n\nA hand-written note.")
    assert "<!-- kiln bench: results -->" in text and "results/results.json" in text
    if can_draw():
        assert (output / "decode_tokens_per_s.png").stat().st_size > 1000
        assert "(results/decode_tokens_per_s.png)" in text


def test_concurrency_run_compares_together_with_one_by_one(work_dir, tmp_path):
    from kiln.bench.concurrency import FIXED_NEW, workload
    from kiln.bench.serving import WAVES

    output, benchmarks_md = tmp_path / "engine", tmp_path / "BENCHMARKS.md"
    from dataclasses import replace

    long_tiny = replace(TINY, max_positions=300)  # room for 4 + up to 256 new tokens
    options = BenchOptions(models=["tiny300"], model_configs={"tiny300": long_tiny},
                           prompt_tokens=[4], runs=1, engines=["kiln:float32"], threads=2,
                           work_dir=work_dir,
                           output=output, benchmarks_md=benchmarks_md, bandwidth_gib=0.01,
                           concurrency=[3])
    results = run_bench(options)
    (cell,) = results["cells"]
    requests = workload(3, 4, cell["runs"][0]["vocab"], 0)
    assert requests == workload(3, 4, cell["runs"][0]["vocab"], 0)
    assert all(16 <= new <= 256 for _, new in requests)
    total = sum(new for _, new in requests)
    for mode in ("sequential", "concurrent"):  # every token of every request was timed
        assert cell[mode]["tokens"] == total and cell[mode]["itl_p99_s"] >= cell[mode]["itl_p50_s"]
    assert cell["aggregate_speedup"] == pytest.approx(
        cell["concurrent"]["tokens_per_s"] / cell["sequential"]["tokens_per_s"])
    # the three targets: N threads vs one call, the server vs batch decode, TTFT at N vs alone
    assert cell["threads_over_one_call"] == pytest.approx(
        cell["threads_tokens_per_s"] / cell["one_call_tokens_per_s"], rel=1e-6)
    assert cell["first_burst_tokens_per_s"] > 0 and cell["decode_tokens_per_s"] > 0
    serve = cell["serve"]
    assert serve["together_tokens"] == serve["together_requested"]  # every token of every stream
    assert 3 * WAVES * FIXED_NEW // 2 < serve["together_tokens"] < 3 * WAVES * 3 * FIXED_NEW // 2
    assert cell["serve_over_decode"] == pytest.approx(
        serve["sustained_tokens_per_s"] / cell["decode_tokens_per_s"])
    assert serve["sustained_tokens_per_s"] > 0
    assert 0 < cell["host_fraction"] < 1 and cell["host_ms_per_step"] < cell["step_ms"]
    assert "--concurrency 3" in results["command"]
    text = benchmarks_md.read_text()
    assert text.count("| tiny300 | kiln:float32 | 3 |") == 2  # the targets and the ragged rows
    with pytest.raises(ValueError, match="kiln engines only"):
        run_bench(BenchOptions(engines=["ctranslate2:int8"], concurrency=[2], threads=2))


def test_benchmarks_md_section_is_replaced_not_repeated(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    update_benchmarks_md(path, "out", "first", "one\n")
    path.write_text(path.read_text() + "\nkept\n")
    update_benchmarks_md(path, "out", "second", "two\n")
    text = path.read_text()
    assert text.count("<!-- kiln bench: out -->") == 1
    assert "two" in text and "one" not in text and "kept" in text


def _record(label: str, decode: float, rss: int, **extra) -> dict:
    return {"model": "m", "label": label, "batch": 2, "prompt_tokens": 4, "load_s": 1.0,
            "import_s": 0.5, "peak_rss_bytes": rss, **extra, "measurements": [
                {"ttft_s": 0.1, "total_s": 1.0, "prefill_tokens_per_s": 80.0,
                 "decode_tokens_per_s": decode}]}


def test_summary_medians_spreads_ratios_and_ceiling():
    results = {"bandwidth_gb_s": 10.0, "folders": [
        {"model": "m", "engine": "kiln:int8", "size_bytes": 10, "bytes_per_step": 10**9}],
        "runs": [_record("kiln:int8", decode, 100) for decode in (30.0, 10.0, 20.0)]
        + [_record("ctranslate2:int8", 10.0, 200), {"model": "m", "label": "kiln:int8",
                                                     "batch": 2, "prompt_tokens": 4,
                                                     "error": "boom"}]}
    summary = report.summarize(results)
    kiln_cell = next(cell for cell in summary if cell["engine"] == "kiln:int8")
    assert kiln_cell["decode_tokens_per_s"] == {"median": 20.0, "min": 10.0, "max": 30.0, "n": 3}
    assert kiln_cell["errors"] == ["boom"]
    assert kiln_cell["ceiling_fraction"] == pytest.approx(20.0 / 2 * 1e9 / 10e9)
    (row,) = report.ratios(summary)
    assert row["peer"] == "ctranslate2:int8"
    assert row["decode_tokens_per_s"] == pytest.approx(2.0)
    assert row["peak_rss_bytes"] == pytest.approx(0.5)
    # 2x is short of the 2.5x decode target; RSS (0.5x) and load (1x) are within theirs.
    assert report.missed_targets(row) == ["decode < 2.5×"]
    assert report.missed_targets({**row, "load_s": 1.5, "decode_tokens_per_s": 3.0}) == \
        ["load > 1×"]
    assert report.missed_targets({**row, "peer": "transformers:int8"}) is None
    assert "decode < 2.5×" in report.ratio_table([row])


def test_bad_engine_and_model_config_are_refused():
    with pytest.raises(ValueError, match="ENGINE:TYPE"):
        EngineType.parse("llamacpp:q4")
    with pytest.raises(ValueError, match="only kiln takes @BACKEND"):
        EngineType.parse("ctranslate2:int8@onednn")
    with pytest.raises(ValueError, match="only kiln takes @BACKEND"):
        EngineType.parse("kiln:int8@magic")
    assert str(EngineType.parse("kiln:int8@onednn")) == "kiln:int8@onednn"
    with pytest.raises(ValueError, match="PythiaShape"):
        parse_model_config('tiny={"hidden": 64}')
    name, shape = parse_model_config('tiny={"hidden_size": 64, "num_layers": 2, "num_heads": 4}')
    assert name == "tiny" and shape.vocab_size == 50304


def test_cli_has_bench():
    from kiln.cli import build_parser

    args = build_parser().parse_args(["bench", "--models", "160m", "--engines", "kiln:float32"])
    assert args.models == ["160m"] and args.runs == 3 and args.new_tokens == 128


def test_profile_splits_a_step_into_operator_classes(work_dir):
    """`kiln bench --profile`: every class is there, the int8 GEMM is found by name (a
    model whose kernels ran and were not seen would be mis-profiled), and the classes of the
    eager step add up to its wall time (host is the remainder, never negative)."""
    from kiln.bench.profile import CLASSES, markdown, profile_model

    folder = engine_folder(TINY_MODEL, EngineType.parse("kiln:int8"), work_dir)
    rows = profile_model(folder, [1, 2], [(2, 8)], context=16, repeats=3)
    assert [row["case"] for row in rows] == ["decode b1", "decode b2", "prefill 2x8"]
    for row in rows:
        classes = row["classes"]
        assert classes["int8 GEMM"] > 0 and classes["activation quantization"] > 0
        assert classes["attention"] > 0 and classes["host"] >= 0
        assert set(classes) <= set(CLASSES)
    table = markdown("tiny", rows, 10.0)
    assert table.count("\n| tiny |") == 3 and "int8 GEMM" in table


def test_gemm_survey_times_every_path_it_can_run():
    from kiln.bench.gemm_paths import markdown, survey

    results = survey([(32, 64)], [1, 3], repeats=1, stream_bytes=1 << 14)
    paths = {r["path"] for r in results}
    assert {"fbgemm 8-bit (kiln decode)", "fbgemm two-pass (prompts)", "_int_mm",
            "float32 dense"} <= paths
    assert all(r["us"] is not None and r["us"] > 0 for r in results
               if r["path"].startswith("fbgemm") or r["path"] == "float32 dense")
    assert "| 32x64 | 3 |" in markdown(results)
