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


def test_non_utf8_jsonl_names_file_line_and_byte(tmp_path, capsys):
    """A Latin-1 byte (0xe9, 'e' acute) on line 3: an error naming the file, the line, the column
    and the byte, from load_jsonl and from `drpo train` (exit 2, one line, no traceback)."""
    from drpo.cli import main

    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "caf\xe9", "answer": "3"}\n')
    expected = f"{p}:3: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8"
    with pytest.raises(DatasetError) as err:
        load_jsonl(p)
    assert str(err.value) == expected
    assert main(["train", "--set", "task.name=jsonl", "--set", f"task.dataset={p}", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"drpo train: {expected}"
    assert not (tmp_path / "run").exists()


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


# ---------------------------------------------------------------- load-time checks against the model


def _jsonl_run(tmp_path, lines, *overrides):
    """A jsonl run that must stop at load; returns the error and the run directory."""
    from drpo.train.loop import train
    from train_helpers import fast_config

    data = _write(tmp_path, lines)
    cfg = fast_config(tmp_path, "task.name=jsonl", f"task.dataset={data}", "task.eval_size=2", *overrides)
    out = tmp_path / "run"
    with pytest.raises(DatasetError) as err:
        train(cfg, out, progress=False, log=lambda *_: None)
    return str(err.value), data, out


def _ok(i):
    return json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)})


@pytest.mark.parametrize("field, text", [("prompt", "caf\u00e9 1+1="), ("answer", "2\u20ac")])
def test_untokenizable_text_stops_the_run_at_load_naming_file_line_and_character(tmp_path, field, text):
    bad = {"prompt": "1+1=", "answer": "2", field: text}
    msg, data, out = _jsonl_run(tmp_path, [_ok(1), _ok(2), _ok(3), json.dumps(bad), _ok(4)])
    bad_char = next(c for c in text if ord(c) > 127)
    assert msg.startswith(f"{data}:4: {field} {text!r} cannot be tokenized by the model's tokenizer")
    assert f"character {bad_char!r} (U+{ord(bad_char):04X}) is not in its vocabulary" in msg
    assert not (out / "metrics.jsonl").exists()  # before the warm start and the first step


def test_prompt_longer_than_the_model_positions_stops_the_run_at_load(tmp_path):
    # the char tokenizer: one token per character plus <bos>; 50 + 1 + 6 new tokens > 56 positions
    long_prompt = "1+" * 24 + "1="
    lines = [_ok(1), _ok(2), json.dumps({"prompt": long_prompt, "answer": "25"}), _ok(3)]
    msg, data, _ = _jsonl_run(tmp_path, lines, "model.max_position=56", "rollout.max_new_tokens=6")
    assert msg == (f"{data}:3: prompt {long_prompt!r} is 51 tokens; with rollout.max_new_tokens=6 that is 57 > "
                   "56 positions (model.max_position)")
    # exactly at the limit is fine
    from drpo.models import build_tiny_model, make_char_tokenizer
    from drpo.tasks import check_examples

    tok = make_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8, max_position=57)
    task = make_task(TaskConfig(name="jsonl", dataset=str(data), eval_size=1), seed=0)
    check_examples(task, encode_prompt=lambda t: tok(t)["input_ids"], encode_answer=lambda t: tok(t)["input_ids"],
                   unk_id=tok.unk_token_id, max_positions=model.config.max_position_embeddings, max_new_tokens=6)


def test_generated_tasks_pass_the_load_check():
    from drpo.models import make_char_tokenizer
    from drpo.tasks import check_examples

    tok = make_char_tokenizer()
    task = make_task(TaskConfig(digits=3, ops="+-*", eval_size=64), seed=0)
    # the longest 3-digit prompt "999*999=" is 8 characters + <bos>: 9 + 6 fits 15, not 14
    check_examples(task, encode_prompt=lambda t: tok(t)["input_ids"], encode_answer=lambda t: tok(t)["input_ids"],
                   unk_id=None, max_positions=15, max_new_tokens=6)
    with pytest.raises(DatasetError, match=r"arithmetic (train|eval) example \d+: prompt '\d+[-+*]\d+=' is 9 tokens"):
        check_examples(task, encode_prompt=lambda t: tok(t)["input_ids"], encode_answer=lambda t: tok(t)["input_ids"],
                       unk_id=None, max_positions=14, max_new_tokens=6)
