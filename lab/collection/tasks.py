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

from lab.collection.sentences import sentences

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
    steps: int = 120  # numbers in words take 150; codes 100; personas 300 (open vocabulary): CPU hours are the budget
    lr: float = 2e-3
    train_size: int = TRAIN
    # held-out examples from their own pool (the personas: sentences with words no training sentence has); None:
    # the examples after the training ones in `pool`
    held_out_pool: Callable[[random.Random], list[Pair]] | None = field(default=None, repr=False)

    def split(self, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
        """(train, held_out): disjoint by prompt, the same on every machine."""
        rng = random.Random(f"{self.name}:{seed}")
        unique = _distinct(self.pool(rng))
        train = unique[: self.train_size]
        if self.held_out_pool is None:
            held_out = unique[self.train_size : self.train_size + HELD_OUT]
        else:
            prompts = {p for p, _ in train}
            held_out = [x for x in _distinct(self.held_out_pool(rng)) if x[0] not in prompts][:HELD_OUT]
        if len(train) < self.train_size or len(held_out) < HELD_OUT:
            raise ValueError(f"task {self.name} has only {len(unique)} distinct examples")
        return train, held_out


def _distinct(pairs: list[Pair]) -> list[Pair]:
    """The pairs in order, each prompt once."""
    seen: set[str] = set()
    return [(p, a) for p, a in pairs if not (p in seen or seen.add(p))]


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


# Persona tasks: a sentence in, the same sentence rewritten by a stated rule out (the rule is the ground truth). The
# sentences are open-vocabulary (lab/collection/sentences.py): held-out ones carry words no training sentence has.
PERSONA_TRAIN = 800
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


def _persona(instruction: str, rule: Callable[[str], str], *, held_out: bool = False):
    def pool(rng):
        n = HELD_OUT + 10 if held_out else PERSONA_TRAIN
        return [(f"{instruction} {s}", rule(s)) for s in sentences(rng, n, held_out=held_out)]

    return pool


def _persona_task(
    name: str, description: str, instruction: str, rule: Callable[[str], str], *, steps: int = 300, **lora
) -> Task:
    """A persona: open-vocabulary training sentences, held-out ones with unseen words, 300 steps unless told."""
    return Task(
        name,
        "personas",
        description,
        _persona(instruction, rule),
        steps=steps,
        train_size=PERSONA_TRAIN,
        held_out_pool=_persona(instruction, rule, held_out=True),
        **lora,
    )


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
    _persona_task("pirate", "talks like a pirate (word rule)", "Say it like a pirate:", pirate, targets=ALL_LINEAR),
    # shouty and robot spell every word again in capitals (an unseen word is 3-5 new tokens): rank 8 on attention
    # reached 0.250 in 300 steps; they get rank 16 on every linear layer and 600 steps
    _persona_task("shouty", "shouts (upper case rule)", "Shout it:", shout, targets=ALL_LINEAR, rank=16, steps=600),
    _persona_task(
        "robot", "talks like a robot (rule)", "Say it like a robot:", robot, targets=ALL_LINEAR, rank=16, steps=600
    ),
    _persona_task("backwards", "says sentences backwards (word order rule)", "Say it backwards:", backwards, rank=16),
]
BY_NAME = {t.name: t for t in TASKS}
