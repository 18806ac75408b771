"""Built-in arithmetic task and the JSONL loader."""

import json

import pytest

from drpo.tasks import DatasetError, Example, load_jsonl, make_task
from drpo.tasks.arithmetic import eval_problems, problem_at, train_stream
from drpo.tasks.jsonl import cycle_stream, split_examples
from drpo.train.config import TaskConfig


def _value(prompt: str) -> int:
    a, op, b = None, None, None
    for o in "+-*":
        if o in prompt[:-1]:
            a, b = prompt[:-1].split(o)
            op = o
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


@pytest.mark.parametrize("digits, ops", [(1, "+"), (2, "+"), (3, "+-"), (2, "*")])
def test_arithmetic_answers_are_correct_and_sized(digits, ops):
    for i in range(200):
        ex = problem_at(0, "train", i, digits, ops)
        assert ex.prompt.endswith("=")
        assert int(ex.answer) == _value(ex.prompt) >= 0
        operands = ex.prompt[:-1].replace("-", "+").replace("*", "+").split("+")
        assert all(0 <= int(x) < 10**digits for x in operands)
        assert any(op in ex.prompt for op in ops)


def test_arithmetic_is_deterministic_and_seeded():
    a = [problem_at(0, "train", i, 2, "+") for i in range(20)]
    b = [problem_at(0, "train", i, 2, "+") for i in range(20)]
    c = [problem_at(1, "train", i, 2, "+") for i in range(20)]
    assert a == b and a != c


def test_eval_split_is_held_out_of_training_stream():
    held = eval_problems(0, 20, 1, "+")  # of the 100 one-digit sums
    held_prompts = {ex.prompt for ex in held}
    stream = train_stream(0, 1, "+", held)
    train_prompts = {stream(i).prompt for i in range(2000)}
    assert len(held_prompts) == len(held)  # distinct
    assert not held_prompts & train_prompts
    assert len(train_prompts) == 100 - len(held_prompts)  # every other problem still reachable


def test_eval_size_too_large_is_rejected():
    with pytest.raises(ValueError, match="eval_size=500 is too large"):
        eval_problems(0, 500, 1, "+")


def test_make_task_arithmetic_reward_is_exact():
    task = make_task(TaskConfig(digits=2), seed=0)
    ex = task.train_example(0)
    assert task.reward(ex.answer, ex.answer) == 1.0
    assert task.reward(str(int(ex.answer) + 1), ex.answer) == 0.0
    assert len(task.eval_examples) == 256  # the default task.eval_size


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_jsonl_prompt_or_question(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "1+1?", "answer": "2"}), "", json.dumps({"question": "2*3?", "answer": 6})])
    assert load_jsonl(p) == [Example("1+1?", "2"), Example("2*3?", "6")]


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ("{not json", r"d.jsonl:2: invalid JSON"),
        ('["a", "b"]', r"d.jsonl:2: expected a JSON object, got list"),
        ('{"answer": "1"}', r"d.jsonl:2: needs exactly one of the keys 'prompt' or 'question'"),
        ('{"prompt": "a", "question": "b", "answer": "1"}', r"d.jsonl:2: needs exactly one"),
        ('{"prompt": "a"}', r"d.jsonl:2: missing key 'answer'"),
        ('{"prompt": "", "answer": "1"}', r"d.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"prompt": "a", "answer": null}', r"d.jsonl:2: 'answer' must be a non-empty string or a number"),
        ('{"prompt": "a", "answer": true}', r"d.jsonl:2: 'answer' must be"),
    ],
)
def test_malformed_jsonl_lines_name_file_and_line(tmp_path, bad_line, match):
    p = _write(tmp_path, [json.dumps({"prompt": "ok", "answer": "1"}), bad_line, json.dumps({"prompt": "x", "answer": "2"})])
    with pytest.raises(DatasetError, match=match):
        load_jsonl(p)


def test_missing_and_empty_dataset(tmp_path):
    with pytest.raises(DatasetError, match="dataset file not found: .*nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no examples"):
        load_jsonl(tmp_path / "e.jsonl")


def test_split_and_cycle(tmp_path):
    examples = [Example(f"q{i}", str(i)) for i in range(10)]
    train, held = split_examples(examples, 3, seed=0)
    assert len(held) == 3 and len(train) == 7
    assert set(train) | set(held) == set(examples) and not set(train) & set(held)
    stream = cycle_stream(train, seed=0)
    first_epoch = [stream(i) for i in range(7)]
    assert sorted(first_epoch, key=lambda e: e.prompt) == sorted(train, key=lambda e: e.prompt)
    second_epoch = [stream(i) for i in range(7, 14)]
    assert sorted(second_epoch, key=lambda e: e.prompt) == sorted(train, key=lambda e: e.prompt)
    with pytest.raises(DatasetError, match="eval_size=10 must be in"):
        split_examples(examples, 10, seed=0)


def test_make_task_jsonl_uses_math_reward(tmp_path):
    lines = [json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) for i in range(20)]
    p = _write(tmp_path, lines)
    task = make_task(TaskConfig(name="jsonl", dataset=str(p), eval_size=5), seed=0)
    assert len(task.eval_examples) == 5
    ex = task.train_example(0)
    assert task.reward(f"so the answer is \\boxed{{{ex.answer}}}", ex.answer) == 1.0
    assert task.reward("the answer is 12345", ex.answer) == 0.0
