"""LaMP loading/validation (one test per bad-input kind) and metrics against hand-computed values."""

from __future__ import annotations

import json
import math
import random

import pytest

from cdcda_export.data import SAMPLE_TASKS, get_task, load_lamp, sample_paths
from cdcda_export.data.tasks import LAMP2_MOVIE_TAGS, rouge_metrics
from cdcda_export.errors import UserError, ValidationErrors


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return p


GOOD_Q = [{"id": "u1", "input": "What is the score ... review: great", "profile": [{"text": "nice", "score": "5"}]}]


@pytest.mark.parametrize("task", SAMPLE_TASKS)
def test_sample_data_loads_for_every_task(task):
    q, o = sample_paths(task)
    ds = load_lamp(task, q, o)
    assert len(ds.users) >= 3
    assert all(u.gold is not None for u in ds.users)
    spec = get_task(task)
    pairs = spec.profile_pairs(ds.users[0].profile, random.Random(0),
                               others=[p for u in ds.users[1:] for p in u.profile])
    assert len(pairs) == len(ds.users[0].profile)
    for question, answer, _ in pairs:
        assert spec.validate_output(answer) is None or spec.kind == "generation"


def test_truncated_json_names_file_and_position(tmp_path):
    p = write(tmp_path, "q.json", json.dumps(GOOD_Q)[:-5])
    with pytest.raises(UserError) as e:
        load_lamp("LaMP-3", p)
    msg = str(e.value)
    assert "q.json" in msg and "truncated" in msg and "line 1" in msg


def test_non_utf8_is_reported(tmp_path):
    p = tmp_path / "q.json"
    p.write_bytes(b'[{"id": "u1", "input": "caf\xe9", "profile": []}]')
    with pytest.raises(UserError, match=r"(?s)q.json.*not UTF-8.*0xe9"):
        load_lamp("LaMP-3", p)


def test_top_level_not_a_list(tmp_path):
    p = write(tmp_path, "q.json", {"id": "u1"})
    with pytest.raises(UserError, match=r"(?s)q.json.*top level is a dict.*expected a list"):
        load_lamp("LaMP-3", p)


def test_missing_field_names_record_and_field(tmp_path):
    p = write(tmp_path, "q.json", [{"id": "u1", "profile": []}])
    with pytest.raises(ValidationErrors) as e:
        load_lamp("LaMP-3", p)
    assert "record 0 (id 'u1'): missing field 'input'" in str(e.value)
    assert "cdcda data validate" in str(e.value)


def test_wrongly_typed_fields(tmp_path):
    p = write(tmp_path, "q.json", [{"id": 7, "input": "x", "profile": "none"},
                                   {"id": "u2", "input": "x", "profile": [{"text": 3, "score": "4"}]}])
    with pytest.raises(ValidationErrors) as e:
        load_lamp("LaMP-3", p)
    msg = str(e.value)
    assert "record 0 (id 7): field 'id' should be a string" in msg
    assert "field 'profile' should be a list, got str" in msg
    assert "record 1 (id 'u2') profile[0]: field 'text' should be str, got int" in msg


def test_profile_label_out_of_label_space(tmp_path):
    p = write(tmp_path, "q.json", [{"id": "u1", "input": "x", "profile": [{"description": "d", "tag": "horror"}]}])
    with pytest.raises(ValidationErrors, match=r"profile\[0\]: field 'tag' is 'horror', not in the label space"):
        load_lamp("LaMP-2", p)


def test_profile_score_out_of_range(tmp_path):
    p = write(tmp_path, "q.json", [{"id": "u1", "input": "x", "profile": [{"text": "t", "score": "7"}]}])
    with pytest.raises(ValidationErrors, match=r"field 'score' is '7', expected one of 1, 2, 3, 4, 5"):
        load_lamp("LaMP-3", p)


def test_gold_label_out_of_label_space(tmp_path):
    q = write(tmp_path, "q.json", GOOD_Q)
    o = write(tmp_path, "o.json", {"task": "LaMP_3", "golds": [{"id": "u1", "output": "6"}]})
    with pytest.raises(ValidationErrors, match=r"(?s)o.json.*golds\[0\] \(id 'u1'\): field 'output' is '6'"):
        load_lamp("LaMP-3", q, o)


def test_duplicate_ids(tmp_path):
    p = write(tmp_path, "q.json", GOOD_Q + GOOD_Q)
    with pytest.raises(ValidationErrors, match=r"record 1 \(id 'u1'\): duplicate id \(first at record 0\)"):
        load_lamp("LaMP-3", p)


def test_gold_id_without_question(tmp_path):
    q = write(tmp_path, "q.json", GOOD_Q)
    o = write(tmp_path, "o.json", {"task": "LaMP_3", "golds": [{"id": "u1", "output": "4"}, {"id": "ghost", "output": "3"}]})
    with pytest.raises(ValidationErrors, match=r"gold id 'ghost' has no question"):
        load_lamp("LaMP-3", q, o)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", ".hidden"])
def test_unsafe_user_ids(tmp_path, bad):
    p = write(tmp_path, "q.json", [{"id": bad, "input": "x", "profile": []}])
    with pytest.raises(ValidationErrors, match="not safe as a folder name"):
        load_lamp("LaMP-3", p)


def test_outputs_task_mismatch(tmp_path):
    q = write(tmp_path, "q.json", GOOD_Q)
    o = write(tmp_path, "o.json", {"task": "LaMP_4", "golds": [{"id": "u1", "output": "4"}]})
    with pytest.raises(ValidationErrors, match=r"field 'task' is 'LaMP_4', but --task is LaMP-3"):
        load_lamp("LaMP-3", q, o)


def test_empty_and_one_item_profiles_are_loaded_with_notes(tmp_path):
    p = write(tmp_path, "q.json", [{"id": "e", "input": "x", "profile": []},
                                   {"id": "one", "input": "x", "profile": [{"text": "t", "score": 3}]}])
    ds = load_lamp("LaMP-3", p)
    assert [u.id for u in ds.users] == ["e", "one"]
    assert any("empty profile" in n for n in ds.notes) and any("one-item profile" in n for n in ds.notes)
    assert ds.task.query_prompt("review: x", []) == "review: x"


def test_unknown_task_lists_known_ones():
    with pytest.raises(UserError, match=r"(?s)LaMP-6.*private.*one of LaMP-1"):
        get_task("LaMP-6")


# --------------------------------------------------------------------------- metrics
def test_classification_metrics_hand_computed():
    spec = get_task("LaMP-1")
    # golds [1],[2],[1],[2]; preds [1],[1],garbage,[2] -> 2/4 correct.
    m = spec.metrics(["[1]", "[1]", "I think 1", " [2] "], ["[1]", "[2]", "[1]", "[2]"])
    assert m["accuracy"] == pytest.approx(0.5, abs=1e-12)
    # class [1]: tp=1 fp=1 fn=1 -> f1 0.5 ; class [2]: tp=1 fp=0 fn=1 -> p=1 r=.5 f1=2/3 ; macro=(0.5+2/3)/2
    assert m["f1"] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-12)


def test_lamp2_macro_f1_averages_over_all_15_labels():
    spec = get_task("LaMP-2")
    m = spec.metrics(["sci-fi", "comedy"], ["sci-fi", "comedy"])
    assert m["accuracy"] == 1.0
    # Two labels perfect (f1=1), 13 labels absent (scored 0, as the official evaluator's sklearn call does).
    assert m["f1"] == pytest.approx(2 / len(LAMP2_MOVIE_TAGS), abs=1e-12)


def test_regression_unparseable_prediction_scored_as_official():
    spec = get_task("LaMP-3")
    # gold 2 -> unparseable maps to 5 (farther); gold 4 -> maps to 1; "3" parses.
    m = spec.metrics(["meh", "n/a", "3"], ["2", "4", "5"])
    errs = [3.0, 3.0, 2.0]
    assert m["MAE"] == pytest.approx(sum(errs) / 3, abs=1e-12)
    assert m["RMSE"] == pytest.approx(math.sqrt(sum(e * e for e in errs) / 3), abs=1e-12)


def test_rouge_hand_computed():
    # pred "the cat sat", gold "the cat sat down": unigram P=3/3 R=3/4 -> F=6/7; LCS=3 -> same.
    m = rouge_metrics(["the cat sat"], ["the cat sat down"])
    assert m["rouge-1"] == pytest.approx(6 / 7, abs=1e-9)
    assert m["rouge-L"] == pytest.approx(6 / 7, abs=1e-9)
    m2 = rouge_metrics(["", "a b"], ["x y", "b a"])
    # empty pred scores 0; "a b" vs "b a": rouge1 F=1, LCS=1 -> P=R=1/2 -> F=1/2
    assert m2["rouge-1"] == pytest.approx(0.5, abs=1e-9)
    assert m2["rouge-L"] == pytest.approx(0.25, abs=1e-9)


def test_parse_maps_model_text_to_labels():
    assert get_task("LaMP-2").parse("  Dark comedy, I think\nmore") == "dark comedy"
    assert get_task("LaMP-3").parse("Score: 4 stars") == "4"
    assert get_task("LaMP-4").parse("A headline\nextra") == "A headline"
