"""The lab beside the product (never installed): benchmarks, the demo driver, the sample and real collections with
their data and trainers, the real-base converter and the screenshot tool. It imports soppu_hub, never the reverse.

Run from a source checkout: `python -m lab bench|demo|samples|collection ...` (lab/cli.py).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the source checkout: `python -m lab...` children run from here
CARDS = ROOT / "cards" / "lab"  # the lab's card templates (the product's: cards/)
