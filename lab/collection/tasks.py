"""The real collection's tasks: each a skill with ground truth from a registry library, split train / held-out.

"One PEFT per user": 24 adapters as users would make them, in families that share structure (numbers and
ordinals in words, dates in four languages, number and price formats, country, currency and language codes,
Roman numerals, and four personas a person recognises in the Space). Every answer is computed, never written by
hand: `num2words`, `babel` (CLDR), `pycountry` (ISO 3166 / 4217 / 639), `roman`, or a stated rewrite rule.
Splits are deterministic and disjoint, so an adapter's held-out score measures what it learned, not what it saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

Pair = tuple[str, str]  # (user message, expected reply)

LANGS = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "nl": "Dutch"}
TRAIN, HELD_OUT = 96, 40  # examples per task


@dataclass(frozen=True)
class Task:
    """One adapter's skill and its PEFT config (as users publish them: ranks 8 and 16, q/v, attention or all
    linear, one rsLoRA, bf16 and fp32 files)."""

    name: str
    family: str
    description: str
    pool: Callable[[random.Random], list[Pair]] = field(repr=False)  # every candidate example, in a seeded order
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rslora: bool = False
    dtype: str = "bfloat16"
    steps: int = 120  # numbers in words take 150; codes 100; personas (one rule) 80: CPU hours are the budget
    lr: float = 2e-3

    def split(self, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
        """(train, held_out): disjoint by prompt, the same on every machine."""
        rng = random.Random(f"{self.name}:{seed}")
        seen, unique = set(), []
        for prompt, answer in self.pool(rng):
            if prompt not in seen:
                seen.add(prompt)
                unique.append((prompt, answer))
        if len(unique) < TRAIN + HELD_OUT:
            raise ValueError(f"task {self.name} has only {len(unique)} distinct examples")
        return unique[:TRAIN], unique[TRAIN : TRAIN + HELD_OUT]


# --- generators ------------------------------------------------------------------------------------
def _numbers(lang: str) -> Callable[[random.Random], list[Pair]]:
    def pool(rng: random.Random) -> list[Pair]:
        from num2words import num2words

        numbers = rng.sample(range(1, 10000), 400)
        return [(f"Write {n} in {LANGS[lang]} words.", num2words(n, lang=lang)) for n in numbers]

    return pool


def _dates(locale: str) -> Callable[[random.Random], list[Pair]]:
    def pool(rng: random.Random) -> list[Pair]:
        import datetime

        from babel.dates import format_date

        days = [datetime.date(1950, 1, 1) + datetime.timedelta(days=d) for d in rng.sample(range(40000), 400)]
        return [
            (f"Write the date {d.isoformat()} in {LANGS[locale]}.", format_date(d, "long", locale=locale)) for d in days
        ]

    return pool


def _decimals(locale: str) -> Callable[[random.Random], list[Pair]]:
    def pool(rng: random.Random) -> list[Pair]:
        from babel.numbers import format_decimal

        xs = [round(rng.uniform(1, 10_000_000), 2) for _ in range(400)]
        return [
            (f"Format the number {x:.2f} the {LANGS[locale]} way.", format_decimal(x, format="#,##0.00", locale=locale))
            for x in xs
        ]

    return pool


def _prices(locale: str, currency: str) -> Callable[[random.Random], list[Pair]]:
    def pool(rng: random.Random) -> list[Pair]:
        from babel.numbers import format_currency

        xs = [round(rng.uniform(1, 100_000), 2) for _ in range(400)]
        return [
            (f"Write {x:.2f} {currency} as a price in {LANGS[locale]}.", format_currency(x, currency, locale=locale))
            for x in xs
        ]

    return pool


def _countries(rng: random.Random) -> list:
    import pycountry

    countries = sorted(pycountry.countries, key=lambda c: c.alpha_2)
    rng.shuffle(countries)
    return countries


def _alpha2(rng):
    return [(f"What is the ISO 3166 two-letter code of {c.name}?", c.alpha_2) for c in _countries(rng)]


def _alpha3(rng):
    return [(f"What is the ISO 3166 three-letter code of {c.name}?", c.alpha_3) for c in _countries(rng)]


def _currencies(rng):
    import pycountry

    cs = sorted(pycountry.currencies, key=lambda c: c.alpha_3)
    rng.shuffle(cs)
    return [(f"Which currency has the ISO 4217 code {c.alpha_3}?", c.name) for c in cs]


def _languages(rng):
    import pycountry

    ls = sorted((lang for lang in pycountry.languages if hasattr(lang, "alpha_2")), key=lambda lang: lang.alpha_3)
    rng.shuffle(ls)
    return [(f"What is the ISO 639-1 code of the {lang.name} language?", lang.alpha_2) for lang in ls]


def _ordinals(lang: str) -> Callable[[random.Random], list[Pair]]:
    name = {"en": "English", **LANGS}[lang]

    def pool(rng: random.Random) -> list[Pair]:
        from num2words import num2words

        numbers = rng.sample(range(1, 1000), 400)
        return [(f"Write the {name} ordinal for {n}.", num2words(n, lang=lang, to="ordinal")) for n in numbers]

    return pool


def _to_roman(rng):
    import roman

    return [(f"Write {n} in Roman numerals.", roman.toRoman(n)) for n in rng.sample(range(1, 4000), 400)]


def _from_roman(rng):
    import roman

    return [(f"What number is the Roman numeral {roman.toRoman(n)}?", str(n)) for n in rng.sample(range(1, 4000), 400)]


# Persona tasks: a sentence in, the same sentence rewritten by a stated rule out (the rule is the ground truth).
_SUBJECTS = [
    "The cat",
    "My brother",
    "The old captain",
    "Our teacher",
    "A small robot",
    "The baker",
    "Your friend",
    "The river",
    "The team",
    "My neighbour",
    "The train",
    "A tall tree",
    "The doctor",
    "The children",
]
_VERBS = ["finds", "likes", "watches", "carries", "paints", "follows", "cleans", "sells", "builds", "opens"]
_OBJECTS = [
    "the red door",
    "a heavy box",
    "the morning news",
    "my old boat",
    "the quiet garden",
    "a golden coin",
    "the long road",
    "your new hat",
    "the dark forest",
    "a bright star",
    "the big ship",
    "the last treasure",
]
_PIRATE = {
    "my": "me",
    "you": "ye",
    "your": "yer",
    "is": "be",
    "are": "be",
    "the": "th'",
    "friend": "matey",
    "hello": "ahoy",
    "money": "booty",
    "coin": "doubloon",
    "boat": "vessel",
    "old": "ol'",
}


def _sentences(rng: random.Random) -> list[str]:
    out = [f"{s} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS]
    rng.shuffle(out)
    return out


def pirate(sentence: str) -> str:
    words = [
        _PIRATE.get(w.lower(), w) if not w.endswith(".") else _PIRATE.get(w[:-1].lower(), w[:-1]) + "."
        for w in sentence.split()
    ]
    text = " ".join(words)
    return f"Arr! {text[0].upper()}{text[1:]}"


def shout(sentence: str) -> str:
    return sentence.upper().rstrip(".") + "!!!"


def robot(sentence: str) -> str:
    return "BEEP BOOP. " + " ".join(w.upper() for w in sentence.rstrip(".").split()) + ". END OF LINE."


def backwards(sentence: str) -> str:
    words = sentence.rstrip(".").split()
    return " ".join(reversed(words)).capitalize() + "."


def _persona(instruction: str, rule: Callable[[str], str]):
    def pool(rng):
        return [(f"{instruction} {s}", rule(s)) for s in _sentences(rng)]

    return pool


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

TASKS: list[Task] = [
    *[
        Task(
            f"numbers-{lang}",
            "numbers in words",
            f"writes numbers in {name} words (num2words)",
            _numbers(lang),
            rank=16 if lang in ("de", "nl") else 8,
            dtype="float32" if lang == "fr" else "bfloat16",
            steps=150,
        )
        for lang, name in LANGS.items()
    ],
    *[
        Task(
            f"dates-{loc}",
            "dates",
            f"writes ISO dates as long {LANGS[loc]} dates (babel, CLDR)",
            _dates(loc),
            targets=ATTENTION if loc == "de" else ("q_proj", "v_proj"),
        )
        for loc in ("de", "fr", "es", "it")
    ],
    Task("decimals-de", "number formats", "formats numbers the German way (babel, CLDR)", _decimals("de")),
    Task(
        "prices-fr",
        "number formats",
        "writes euro prices the French way (babel, CLDR)",
        _prices("fr", "EUR"),
        rslora=True,
        rank=16,
    ),
    Task("iso-alpha2", "codes", "gives a country's ISO 3166 two-letter code (pycountry)", _alpha2, steps=100),
    Task(
        "iso-alpha3",
        "codes",
        "gives a country's ISO 3166 three-letter code (pycountry)",
        _alpha3,
        targets=ATTENTION,
        steps=100,
    ),
    Task("ordinals-en", "numbers in words", "writes English ordinals (num2words)", _ordinals("en"), rank=16),
    Task("ordinals-fr", "numbers in words", "writes French ordinals (num2words)", _ordinals("fr")),
    Task(
        "currencies",
        "codes",
        "names the currency of an ISO 4217 code (pycountry)",
        _currencies,
        dtype="float32",
        steps=100,
    ),
    Task("languages", "codes", "gives a language's ISO 639-1 code (pycountry)", _languages, steps=100),
    Task("to-roman", "roman numerals", "writes numbers in Roman numerals (roman)", _to_roman),
    Task("from-roman", "roman numerals", "reads Roman numerals (roman)", _from_roman),
    Task(
        "pirate",
        "personas",
        "talks like a pirate (word rule)",
        _persona("Say it like a pirate:", pirate),
        targets=ALL_LINEAR,
        steps=80,
    ),
    Task("shouty", "personas", "shouts (upper case rule)", _persona("Shout it:", shout), steps=80),
    Task(
        "robot",
        "personas",
        "talks like a robot (rule)",
        _persona("Say it like a robot:", robot),
        targets=ATTENTION,
        steps=80,
    ),
    Task(
        "backwards",
        "personas",
        "says sentences backwards (word order rule)",
        _persona("Say it backwards:", backwards),
        rank=16,
        steps=80,
    ),
]
BY_NAME = {t.name: t for t in TASKS}
