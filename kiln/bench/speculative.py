"""Prompt-lookup speculative decoding on SmolLM2-135M-Instruct (int8, CPU): greedy decode
tokens/s with and without, side by side in one process (alternated, warm-up first, medians),
with the acceptance rate and the tokens each target pass emits. The outputs are checked to be
identical (greedy speculative decoding must not change a token).

Input-grounded prompts (rewrite a text, edit code, continue a code block) are where lookup
pays; a summary is the control where it does not.

With `--draft-layers N` the same prompts (and a free-writing one) also run with a draft
model: SmolLM2 cut to its first N layers (int8), which shares the tokenizer; the table then
reports its acceptance rate and the cost c of a draft step relative to a target step.

With `--pair DRAFT TARGET` (Pythia shapes of `kiln bench`, random weights: acceptance means
nothing there) it measures what a trained pair's speed-up depends on, on this CPU: c, a draft
step relative to a target step, and v, a target pass over k+1 rows relative to one row; and
prints the speed-up (1 - a^(k+1)) / ((1 - a)(k c + v)) predicted for acceptance rates a.

    kiln bench --speculative [--runs 5] [--new-tokens 128]
    python benchmarks/speculative.py [--runs 5] [--tokens 128] [--k 6] [--draft-layers 8]
    python benchmarks/speculative.py --pair 160m 1b [--k 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

PARAGRAPH = ("The river rises in the northern hills, runs south through three market towns, "
             "and meets the sea at a wide estuary where salt marshes shelter thousands of birds "
             "each winter. Its water drove mills for centuries, and the old towpath is now a "
             "walking trail.")
CODE = '''def area_of_circle(radius):
    return 3.14159 * radius * radius


def area_of_square(side):
    return side * side


def area_of_rectangle(width, height):
    return width * height
'''
CHATS = {
    "rewrite a text": f"Fix the spelling and repeat this text:\n\n{PARAGRAPH}",
    "edit code": f"Add a docstring to each function, keep the code unchanged:\n```python\n{CODE}```",
    "summarize (control)": f"Summarize in two sentences:\n\n{PARAGRAPH}",
}
CONTINUE = "continue a code block"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=6, help="num_speculative_tokens")
    parser.add_argument("--draft-layers", type=int, default=0,
                        help="also measure a draft model: SmolLM2's first N layers")
    parser.add_argument("--work-dir", default="~/.cache/kiln/bench")
    parser.add_argument("--pair", nargs=2, metavar=("DRAFT", "TARGET"),
                        help="Pythia shapes (kiln bench names, e.g. 160m 1b): measure c and v")
    args = parser.parse_args(argv)
    if args.draft_layers:
        draft_table(args)
        return
    if args.pair:
        pair_table(args)
        return
    import torch

    import kiln
    from kiln.bench.machine import cpu_model

    torch.set_num_threads(2)
    generator = kiln.Generator(compute_type="int8")
    template = generator.chat_template
    prompts = {name: generator.tokenizer.encode(template.render(
        [{"role": "user", "content": text}]), add_special_tokens=False)
        for name, text in CHATS.items()}
    prompts[CONTINUE] = generator.tokenizer.encode(
        "```python\n" + CODE + "\n\ndef area_of_triangle(base, height):\n")
    print(f"SmolLM2-135M-Instruct int8, {cpu_model()}, 2 threads, {args.tokens} new tokens at "
          f"most, k={args.k}, median of {args.runs}\n")
    print("| prompt | tokens | plain tok/s | lookup tok/s | speed-up | acceptance | "
          "tokens per target pass | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, ids in prompts.items():
        print(compare(generator, name, ids, {}, dict(prompt_lookup=True,
                                                     num_speculative_tokens=args.k), args))
    print()
    print(verify_cost(generator))


def compare(generator, name: str, ids: list[int], plain_options: dict, fast_options: dict,
            args) -> str:
    """One table row: plain vs speculative decoding of `ids`, alternated, medians."""
    stats = generator.engine.speculation

    def run(**options):
        start = time.perf_counter()
        result = generator.generate_batch([ids], max_length=args.tokens,
                                          include_prompt_in_result=False, **options)[0]
        return time.perf_counter() - start, result.sequences_ids[0]

    run(**plain_options), run(**fast_options)  # warm-up: captures every step shape used
    speeds: dict[str, list[float]] = {"plain": [], "fast": []}
    outputs = {}
    before = (stats.proposed, stats.accepted, stats.verify_passes, stats.emitted)
    for _ in range(args.runs):
        for kind, options in (("plain", plain_options), ("fast", fast_options)):
            seconds, tokens = run(**options)
            speeds[kind].append(len(tokens) / seconds)
            outputs[kind] = tokens
    proposed, accepted, passes, emitted = (now - then for now, then in zip(
        (stats.proposed, stats.accepted, stats.verify_passes, stats.emitted), before,
        strict=True))
    plain, fast = statistics.median(speeds["plain"]), statistics.median(speeds["fast"])
    return (f"| {name} | {len(outputs['plain'])} | {plain:.1f} | {fast:.1f} | "
            f"{fast / plain:.2f}x | {accepted / max(proposed, 1):.2f} | "
            f"{emitted / max(passes, 1):.2f} | {outputs['plain'] == outputs['fast']} |")


def truncated_smollm2(layers: int, work_dir: str):
    """SmolLM2 with only its first `layers` layers, as an int8 kiln folder (built once)."""
    import shutil
    from pathlib import Path

    import kiln
    from kiln.bench.folders import hf_folder, resolve_models

    work = Path(work_dir).expanduser()
    source = hf_folder(resolve_models(["smollm2"])[0], work)
    folder = work / "smollm2" / f"draft-{layers}-layers-int8"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_pretrained(source, config=config)  # the rest is dropped
    hf = work / "smollm2" / f"draft-{layers}-layers-hf"
    model.save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, hf / name)
    return kiln.convert(hf, folder, quantization="int8")


def draft_table(args) -> None:
    import torch

    import kiln
    from kiln.bench.machine import cpu_model

    torch.set_num_threads(2)
    draft = truncated_smollm2(args.draft_layers, args.work_dir)
    generator = kiln.Generator(compute_type="int8", draft_model=draft)
    template = generator.chat_template
    chats = {**CHATS, "free writing": "Write a short story about a lighthouse keeper."}
    print(f"SmolLM2-135M-Instruct int8 with its first {args.draft_layers} layers as draft "
          f"(int8), {cpu_model()}, 2 threads, {args.tokens} new tokens at most, k={args.k}, "
          f"median of {args.runs}\n")
    print("| prompt | tokens | plain tok/s | draft tok/s | speed-up | acceptance | "
          "tokens per target pass | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, text in chats.items():
        ids = generator.tokenizer.encode(template.render([{"role": "user", "content": text}]),
                                         add_special_tokens=False)

        print(compare(generator, name, ids, dict(use_draft_model=False),
                      dict(num_speculative_tokens=args.k), args))
    target_step = pass_seconds(generator.engine.runner, 1)
    draft_step = pass_seconds(generator.engine.draft.runner, 1)
    print(f"\nc (a draft decode step / a target decode step, 200-token context): "
          f"{draft_step / target_step:.2f} ({draft_step * 1e3:.2f} / {target_step * 1e3:.2f} ms)")


def pair_table(args) -> None:
    from pathlib import Path

    import torch

    import kiln
    from kiln.bench.folders import EngineType, engine_folder, resolve_models
    from kiln.bench.machine import cpu_model

    torch.set_num_threads(2)
    work = Path(args.work_dir).expanduser()
    draft_name, target_name = args.pair
    folders = [engine_folder(model, EngineType.parse("kiln:int8"), work)
               for model in resolve_models([draft_name, target_name])]
    draft, target = (kiln.Generator(folder, compute_type="int8", max_batch_size=1)
                     for folder in folders)
    target_step = pass_seconds(target.engine.runner, 1)
    c = pass_seconds(draft.engine.runner, 1) / target_step
    v = pass_seconds(target.engine.runner, args.k + 1) / target_step
    print(f"Pythia-{draft_name} drafting for Pythia-{target_name} (int8, random weights), "
          f"{cpu_model()}, 2 threads, k={args.k}: c = {c:.3f}, v = {v:.2f} "
          f"(target step {target_step * 1e3:.1f} ms)\n")
    print("| acceptance a | tokens per target pass | predicted speed-up |")
    print("|---:|---:|---:|")
    for a in (0.6, 0.7, 0.8, 0.9):
        tokens = (1 - a ** (args.k + 1)) / (1 - a)
        print(f"| {a:.1f} | {tokens:.2f} | {tokens / (args.k * c + v):.2f}x |")


def pass_seconds(runner, rows: int, context: int = 200, repeats: int = 30) -> float:
    """Median time of a captured pass over `rows` consecutive positions of slot 0 after a
    `context`-token prompt: a decode step for one row, a verification pass for more."""
    import torch

    def sync() -> None:
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)

    with torch.inference_mode():
        runner.prefill([(0, list(range(1000, 1000 + context)), 0, True)])  # slot, tokens, start
        batch = [(0, 7, context + i) for i in range(rows)]

        def run():
            return runner.decode(batch) if rows == 1 else runner.verify(batch)

        run()
        sync()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            sync()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def verify_cost(generator) -> str:
    """v: a verification pass of k+1 rows of one slot, in units of a one-row decode step
    (both captured, same attention length): what a speculative pass costs."""
    runner = generator.engine.runner
    one = pass_seconds(runner, 1)
    lines = ["| rows verified (k+1) | ms per pass | v (x a one-row decode step) |",
             "|---:|---:|---:|", f"| 1 (decode) | {one * 1e3:.2f} | 1.00 |"]
    for rows in (2, 4, 8):
        cost = pass_seconds(runner, rows)
        lines.append(f"| {rows} | {cost * 1e3:.2f} | {cost / one:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
