"""Model cards: the Jinja templates, their rendering, and the plots they show."""

from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"  # inside the package, so an installed wheel carries them
