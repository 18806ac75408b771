"""Word problems with worked, free-form solutions: the testbed task (configs/testbed.yaml).

A prompt tells a short story of a count that changes `n_ops` times; the reference solution
restates the start, works each change as "a + b = c" / "a - b = c" in one of several
phrasings, most of whose words are free choices (connectives, verbs, fillers, an adjective
from a large word list, optional asides), and ends with "The answer is N." Sampled at
temperature 1.0, the free-form text gives a real long tail of low-probability tokens (the
adjectives) and many uncertain ones around the tokens that decide the reward (the
arithmetic), and responses run 30-64 subword tokens.

Reward: 1 if the completion's last "answer is N" names the reference's final count, else 0
(sequence level, verifiable). `Example.answer` holds the whole reference solution (the
warm start's supervised target); its final count is the number after "The answer is".

Every example is a pure function of (seed, split, index), and eval prompts are excluded from
the training stream, as for the arithmetic task.
"""

from __future__ import annotations

import random
import re

from drpo.tasks.base import Example, Problem

NAMES = (
    "Ada Alex Ali Amir Ana Anna Ari Ava Ben Bo Cam Cara Chen Chloe Dan Dara Dev Eli Ella Emma Eva Finn Gia Gus "
    "Hana Hugo Ian Ida Ines Ivy Jack Jada Jay Jin Jo Kai Kara Kim Leo Lena Liam Lila Lou Luca Luz Max Maya Mei "
    "Mia Milo Nia Nico Nina Noah Noor Omar Otto Pia Raj Ravi Rosa Ruby Sam Sara Sol Tara Teo Tom Uma Vera Yara "
    "Yuki Zara Zoe"
).split()
ITEMS = (
    "apples acorns badges balloons beads bells blocks books bottles bricks buttons candles cards carrots "
    "cherries coins cookies crayons cups dice eggs feathers flowers gems grapes hats jars keys kites lemons "
    "letters marbles medals muffins nails oranges pebbles pencils pens pins plums puzzles ribbons rings rocks "
    "seeds shells socks spoons stamps stickers stones straws tickets tiles toys trains walnuts whistles"
).split()
# Free-form words: many near-equally likely choices in every sentence of a solution, the
# source of low-probability samples (as word choice is in an LLM's free-form reasoning).
ADJECTIVES = (
    "amber ancient bright brisk calm careful cheerful chilly clever cosy crisp curious dainty dusty eager "
    "early fancy fierce fine fluffy fresh friendly gentle giant glad glossy golden grand happy hasty heavy "
    "hollow humble jolly kind large lively lovely lucky merry mighty misty modest neat nimble noble odd "
    "orange pale patient perfect plain playful plucky polite proud quick quiet rapid rare rosy round royal "
    "rusty salty shiny silent silver simple sleepy slim smooth snowy soft solid sour spare speedy spotted "
    "steady sticky stout striped sturdy sunny sweet swift tall tame tidy tiny tough tricky velvet vivid "
    "warm wavy wild windy wise witty wooden woolly young zesty agile airy bold bouncy breezy bumpy busy "
    "chunky classic clear cloudy cool copper cozy crafty crimson dapper daring dizzy dreamy dusky elegant "
    "faded fair famous fast fizzy flat fond foggy frosty funny fuzzy giddy glowing graceful green grumpy "
    "handy hardy hearty honest hungry icy jagged jazzy keen lazy light little loud loyal lumpy magic mellow "
    "mild minty muddy nice nutty old pink plump posh pretty prime quirky rainy ready red rich rocky rough "
    "rowdy rugged sandy scruffy sharp short shy silky sly smart snappy spicy spiky stormy sunlit tangy "
    "thick thin thrifty toasty trusty upbeat vast violet wary weary white wintry yellow zany"
).split()
PLACES = (
    "at the park|at the market|at school|at home|in the garden|at the fair|by the river|at the library|"
    "on the bus|at the beach|in the kitchen|at the shop|at the zoo|on the farm|at a party|in the yard"
).split("|")

ADD_STORY = ("{n} finds {k} more {item}.", "{n} buys {k} more {item}.", "{n} gets {k} more {item} {place}.",
             "A friend gives {n} {k} more {item}.", "{n} picks up {k} more {item} {place}.")
SUB_STORY = ("{n} gives {k} {item} to {m}.", "{n} loses {k} {item} {place}.", "{n} sells {k} {item}.",
             "{n} trades away {k} {item}.", "{n} gives away {k} of the {item}.")
# Solution templates. "[a|b|c]" is a free word choice, drawn uniformly when the solution is
# written: most words of a worked solution are such choices (connectives, verbs, filler), so
# that, as in an LLM's free-form reasoning, few sampled tokens are near-certain; the numbers
# and the final line stay fixed.
_THEN = "[Then|Next|After that|Now|So|Later|From there|This time|Once more|And then]"
_HAS = "[has|holds|keeps|owns|gets|counts|sees|finds|collects|stores]"
_GIVES = "[gives|makes|leaves|means|yields|brings|comes to|shows|equals|is]"
OPENERS = ("[Let me|Let us|I will|We can|Time to|Now to|I can|We will] [work it out|think step by step|"
           "count|track the count|follow each change|see|go step by step|add it up|check each step|do the math].",)
START = ("{n} [starts with|begins with|first has|has|holds|keeps|owns] {a} {adj} {item}.",
         "[At first|To begin|At the start|Early on|Before that|In the beginning|Initially|First] {n} " + _HAS
         + " {a} {adj} {item}.",
         "[There are|We have|We start with|The count is|It starts at] {a} {adj} {item}.")
ADD_STEP = ("[Adding|Plus|With|Counting|Taking in|Getting] {k} [more|new|extra|further] {adj} [ones|of them|{item}] "
            + _GIVES + " {a} + {k} = {c}.",
            _THEN + " {a} + {k} = {c} {adj} {item}.",
            _THEN + " {n} " + _HAS + " {k} more {adj} {item}, [so|and|thus|hence|which gives] {a} + {k} = {c}.")
SUB_STEP = ("[Taking away|Removing|Minus|Losing|Without|Dropping] {k} {adj} [ones|of them|{item}] "
            + _GIVES + " {a} - {k} = {c}.",
            _THEN + " {a} - {k} = {c} {adj} {item}.",
            _THEN + " {n} [loses|drops|gives up|sells|trades|misses|spends|hands over] {k} {adj} {item}, "
            "[so|and|thus|hence|which gives] {a} - {k} = {c}.")
ASIDES = ("[What a|Such a|Quite a|It is a|That was a|A very] {adj} [day|moment|time|scene|morning|trip].",
          "The {item} [look|seem|feel|are|stay] {adj}.", "{n} [feels|looks|seems|is|stays] {adj}.")
CLOSERS = ("[So|Thus|Finally|In the end|Now|At last|All told|Overall] {n} " + _HAS
           + " {c} {adj} {item} [now|in all|in total|left|at the end|altogether].",)
FINAL = "The answer is {c}."

_ANSWER = re.compile(r"answer is\s*(-?\d+)")


def final_count(text: str) -> str | None:
    """The number after the last "answer is" in `text`, or None."""
    found = _ANSWER.findall(text)
    return found[-1] if found else None


def word_problem_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's last "answer is N" equals the reference solution's."""
    want, got = final_count(answer), final_count(completion)
    if want is None:
        raise ValueError(f"reference solution has no 'The answer is N': {answer!r}")
    return float(got is not None and got == want)


def make_problem(rng: random.Random, n_ops: int) -> Example:
    """One story with `n_ops` changes, its worked solution and final count (never negative)."""
    n, m = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a = rng.randint(5, 30)
    story = [f"{n} has {a} {item}."]
    work = [_fill(rng.choice(OPENERS), rng), _fill(rng.choice(START), rng, n=n, a=a, item=item)]
    for i in range(n_ops):
        add = a < 4 or rng.random() < 0.5
        k = rng.randint(1, 15) if add else rng.randint(1, min(a, 15))
        c = a + k if add else a - k
        event = _fill(rng.choice(ADD_STORY if add else SUB_STORY), rng, n=n, m=m, k=k, item=item)
        if i:  # "Then a friend gives ...", "Then Mia sells ..."
            event = "Then " + (event[0].lower() + event[1:] if event.startswith("A ") else event)
        story.append(event)
        work.append(_fill(rng.choice(ADD_STEP if add else SUB_STEP), rng, n=n, a=a, k=k, c=c, item=item))
        if rng.random() < 0.5:
            work.append(_fill(rng.choice(ASIDES), rng, n=n, item=item))
        a = c
    story.append(f"How many {item} does {n} have now?")
    work.append(_fill(rng.choice(CLOSERS), rng, n=n, c=a, item=item))
    work.append(FINAL.format(c=a))
    return Example(prompt=" ".join(story), answer=" ".join(work))


_CHOICE = re.compile(r"\[([^\[\]]*)\]")


def _fill(template: str, rng: random.Random, **fields) -> str:
    # Word choices first (left to right), then only the random words the template uses.
    template = _CHOICE.sub(lambda m: rng.choice(m.group(1).split("|")), template)
    if "{adj}" in template:
        fields["adj"] = rng.choice(ADJECTIVES)
    if "{place}" in template:
        fields["place"] = rng.choice(PLACES)
    return template.format(**fields)


def problems(seed: int, n_ops: int) -> Problem:
    """problem(split, index) of the task (drpo.tasks.base), seeded by `seed`."""
    if isinstance(n_ops, bool) or not isinstance(n_ops, int) or not 1 <= n_ops <= 4:
        raise ValueError(f"task.n_ops must be an int in [1, 4], got {n_ops!r}")
    return lambda split, index: make_problem(random.Random(f"words/{seed}/{split}/{index}"), n_ops)
