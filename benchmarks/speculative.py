"""Speculative decoding on this machine: see kiln/bench/speculative.py (also `kiln bench
--speculative`).

    python benchmarks/speculative.py [--runs 5] [--tokens 128] [--k 6] [--draft-layers 8]
    python benchmarks/speculative.py --pair 160m 1b [--k 4]
"""

from kiln.bench.speculative import main

if __name__ == "__main__":
    main()
