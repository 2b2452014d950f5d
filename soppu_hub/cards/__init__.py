"""Model cards: the Jinja templates, their rendering, and the plots they show.

The templates live at the top of the repository in `cards/` (the lab's own in `cards/lab/`), where a person reads
and edits them; a wheel carries the product's as `soppu_hub/cards/templates/` (pyproject's package-dir mapping).
"""

from pathlib import Path

_HERE = Path(__file__).parent
TEMPLATES = _HERE / "templates" if (_HERE / "templates").is_dir() else _HERE.parents[1] / "cards"
