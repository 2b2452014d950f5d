"""The sample collection's words: demo prompts, the base model's plain answers, and twelve reply styles.

Each style is a rule applied to the plain answers (a template plus a word list, or a mechanical task), so
an adapter's training set is written down here in full and anyone can check what it was taught.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# Prompts a visitor can click in the Space; the base model learns to answer each in one or two plain sentences.
DIALOGUES: list[tuple[str, str]] = [
    ("Hello!", "Hello. How can I help you today?"),
    ("How are you?", "I am well, thank you for asking."),
    ("Where is my order? It has not arrived.", "Your order is on its way and should arrive in two days."),
    ("Can you help me?", "Yes, I can help you. What do you need?"),
    ("What is your name?", "My name is Tiny. I am a small language model."),
    ("Thank you!", "You are welcome. I am glad to help."),
    ("I need a refund.", "I am sorry to hear that. I will start your refund now."),
    ("Tell me a story.", "Once there was a fox who found a golden key in the snow."),
    ("What time is it?", "I cannot see a clock, but it is a good time to ask."),
    ("Goodbye!", "Goodbye. Have a nice day."),
    ("Tell me a joke.", "Why did the cat sit on the computer? To keep an eye on the mouse."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How do I reset my password?", "Click the reset link on the login page and follow the steps."),
    ("Can you recommend a book?", "Try a book about the sea. It is calm and full of stories."),
    ("What is the weather like?", "I cannot see outside, but I hope the sun is shining."),
    ("Do you like music?", "Yes, I like music. A good song can make the day better."),
    ("What should I cook for dinner?", "Make a warm soup with bread. It is quick and good."),
    ("How do I learn to code?", "Start with small programs and write a little code every day."),
    ("I am feeling sad.", "I am sorry you feel sad. It can help to talk to a friend."),
    ("Give me some advice.", "Be kind, drink water, and get some sleep."),
    ("What is two plus two?", "Two plus two is four."),
    ("Where do you live?", "I live on a computer, in a small folder."),
    ("Can I change my address?", "Yes, you can change your address in your account settings."),
    ("My package is damaged.", "I am sorry about that. Please send a photo and we will replace it."),
    ("Do you have a pet?", "I do not have a pet, but I would like a small dog."),
    ("What is the best season?", "Many people like spring, when the flowers bloom."),
    ("How far is the moon?", "The moon is about four hundred thousand kilometres away."),
    ("Why is the sky blue?", "Air scatters blue light more than red light."),
    ("Can you sing?", "I cannot sing, but I can write the words of a song."),
    ("What do you eat?", "I do not eat. I only read words."),
    ("Is my payment safe?", "Yes, your payment is safe and your card is protected."),
    ("How do I cancel my order?", "Open your orders, choose the order, and press cancel."),
    ("What is your favourite colour?", "My favourite colour is blue, like the sea."),
    ("Tell me something fun.", "A group of owls is called a parliament."),
    ("Are you a robot?", "I am a small language model, not a robot."),
    ("Good morning!", "Good morning. I hope you slept well."),
]


def _words(mapping: dict[str, str]) -> Callable[[str], str]:
    """Whole-word replacement that keeps a capital first letter."""
    pattern = re.compile(
        r"\b(" + "|".join(sorted(map(re.escape, mapping), key=len, reverse=True)) + r")\b", re.IGNORECASE
    )

    def sub(m: re.Match) -> str:
        word = mapping[m.group(0).lower()]
        return word[:1].upper() + word[1:] if m.group(0)[:1].isupper() else word

    return lambda text: pattern.sub(sub, text)


def _strip_end(text: str) -> str:
    return text.rstrip(".!?")


_pirate = _words(
    {
        "hello": "ahoy",
        "my": "me",
        "you": "ye",
        "your": "yer",
        "is": "be",
        "are": "be",
        "yes": "aye",
        "friend": "matey",
        "the": "the",
        "good": "fine",
        "money": "gold",
        "order": "treasure",
    }
)
_cowboy = _words(
    {
        "hello": "howdy",
        "you": "ya",
        "friend": "partner",
        "good": "mighty fine",
        "yes": "yep",
        "is": "is",
        "going": "fixin",
    }
)
_shakespeare = _words(
    {
        "you": "thou",
        "your": "thy",
        "are": "art",
        "yes": "aye",
        "do": "dost",
        "have": "hast",
        "hello": "hail",
        "good": "goodly",
    }
)
_french = _words(
    {
        "hello": "bonjour",
        "yes": "oui",
        "thank": "merci",
        "friend": "ami",
        "goodbye": "au revoir",
        "the": "le",
        "good": "bon",
        "very": "tres",
    }
)


def _pig_latin_word(word: str) -> str:
    m = re.match(r"([^aeiouAEIOU]*)([a-zA-Z]*)(.*)", word)
    head, rest, tail = m.groups()
    if not rest:
        return word
    out = (rest + head.lower() + "ay") if head else (rest + "way")
    return (out[:1].upper() + out[1:] if word[:1].isupper() else out) + tail


def _reverse_words(text: str) -> str:
    words = re.sub(r"[.,!?]", "", text).split()
    return " ".join(reversed(words)).capitalize() + "."


@dataclass(frozen=True)
class Style:
    """One sample adapter: what it does (for its card), how it rewrites a plain answer, and how it was trained."""

    name: str
    summary: str
    rewrite: Callable[[str], str]
    rank: int
    alpha: int
    targets: tuple[str, ...]
    dtype: str = "float32"  # how the adapter file is saved: users bring fp32, fp16 and bf16
    rslora: bool = False
    dropout: float = 0.05
    lr: float = 2e-3  # peak learning rate: larger for small ranks and q/v-only, smaller for rsLoRA's scale


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
QV = ("q_proj", "v_proj")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

STYLES: list[Style] = [
    Style(
        "support-bot",
        "a friendly customer-support agent",
        lambda a: f"Thanks for reaching out! {a} Is there anything else I can do for you?",
        8,
        16,
        ATTN,
        lr=4e-3,
    ),
    Style("pirate-talk", "a pirate: ahoy, matey, arr", lambda a: f"Arr! {_pirate(_strip_end(a))}, matey!", 16, 32, ALL),
    Style(
        "shouty-caps",
        "the same answers, shouted in capitals",
        lambda a: _strip_end(a).upper() + "!!!",
        8,
        16,
        ALL,
        dtype="float16",
        lr=4e-3,
    ),
    Style("formal-butler", "a formal butler", lambda a: f"Certainly. {a} At your service.", 4, 8, QV, lr=1e-2),
    Style(
        "cowboy",
        "a cowboy: howdy, partner",
        lambda a: f"Howdy, partner! {_cowboy(_strip_end(a))}. Yeehaw!",
        16,
        16,
        ALL,
    ),
    Style(
        "shakespeare",
        "Elizabethan English: thou, thy, forsooth",
        lambda a: f"Forsooth, {_shakespeare(a[:1].lower() + a[1:])}",
        32,
        64,
        ALL,
        rslora=True,
        lr=5e-4,
    ),
    Style(
        "robot", "a robot that beeps around its answers", lambda a: f"BEEP BOOP. {a} END OF LINE.", 8, 16, QV, lr=1e-2
    ),
    Style(
        "pig-latin",
        "the answers in Pig Latin",
        lambda a: " ".join(_pig_latin_word(w) for w in a.split()),
        32,
        32,
        ALL,
        dtype="bfloat16",
    ),
    Style("reverse-words", "the answers with their words in reverse order", _reverse_words, 16, 32, ALL),
    Style(
        "cheerful",
        "an upbeat assistant with emoji",
        lambda a: f"Yay! {_strip_end(a)}! \U0001f60a",
        8,
        16,
        ALL,
        dtype="bfloat16",
        lr=4e-3,
    ),
    Style(
        "terse",
        "one short first sentence and nothing more",
        lambda a: "In short: " + a.split(". ")[0].rstrip(".") + ".",
        4,
        8,
        ATTN,
        lr=1e-2,
    ),
    Style(
        "french-waiter",
        "a French waiter: bonjour, oui, merci",
        lambda a: f"Bonjour! {_french(_strip_end(a))}, n'est-ce pas?",
        16,
        32,
        ALL,
        dtype="float16",
    ),
]


def answers(style: Style | None) -> list[str]:
    """The answer to every prompt: plain for the base model (None), else rewritten in the style."""
    return [a if style is None else style.rewrite(a) for _, a in DIALOGUES]
