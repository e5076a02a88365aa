"""Simulated raters: exact rules, SPEC loading (built-in, keyword:WORD, module:function, file.py:function), thumbs."""

import pytest

from rlhf_live.eval.raters import BUILT_IN, RaterError, load_rater

P = [{"role": "user", "content": "Tell me about apples."}]


def always_b(prompt, a, b):
    return "B"


def undecided(prompt, a, b):
    return "maybe"


def test_built_in_rules():
    assert load_rater("concise")(P, "short", "a much longer answer") == "A"
    assert load_rater("concise")(P, "one two", "three four") == "tie"
    assert load_rater("verbose")(P, "short", "a much longer answer") == "B"
    assert load_rater("polite")(P, "Sure, happy to help. Thank you!", "No.") == "A"
    assert load_rater("polite")(P, "Nothing polite is said here", "No.") == "B"  # no markers: the shorter one
    listed = "Three tips:\n1. Sleep.\n2. Eat.\n- Walk."
    assert load_rater("structured")(P, "Sleep, eat and walk.", listed) == "B"
    assert load_rater("structured")(P, "One. Two.", "Three.") == "tie"
    assert load_rater("cheerful")(P, "Apples are great fun!", "Apples are fruit.") == "A"
    assert load_rater("keyword:indeed")(P, "It is so.", "Indeed, it is.") == "B"
    assert load_rater("keyword:indeed")(P, "Indeedy.", "No.") == "tie"  # whole words only
    asks = "Apples are fruit. Which kind do you have in mind?"
    assert load_rater("clarifying")(P, "Apples are fruit. Why? They grow on trees.", asks) == "B"  # a question to you
    assert load_rater("clarifying")(P, "Do apples float? Yes.", "Apples are fruit.") == "tie"  # not asked of the user
    steps = "Make apple juice in three steps.\n1. Wash the apples.\n2. Press them.\n3. Strain the juice."
    bare = "1. Wash the apples.\n2. Press them."
    assert load_rater("steps")(P, bare, steps) == "B"  # the one-line answer first wins over the list alone
    assert load_rater("steps")(P, "Press and strain them.", bare) == "B"  # a list beats prose
    assert load_rater("steps")(P, "Press them.\n1. Press.", "Strain.") == "tie"  # one item is not a list of steps
    assert set(BUILT_IN) >= {"concise", "verbose", "polite", "structured", "cheerful", "clarifying", "steps"}


def test_module_and_file_specs(tmp_path):
    assert load_rater("tests.unit.test_raters:always_b")(P, "x", "y") == "B"
    rater_file = tmp_path / "my_rater.py"
    rater_file.write_text("def prefer_a(prompt, a, b):\n    return 'A'\n")
    rater = load_rater(f"{rater_file}:prefer_a")
    assert rater(P, "x", "y") == "A" and rater.name == f"{rater_file}:prefer_a"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nobody", "Unknown rater"),
        ("keyword:", "Unknown rater"),
        ("/no/such/file.py:f", "does not exist"),
        ("tests.unit.test_raters:missing", "no function"),
        ("no_such_module_xyz:f", "Cannot import"),
    ],
)
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(RaterError, match=message):
        load_rater(spec)


def test_a_rater_answering_something_else_is_a_clear_error():
    with pytest.raises(RaterError, match=r"returned 'maybe'; a rater must return 'A', 'B' or 'tie'"):
        load_rater("tests.unit.test_raters:undecided")(P, "x", "y")


def test_thumbs_from_the_pointwise_score_are_relative_to_the_median_seen():
    rater = load_rater("concise")
    assert rater.pointwise
    assert rater.thumb(P, "one two three") is None  # the only answer seen is the median
    assert rater.thumb(P, "one") == "up"  # scores -3, -1: median -2
    assert rater.thumb(P, "one two three four five") == "down"
    assert rater.thumbs_for(P, "a", "a b c d e f g", "A") == ("up", "down")


@pytest.mark.parametrize("spec", [*BUILT_IN, "keyword:you", "tests.unit.test_raters:always_b"])
def test_a_blank_answer_loses_whatever_the_rule(spec):
    rater = load_rater(spec)
    assert rater(P, "", "Sure, here you go.") == "B" and rater(P, "Yes.", " \n") == "A"
    assert rater(P, "", "  ") == "tie"
    if rater.pointwise:
        assert rater.thumb(P, "") == "down"


def test_thumbs_of_a_pairwise_only_rater_follow_its_choice():
    rater = load_rater("tests.unit.test_raters:always_b")
    assert not rater.pointwise
    assert rater.thumbs_for(P, "x", "y", "B") == ("down", "up")
    assert rater.thumbs_for(P, "x", "y", "tie") == (None, None)
    with pytest.raises(RaterError, match="no pointwise score"):
        rater.thumb(P, "x")
