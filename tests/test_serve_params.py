"""Request parameters parsed without a server: LoRAX's rules and 422 wording, one pure function."""

import math

import pytest

from soppu_hub.serve.errors import ValidationFailed
from soppu_hub.serve.params import MAX_STOP_SEQUENCES, Sampling, parse_generate


def parse(params: dict, inputs="hello world", limit=16):
    return parse_generate(inputs, params, tokenize=lambda text: list(range(len(text.split()))), max_total_tokens=limit)


def test_defaults_fill_the_room_and_stay_greedy():
    r = parse({})
    assert r.ids == [0, 1] and r.max_new == 14 and r.stop == []
    assert not r.sampling.do_sample and r.sampling.seed is None
    assert r.sampling == Sampling() and not r.ignore_eos
    assert parse({"ignore_eos_token": True}).ignore_eos


def test_sampling_switches_on_as_lorax_does():
    assert parse({"temperature": 0.7}).sampling.do_sample
    assert parse({"top_p": 0.9}).sampling.do_sample and parse({"top_k": 5}).sampling.do_sample
    assert not parse({"temperature": 1.0}).sampling.do_sample  # 1.0 is "unchanged"
    assert not parse({"temperature": 0, "do_sample": True}).sampling.do_sample  # 0 means greedy, whatever else
    s = parse({"do_sample": True, "seed": 7, "temperature": 0.5, "repetition_penalty": 1.2}).sampling
    assert (s.seed, s.temperature, s.repetition_penalty, s.top_k) == (7, 0.5, 1.2, None)
    assert parse({"seed": 7}).sampling.seed is None  # a seed without sampling changes nothing


def test_truncate_keeps_the_end_and_room_is_checked():
    r = parse({"truncate": 2, "max_new_tokens": 3}, inputs="a b c d e")
    assert r.ids == [3, 4] and r.max_new == 3
    with pytest.raises(
        ValidationFailed, match=r"`inputs` tokens \+ `max_new_tokens` must be <= 16. Given: 2 `inputs` tokens and 15"
    ):
        parse({"max_new_tokens": 15})
    with pytest.raises(ValidationFailed, match="`inputs` must have less than 4 tokens. Given: 5"):
        parse({}, inputs="a b c d e", limit=4)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"max_new_tokens": 2.5}, "`max_new_tokens` must be strictly positive"),
        ({"max_new_tokens": "8"}, "`max_new_tokens` must be strictly positive"),
        ({"max_new_tokens": True}, "`max_new_tokens` must be strictly positive"),
        ({"temperature": -1}, "`temperature` must be a number >= 0"),
        ({"temperature": math.nan}, "`temperature` must be a number >= 0"),
        ({"top_p": 1.5}, r"`top_p` must be in \(0, 1\]"),
        ({"top_k": -3}, "`top_k` must be a positive integer"),
        ({"typical_p": 0}, r"`typical_p` must be in \(0, 1\]"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be a number > 0"),
        ({"seed": -1}, "`seed` must be an integer >= 0"),
        ({"seed": math.inf}, "`seed` must be an integer >= 0"),
        ({"truncate": 0}, "`truncate` must be a positive integer"),
        ({"best_of": 2}, "`best_of` > 1 is not supported"),
        ({"stop": "x"}, "`stop` must be a list of strings"),
        ({"stop": ["a", 1]}, "`stop` must be a list of strings"),
        ({"stop": ["a"] * (MAX_STOP_SEQUENCES + 1)}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ],
)
def test_bad_parameters_are_422_with_lorax_wording(params, message):
    with pytest.raises(ValidationFailed, match=message) as e:
        parse(params)
    assert e.value.status == 422 and e.value.error_type == "validation"


@pytest.mark.parametrize("inputs", ["", None, 3, ["hi"]])
def test_inputs_must_be_a_non_empty_string(inputs):
    with pytest.raises(ValidationFailed, match="`inputs` must be a non-empty string"):
        parse({}, inputs=inputs)


def test_the_adapter_store_and_the_engine_do_not_import_each_other():
    import subprocess
    import sys

    code = (
        "import sys, soppu_hub.serve.adapters, soppu_hub.serve.params; "
        "assert 'soppu_hub.serve.engine' not in sys.modules, 'adapters imports the engine'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
