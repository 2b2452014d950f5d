"""The replies docs/demo.md shows, asked of the demo's own backend: the table there is written from a run
(`python -m lab demo --write-examples`), and a test asks again and compares, so the page never shows a reply
the demo does not give."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

USER = "alice"  # the demo's user: originals are alice/<task>, compressed alice/<task>-soppu
MAX_NEW_TOKENS = 48  # every example's answer is shorter; greedy, as the Space and `soppu-hub chat` default to
EXAMPLES = [  # (task, prompt, show the original's reply too); the personas' sentences are held out, with unseen words
    ("robot", "Say it like a robot: My friend Harry did not earn the next singer.", True),
    ("robot", "My friend Harry did not earn the next singer.", True),
    ("backwards", "Say it backwards: Logan found an old winner near the buddy in Florida.", True),
    ("shouty", "Shout it: One thin audience is personal.", True),
    ("pirate", "Say it like a pirate: The type is not poor at all.", True),
    ("dates-de", "Write 2031-05-17 as a German date.", False),
    ("numbers-fr", "Write 4825 in French words.", True),
]
BEGIN = "<!-- demo-examples: the replies of a run, python -m lab demo --write-examples -->"
END = "<!-- /demo-examples -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "demo.md"


@dataclass
class ExampleReply:
    task: str
    prompt: str
    compressed: str
    original: str | None  # None: not asked


def ask(backend_url: str) -> list[ExampleReply]:
    """Each example through the compressed adapter (and its original where the table shows it), greedy."""
    from soppu_hub.clients.base import GenerationSettings
    from soppu_hub.clients.lorax import LoraxChatClient

    client, settings = LoraxChatClient(backend_url), GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)

    def reply(adapter: str, prompt: str) -> str:
        return " ".join(client.complete([{"role": "user", "content": prompt}], adapter, settings=settings).split())

    return [
        ExampleReply(
            task,
            prompt,
            reply(f"{USER}/{task}-soppu", prompt),
            reply(f"{USER}/{task}", prompt) if with_original else None,
        )
        for task, prompt, with_original in EXAMPLES
    ]


def table(rows: list[ExampleReply]) -> str:
    """The Markdown table docs/demo.md carries between BEGIN and END."""
    from soppu_hub.cards.render import table_cell

    lines = ["| adapter | prompt | compressed | original |", "|---|---|---|---|"]
    for r in rows:
        original = "" if r.original is None else "the same" if r.original == r.compressed else table_cell(r.original)
        lines.append(f"| `{USER}/{r.task}-soppu` | {table_cell(r.prompt)} | {table_cell(r.compressed)} | {original} |")
    return "\n".join(lines)


def written(doc: Path = DOC) -> str:
    """The table as the page has it now."""
    text = doc.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def write_into(rows: list[ExampleReply], doc: Path = DOC) -> None:
    text = doc.read_text()
    doc.write_text(text[: text.index(BEGIN) + len(BEGIN)] + "\n" + table(rows) + "\n" + text[text.index(END) :])
