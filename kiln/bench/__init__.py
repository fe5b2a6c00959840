"""`kiln bench`: kiln, CTranslate2 and transformers side by side on the same weights and prompts.

Every engine runs in its own fresh process (`kiln.bench.worker`), so load time and peak memory
are per engine; `kiln.bench.run` builds the models once, alternates the engines and writes the
results, the table and the chart.
"""
