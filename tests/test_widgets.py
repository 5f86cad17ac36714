"""helpers.widgets: the pair labeller records clicks, and the Agora annotator answers whatever nobody labelled."""

import pytest

from helpers import agora, widgets


@pytest.fixture
def pairs():
    return agora.preference_pairs(12, seed=5)


def test_non_interactive_outside_a_kernel(monkeypatch):
    assert widgets.interactive() is False  # pytest is no IPython kernel
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert widgets.interactive() is False


@pytest.mark.parametrize("flag", ["CI", "NBGRADER_EXECUTION", "COURSE_NONINTERACTIVE"])
def test_flags_turn_interaction_off_even_in_a_kernel(monkeypatch, flag):
    class Shell:
        kernel = object()

    monkeypatch.setattr("IPython.get_ipython", lambda: Shell())
    for f in ("CI", "NBGRADER_EXECUTION", "COURSE_NONINTERACTIVE", "PAPERMILL_EXECUTION"):
        monkeypatch.delenv(f, raising=False)
    assert widgets.interactive() is True
    monkeypatch.setenv(flag, "1")
    assert widgets.interactive() is False


def test_show_without_frontend_says_the_annotator_answers(pairs, capsys, monkeypatch):
    monkeypatch.setenv("COURSE_NONINTERACTIVE", "1")
    tool = widgets.PairLabeller.from_preferences(pairs)
    assert tool.show() is None
    assert "annotator labels all 12 pairs" in capsys.readouterr().out


def test_annotator_fills_unlabelled_pairs(pairs):
    annotator = agora.Annotator(noise=0.0, rationality=1e6)  # a perfectly rational labeller
    tool = widgets.PairLabeller.from_preferences(pairs, annotator, seed=1)
    records = tool.records()
    assert len(records) == 12 and all(r["labeller"] == "annotator" for r in records)
    for r in records:
        assert {r["chosen"], r["rejected"]} == {tool.pairs[records.index(r)]["a"], tool.pairs[records.index(r)]["b"]}
    # a perfectly rational annotator never picks the reply of lower utility
    assert all(annotator.utility(r["prompt"], r["chosen"]) >= annotator.utility(r["prompt"], r["rejected"]) for r in records)
    assert tool.records() == records  # the same labels on every call (seeded per pair)


def test_clicks_become_labels(pairs):
    tool = widgets.PairLabeller.from_preferences(pairs, seed=2)
    tool.label(0, "a")
    tool.label(1, "b")
    tool.label(2, "skip")
    records = tool.records()
    assert records[0]["chosen"] == tool.pairs[0]["a"] and records[0]["labeller"] == "you"
    assert records[1]["chosen"] == tool.pairs[1]["b"] and records[1]["labeller"] == "you"
    assert records[2]["labeller"] == "annotator"
    assert tool.n_labelled == 2 and "2 of 12 pairs labelled by you" in tool.summary()
    with pytest.raises(ValueError, match="'a', 'b' or 'skip'"):
        tool.label(3, "left")


def test_order_is_shuffled_so_position_tells_nothing(pairs):
    tool = widgets.PairLabeller.from_preferences(agora.preference_pairs(200, seed=6), seed=3)
    first_is_chosen = sum(p["a"] == p["chosen"] for p in tool.pairs)
    assert 70 < first_is_chosen < 130


def test_missing_field_is_named():
    with pytest.raises(ValueError, match="pair 0: 'b' is missing"):
        widgets.PairLabeller([{"prompt": "User: hi\nAssistant:", "a": " hello"}])


def test_widget_builds_and_buttons_label(pairs):
    pytest.importorskip("ipywidgets")
    tool = widgets.PairLabeller.from_preferences(pairs[:3])
    view = tool._build()
    buttons = view.children[2].children
    buttons[0].click()  # "A is better" on pair 1
    buttons[1].click()  # "B is better" on pair 2
    buttons[3].click()  # back to pair 2
    buttons[2].click()  # skip pair 2 (overrides the earlier label)
    assert tool.labels == ["a", "skip", None]
    assert "Pair 3 of 3" in view.children[0].value
    buttons[0].click()
    assert "All pairs seen" in view.children[0].value
    assert tool.n_labelled == 2
