"""Open-vocabulary sentences for the persona tasks: everyday English of varied length and structure, words from
faker's en_US lists, a quarter of every word list kept out of training.

A persona adapter trained on one fixed grid of sentences learns the grid, not the rule: held-out sentences made of
the same words say nothing about a person's own sentence. Here the training sentences use only the "seen" three
quarters of each list (verbs, nouns, adjectives, adverbs from faker's lorem parts of speech; first names and US
states from its person and address providers), and every held-out sentence carries at least one word no training
sentence has. Which words are unseen is fixed by a hash of the word, so the split is the same on every machine.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import cache

# {slot}: a word of that list; a capitalised slot name capitalises the word. Verbs are base forms (faker's list), so
# every template uses them after "will", "to", "can", "did not" or "Please"; nouns are singular, after a determiner.
TEMPLATES = (
    "{Name} will {verb} {det} {noun}.",
    "{Det} {adj} {noun} is {adj}.",
    "{Name} and {name} want to {verb} {det} {noun} in {state}.",
    "Please {verb} {det} {noun} before {day}.",
    "Hello {name}, {det} {noun} is {adv} {adj}.",
    "My friend {name} did not {verb} {det} {adj} {noun}.",
    "You are {adj} and your {noun} is {adj}.",
    "We can {verb} the money {adv}.",
    "{Det} {noun} and {det} {noun} are {adj} today.",
    "I {adv} {verb} {det} {adj} {noun} on {day}.",
    "{Name} found an old {noun} near the {noun} in {state}.",
    "The {noun} is not {adj} at all.",
    "{Name} says the {adj} boat is {adv} {adj} and the coin is {adj}.",
    "{lorem}.",
)
DETERMINERS = ("the", "my", "your", "this", "our", "that", "one", "every")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
UNSEEN_SHARE = 4  # one word in four is held out of training
# words every training sentence may show (the templates' own, determiners, days): never what makes a sentence unseen
FIXED = frozenset(
    {w.lower() for t in TEMPLATES for w in re.sub(r"{[^}]*}|[.,]", " ", t).split()}
    | set(DETERMINERS)
    | {d.lower() for d in DAYS}
)


def unseen(word: str) -> bool:
    """Whether `word` is kept out of every training sentence (fixed by its hash)."""
    return int(hashlib.sha256(word.lower().encode()).hexdigest(), 16) % UNSEEN_SHARE == 0


@cache
def _lists() -> dict[str, tuple[str, ...]]:
    from faker.providers.address.en_US import Provider as Address
    from faker.providers.lorem.en_US import Provider as Lorem
    from faker.providers.person.en_US import Provider as Person

    pos = Lorem.parts_of_speech
    clean = lambda words: tuple(sorted({w for w in words if w.isalpha() and w.islower()}))  # noqa: E731
    return {
        "verb": clean(pos["verb"]),
        "noun": clean(pos["noun"]),
        "adj": clean(pos["adjective"]),
        "adv": clean(pos["adverb"]),
        "lorem": clean(Lorem.word_list),
        "name": tuple(sorted({n for n in Person.first_names if n.isalpha()})),
        "state": tuple(sorted(s for s in Address.states if " " not in s)),
        "det": DETERMINERS,
        "day": DAYS,
    }


def _fill(template: str, rng: random.Random, pick) -> tuple[str, list[str]]:
    """The template with every slot filled by `pick(slot)`; returns the sentence and the words put in."""
    out, words, i = [], [], 0
    while (j := template.find("{", i)) >= 0:
        k = template.index("}", j)
        slot = template[j + 1 : k]
        if slot.lower() == "lorem":
            chosen = [pick("lorem") for _ in range(rng.randint(4, 9))]
            word = " ".join(chosen).capitalize()
        else:
            chosen = [pick(slot.lower())]
            word = chosen[0][0].upper() + chosen[0][1:] if slot[0].isupper() else chosen[0]
        out += [template[i:j], word]
        words += chosen
        i = k + 1
    out.append(template[i:])
    return "".join(out), words


def sentences(rng: random.Random, n: int, *, held_out: bool) -> list[str]:
    """`n` distinct sentences: training ones of seen words only; held-out ones with at least one unseen word."""
    lists = _lists()
    closed = ("det", "day")  # the few function words every sentence needs: all of them seen
    source = (
        lists if held_out else {k: v if k in closed else tuple(w for w in v if not unseen(w)) for k, v in lists.items()}
    )
    out: dict[str, None] = {}
    while len(out) < n:
        text, words = _fill(rng.choice(TEMPLATES), rng, lambda slot: rng.choice(source[slot]))
        if held_out and not any(unseen(w) and w.lower() not in FIXED for w in words):
            continue
        out[text] = None
    return list(out)
