"""GSM8K-style synthetic math word problems with worked solutions (the default recipe's math domain).

Each template is a small function drawing names, items and numbers from a seeded ``random.Random`` and
returning the question and the solution steps. Steps carry GSM8K calculator annotations
(``48/2 = <<48/2=24>>24``) and the solution ends with ``#### N`` where N is an integer, so GSM8K scorers
and answer extractors work unchanged.

Splits are disjoint by construction: a question belongs to the split picked by a hash of its text
(80 % train, 10 % validation, 10 % test), and each split only keeps questions hashed to it. So a test
question can never appear in train, whatever seeds the two were generated with.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from mft_bench.errors import MftBenchError

SPLITS = ("train", "validation", "test")
# Rows a synthetic source yields when a recipe does not say (GSM8K-like sizes).
DEFAULT_ROWS = {"train": 7473, "validation": 500, "test": 1319}
# Hash buckets out of 10 per split.
_BUCKETS = {"test": range(0, 1), "validation": range(1, 2), "train": range(2, 10)}


@dataclass(frozen=True)
class Person:
    name: str
    subj: str  # she / he
    obj: str  # her / him
    poss: str  # her / his


PEOPLE = tuple(
    Person(name, *(("she", "her", "her") if g == "f" else ("he", "him", "his")))
    for name, g in [
        ("Maya", "f"), ("Liam", "m"), ("Sofia", "f"), ("Noah", "m"), ("Aisha", "f"), ("Mateo", "m"),
        ("Chloe", "f"), ("Ethan", "m"), ("Priya", "f"), ("Kenji", "m"), ("Fatima", "f"), ("Lucas", "m"),
        ("Hannah", "f"), ("Omar", "m"), ("Elena", "f"), ("Diego", "m"), ("Grace", "f"), ("Samuel", "m"),
        ("Zara", "f"), ("Theo", "m"), ("Leila", "f"), ("Marcus", "m"), ("Ingrid", "f"), ("Kwame", "m"),
    ]
)
GOODS = (
    "notebooks", "pens", "apples", "candles", "mugs", "posters", "socks", "batteries", "plants",
    "comic books", "tennis balls", "paintbrushes", "cupcakes", "scarves", "puzzles", "sticker packs",
)
SHARED_ITEMS = ("marbles", "stickers", "cookies", "baseball cards", "seashells", "crayons", "grapes", "coins")
SALE_ITEMS = ("jacket", "lamp", "backpack", "pair of shoes", "board game", "blender", "guitar strap", "helmet")
BAKED = ("muffins", "bagels", "croissants", "cookies", "rolls", "scones")
VEHICLES = ("train", "bus", "truck", "car", "ferry")
JOBS = ("tutoring", "walking dogs", "working at a cafe", "babysitting", "repairing bikes")
TRIPS = ("museum", "zoo", "science center", "aquarium", "theater")


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str) -> Fraction:
    """Exact value of an arithmetic expression of integers and + - * / (the annotations' language)."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression: {expr!r}")

    return walk(ast.parse(expr, mode="eval").body)


def calc(expr: str) -> tuple[str, int]:
    """``"3*4 = <<3*4=12>>12"`` and 12; the templates only build expressions with integer results."""
    value = evaluate(expr)
    if value.denominator != 1:  # a template bug, not user input
        raise ValueError(f"non-integer step {expr} = {value}")
    n = int(value)
    return f"{expr} = <<{expr}={n}>>{n}", n


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[str, ...]
    answer: int

    def solution(self) -> str:
        return "\n".join(self.steps) + f"\n#### {self.answer}"


# ---------------------------------------------------------------------------------------------- templates


def shopping_change(rng: random.Random) -> Problem:
    p = rng.choice(PEOPLE)
    item1, item2 = rng.sample(GOODS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    price1, price2 = rng.randint(2, 15), rng.randint(2, 15)
    s1, x = calc(f"{a}*{price1}")
    s2, y = calc(f"{b}*{price2}")
    s3, total = calc(f"{x}+{y}")
    bill = next(v for v in (20, 50, 100, 200, 500) if v > total)
    s4, change = calc(f"{bill}-{total}")
    q = (
        f"{p.name} buys {a} {item1} for ${price1} each and {b} {item2} for ${price2} each. "
        f"{p.subj.capitalize()} pays with a ${bill} bill. How much change does {p.subj} get back?"
    )
    steps = (
        f"The {item1} cost {s1} dollars.",
        f"The {item2} cost {s2} dollars.",
        f"Altogether {p.name} spends {s3} dollars.",
        f"{p.poss.capitalize()} change is {s4} dollars.",
    )
    return Problem(q, steps, change)


def travel_distance(rng: random.Random) -> Problem:
    vehicle = rng.choice(VEHICLES)
    v1, v2 = rng.randint(3, 16) * 5, rng.randint(3, 16) * 5
    h1, h2 = rng.randint(1, 6), rng.randint(1, 6)
    s1, d1 = calc(f"{v1}*{h1}")
    s2, d2 = calc(f"{v2}*{h2}")
    s3, total = calc(f"{d1}+{d2}")
    q = (
        f"A {vehicle} travels at {v1} miles per hour for {h1} hours, then at {v2} miles per hour "
        f"for {h2} more hours. How many miles does the {vehicle} travel in total?"
    )
    steps = (
        f"In the first part it covers {s1} miles.",
        f"In the second part it covers {s2} miles.",
        f"In total it travels {s3} miles.",
    )
    return Problem(q, steps, total)


def reading_days(rng: random.Random) -> Problem:
    p = rng.choice(PEOPLE)
    per_day, days, done = rng.randint(5, 30), rng.randint(2, 15), rng.randint(10, 200)
    pages = done + per_day * days
    s1, left = calc(f"{pages}-{done}")
    s2, answer = calc(f"{left}/{per_day}")
    q = (
        f"{p.name} is reading a {pages}-page book. {p.subj.capitalize()} has already read {done} pages and "
        f"reads {per_day} pages every day. How many more days does {p.subj} need to finish the book?"
    )
    steps = (f"{p.name} still has {s1} pages to read.", f"That takes {s2} days.")
    return Problem(q, steps, answer)


def ages(rng: random.Random) -> Problem:
    a, b, c = rng.sample(PEOPLE, 3)
    age_c, diff, times, years = rng.randint(2, 12), rng.randint(2, 10), rng.randint(2, 4), rng.randint(2, 10)
    s1, age_b = calc(f"{age_c}+{diff}")
    s2, age_a = calc(f"{times}*{age_b}")
    s3, answer = calc(f"{age_a}+{years}")
    word = {2: "twice", 3: "three times", 4: "four times"}[times]
    q = (
        f"{c.name} is {age_c} years old. {b.name} is {diff} years older than {c.name}, and {a.name} is "
        f"{word} as old as {b.name}. How old will {a.name} be in {years} years?"
    )
    steps = (
        f"{b.name} is {s1} years old.",
        f"{a.name} is {s2} years old.",
        f"In {years} years {a.name} will be {s3} years old.",
    )
    return Problem(q, steps, answer)


def sharing(rng: random.Random) -> Problem:
    p = rng.choice(PEOPLE)
    item = rng.choice(SHARED_ITEMS)
    friends, each, kept = rng.randint(2, 8), rng.randint(3, 15), rng.randint(1, 20)
    total = kept + friends * each
    s1, rest = calc(f"{total}-{kept}")
    s2, share = calc(f"{rest}/{friends}")
    q = (
        f"{p.name} has {total} {item}. {p.subj.capitalize()} keeps {kept} for {p.obj}self and shares the rest "
        f"equally among {friends} friends."
    )
    steps = [f"{p.name} shares {s1} {item}.", f"Each friend gets {s2} {item}."]
    answer = share
    if rng.random() < 0.5:  # a third step: each friend gives some away
        gift = rng.randint(1, share - 1) if share > 1 else 0
        if gift:
            s3, answer = calc(f"{share}-{gift}")
            q += f" Each friend then gives {gift} to a sibling. How many {item} does each friend have left?"
            steps.append(f"After the gift each friend has {s3} {item} left.")
            return Problem(q, tuple(steps), answer)
    q += f" How many {item} does each friend get?"
    return Problem(q, tuple(steps), answer)


def sale_discount(rng: random.Random) -> Problem:
    p = rng.choice(PEOPLE)
    item = rng.choice(SALE_ITEMS)
    # price a multiple of 20 and percent a multiple of 5 keep the discount an integer.
    price, pct, count = rng.randint(1, 15) * 20, rng.randint(1, 10) * 5, rng.randint(2, 6)
    s1, discount = calc(f"{price}*{pct}/100")
    s2, sale = calc(f"{price}-{discount}")
    s3, total = calc(f"{count}*{sale}")
    q = (
        f"A {item} normally costs ${price}. During a sale the price is reduced by {pct}%. "
        f"{p.name} buys {count} of them at the sale price. How many dollars does {p.subj} pay?"
    )
    steps = (
        f"The discount is {s1} dollars.",
        f"The sale price is {s2} dollars.",
        f"For {count} of them {p.name} pays {s3} dollars.",
    )
    return Problem(q, steps, total)


def weekly_savings(rng: random.Random) -> Problem:
    p = rng.choice(PEOPLE)
    job = rng.choice(JOBS)
    wage, hours, days, weeks = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6), rng.randint(2, 8)
    s1, daily = calc(f"{wage}*{hours}")
    s2, weekly = calc(f"{daily}*{days}")
    spend = rng.randint(1, max(1, (weekly - 1) // 5)) * 5 if weekly > 5 else 1
    s3, saved = calc(f"{weekly}-{spend}")
    s4, answer = calc(f"{saved}*{weeks}")
    q = (
        f"{p.name} earns ${wage} per hour {job}. {p.subj.capitalize()} works {hours} hours a day, {days} days a "
        f"week, and spends ${spend} of each week's pay. How many dollars does {p.subj} save in {weeks} weeks?"
    )
    steps = (
        f"Each day {p.subj} earns {s1} dollars.",
        f"Each week {p.subj} earns {s2} dollars.",
        f"{p.subj.capitalize()} saves {s3} dollars a week.",
        f"In {weeks} weeks {p.subj} saves {s4} dollars.",
    )
    return Problem(q, steps, answer)


def bakery_boxes(rng: random.Random) -> Problem:
    item = rng.choice(BAKED)
    trays, per_tray = rng.randint(2, 9), rng.randint(6, 24)
    s1, total = calc(f"{trays}*{per_tray}")
    box = rng.randint(2, min(12, total // 2))  # at least one full box and at least one sold
    boxes = rng.randint(1, (total - 1) // box)
    sold = total - boxes * box
    s2, rest = calc(f"{total}-{sold}")
    s3, answer = calc(f"{rest}/{box}")
    q = (
        f"A bakery bakes {trays} trays of {item} with {per_tray} on each tray. {sold} of them are sold at the "
        f"counter and the rest are packed in boxes of {box}. How many boxes are filled?"
    )
    steps = (
        f"The bakery bakes {s1} {item}.",
        f"That leaves {s2} {item} to pack.",
        f"They fill {s3} boxes.",
    )
    return Problem(q, steps, answer)


def group_tickets(rng: random.Random) -> Problem:
    place = rng.choice(TRIPS)
    # a multiple of 20 students and a multiple of 5 percent keep the head count an integer.
    students, pct, ticket = rng.randint(2, 10) * 20, rng.randint(2, 19) * 5, rng.randint(3, 30)
    s1, going = calc(f"{students}*{pct}/100")
    s2, cost = calc(f"{going}*{ticket}")
    q = (
        f"A school has {students} students in the fifth grade. {pct}% of them go on a trip to the {place}, "
        f"and each ticket costs ${ticket}. How many dollars do the tickets cost in total?"
    )
    steps = (f"The number of students on the trip is {s1}.", f"The tickets cost {s2} dollars.")
    return Problem(q, steps, cost)


TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {
    "shopping_change": shopping_change,
    "travel_distance": travel_distance,
    "reading_days": reading_days,
    "ages": ages,
    "sharing": sharing,
    "sale_discount": sale_discount,
    "weekly_savings": weekly_savings,
    "bakery_boxes": bakery_boxes,
    "group_tickets": group_tickets,
}


# ---------------------------------------------------------------------------------------------- generation


def split_of(question: str) -> str:
    """The split a question belongs to, from a stable hash of its text (not Python's salted ``hash``)."""
    bucket = int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:8], 16) % 10
    return next(split for split, buckets in _BUCKETS.items() if bucket in buckets)


def generate(split: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct problems of ``split`` as GSM8K rows ``{"question", "answer"}``; same seed, same rows.

    The first ``m`` rows of ``generate(split, n, seed)`` equal ``generate(split, m, seed)``.
    """
    if split not in SPLITS:
        raise MftBenchError(f"synthetic_math has no split '{split}'; choose one of {', '.join(SPLITS)}")
    if n < 0:
        raise MftBenchError(f"synthetic_math: rows must be >= 0, got {n}")
    rng = random.Random(f"synthetic_math/{split}/{seed}")  # str seeds are stable across runs
    names = sorted(TEMPLATES)
    rows: list[dict] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 100 * n + 10_000
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:  # the template space is far larger; this guards against a bad template
            raise MftBenchError(f"synthetic_math: could only make {len(rows)} distinct '{split}' problems of {n}")
        problem = TEMPLATES[rng.choice(names)](rng)
        if problem.question in seen or split_of(problem.question) != split:
            continue
        seen.add(problem.question)
        rows.append({"question": problem.question, "answer": problem.solution()})
    return rows
