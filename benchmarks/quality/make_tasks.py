#!/usr/bin/env python3
"""Make the three tasks of the "which method should I use?" study (docs/quality.md).

    python3 benchmarks/quality/make_tasks.py            # writes benchmarks/quality/data/

Standard library only, deterministic (fixed seeds): the committed files are what this script
writes, on any machine with Python 3.11. Each task has three splits, one JSON object a line,
`{"prompt", "completion"}` plus the fields its scorer needs:

- `train.jsonl` (300): what the runs train on;
- `validation.jsonl` (40): the same distribution as train, disjoint examples: the eval-loss
  curves and the learning-rate sweep are measured on it;
- `test.jsonl` (40): held out, never seen in training nor in the sweep, and built from material
  the training split does not contain (below). Only the final scores use it.

Tasks:

1. `d2t` (data-to-text in the style of ViGGO): a meaning representation
   `inform(name[Crimson Harbor], genre[puzzle], rating[excellent], ...)` -> one sentence that
   realises every slot. The sentence is a fixed function of the MR (slots in MR order, one
   phrase each), so exact match is reachable. `slots` lists the slot values. Test: game names
   made of words that never occur in train, developers and release years that never occur in
   train, and slot combinations (sets of slot types) that never occur in train.
2. `math` (GSM8k-style word problems, 2-3 steps, small numbers): a short worked answer ending
   in `The answer is N.`; scored by the final number. `answer` is N. Test: problem templates
   that never occur in train, and number triples never seen in train.
3. `sql` (text-to-SQL over small generated schemas): the schema and a question -> one SQL
   query; scored by exact match of the normalised query. Test: schemas (tables and columns)
   from domains that never occur in train.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

N_TRAIN, N_VALID, N_TEST = 300, 40, 40

# ---------------------------------------------------------------- task 1: data-to-text

NAME_FIRST = [
    "Crimson", "Silent", "Iron", "Hollow", "Golden", "Frozen", "Shadow", "Emerald", "Broken",
    "Distant", "Burning", "Hidden", "Lunar", "Savage", "Velvet", "Cobalt", "Ancient", "Electric",
]
NAME_SECOND = [
    "Harbor", "Forge", "Kingdom", "Circuit", "Frontier", "Tide", "Citadel", "Garden", "Signal",
    "Legacy", "Orbit", "Canyon", "Empire", "Voyage", "Spire", "Rally", "Dungeon", "Horizon",
]
# Held out: test game names use only these words.
TEST_NAME_FIRST = ["Scarlet", "Obsidian", "Wandering", "Radiant", "Quiet", "Neon"]
TEST_NAME_SECOND = ["Lantern", "Bastion", "Meridian", "Cascade", "Relic", "Harvest"]
GENRES = ["puzzle", "racing", "strategy", "shooter", "platformer", "role-playing", "simulation",
          "adventure", "fighting", "sports"]
RATINGS = ["excellent", "good", "average", "poor"]
DEVELOPERS = ["Northlight", "Bluefin Studios", "Pixel Arc", "Red Kite Games", "Stonewall",
              "Moonforge", "Tinker Labs", "Aurora Works"]
TEST_DEVELOPERS = ["Glasshouse", "Copperleaf Games", "Driftwood Studio"]
YEARS = [str(y) for y in range(1996, 2016)]
TEST_YEARS = [str(y) for y in range(2017, 2024)]
PLATFORMS = ["PC", "PlayStation", "Xbox", "Nintendo Switch", "PC and PlayStation",
             "PC and Xbox"]
PERSPECTIVES = ["first-person", "third-person", "top-down", "side-view"]
MODES = ["multiplayer", "single-player"]

# Optional slots after name and genre; a combination is the set of optional slots present.
OPTIONAL = ["rating", "developer", "release_year", "platforms", "perspective", "mode"]


def combos() -> list[tuple[str, ...]]:
    """Every set of 2-4 optional slots, in OPTIONAL order."""
    out: list[tuple[str, ...]] = []
    n = len(OPTIONAL)
    for mask in range(1 << n):
        chosen = tuple(OPTIONAL[i] for i in range(n) if mask >> i & 1)
        if 2 <= len(chosen) <= 4:
            out.append(chosen)
    return out


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def realise(act: str, slots: dict[str, str]) -> str:
    """The reference sentence of an MR: a fixed phrase per slot, in a fixed order."""
    name, genre = slots["name"], slots["genre"]
    noun = f"{genre} game"
    if "rating" in slots:
        noun = f"{slots['rating']} {noun}"
    if act == "inform":
        head = f"{name} is {article(noun)} {noun}"
    else:  # recommend
        head = f"If you want {article(noun)} {noun}, try {name}"
    parts = [head]
    if "developer" in slots:
        parts.append(f" by {slots['developer']}")
    if "release_year" in slots:
        parts.append(f" released in {slots['release_year']}")
    if "platforms" in slots:
        parts.append(f" for {slots['platforms']}")
    sentence = "".join(parts) + "."
    extras = []
    if "perspective" in slots:
        extras.append(f"it is played from a {slots['perspective']} view")
    if "mode" in slots:
        extras.append(f"it is {slots['mode']}")
    if extras:
        sentence += " " + (" and ".join(extras)).capitalize() + "."
    return sentence


def d2t_example(rng: random.Random, held_out: bool, combo: tuple[str, ...]) -> dict:
    first, second = (TEST_NAME_FIRST, TEST_NAME_SECOND) if held_out else (NAME_FIRST,
                                                                           NAME_SECOND)
    slots = {"name": f"{rng.choice(first)} {rng.choice(second)}", "genre": rng.choice(GENRES)}
    values = {
        "rating": RATINGS,
        "developer": TEST_DEVELOPERS if held_out else DEVELOPERS,
        "release_year": TEST_YEARS if held_out else YEARS,
        "platforms": PLATFORMS,
        "perspective": PERSPECTIVES,
        "mode": MODES,
    }
    for slot in combo:
        slots[slot] = rng.choice(values[slot])
    act = rng.choice(["inform", "inform", "recommend"])
    mr = f"{act}(" + ", ".join(f"{k}[{v}]" for k, v in slots.items()) + ")"
    prompt = "Describe the game in one or two sentences that mention every slot: " + mr
    return {"prompt": prompt, "completion": realise(act, slots), "mr": mr,
            "slots": list(slots.values())}


def make_d2t(rng: random.Random) -> dict[str, list[dict]]:
    all_combos = combos()
    rng.shuffle(all_combos)
    # A fifth of the slot combinations appear only in test.
    n_test = len(all_combos) // 5
    test_combos, train_combos = all_combos[:n_test], all_combos[n_test:]
    train_valid = unique(lambda: d2t_example(rng, False, rng.choice(train_combos)),
                         N_TRAIN + N_VALID, key="mr")
    test = unique(lambda: d2t_example(rng, True, rng.choice(test_combos)), N_TEST, key="mr")
    return {"train": train_valid[:N_TRAIN], "validation": train_valid[N_TRAIN:], "test": test}


# ---------------------------------------------------------------- task 2: arithmetic

PEOPLE = ["Tom", "Ana", "Raj", "Mia", "Leo", "Sara", "Ben", "Lina", "Omar", "Eva", "Kai", "Nora"]
ITEMS = ["apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells"]

# Each template: (question, worked answer, constraint on a, b, c). Answers end in
# "The answer is N." Numbers a, b, c are small.
MATH_TEMPLATES = [
    ("{p} has {a} {i}. {p} buys {b} more and then gives away {c}. How many {i} does {p} have "
     "now?",
     "{p} has {a} + {b} = {ab} {i}. After giving away {c}, {p} has {ab} - {c} = {r} {i}. "
     "The answer is {r}.",
     lambda a, b, c: a + b - c, lambda a, b, c: a + b > c),
    ("{p} buys {a} boxes of {i} with {b} {i} in each box. {p} eats {c} of them. How many {i} "
     "are left?",
     "{p} buys {a} * {b} = {ab} {i}. After eating {c}, {ab} - {c} = {r} are left. "
     "The answer is {r}.",
     lambda a, b, c: a * b - c, lambda a, b, c: a * b > c),
    ("{p} has {a} {i} and {q} has {b} times as many. How many {i} do they have together?",
     "{q} has {a} * {b} = {ab} {i}. Together they have {a} + {ab} = {r} {i}. "
     "The answer is {r}.",
     lambda a, b, c: a + a * b, lambda a, b, c: True),
    ("{p} collects {a} {i} on Monday and {b} on Tuesday, then shares them equally among {c} "
     "friends. How many {i} does each friend get?",
     "{p} collects {a} + {b} = {ab} {i}. Each friend gets {ab} / {c} = {r} {i}. "
     "The answer is {r}.",
     lambda a, b, c: (a + b) // c, lambda a, b, c: c > 1 and (a + b) % c == 0),
    ("A shelf holds {a} {i}. {p} adds {b} and {q} takes {c}. How many {i} are on the shelf?",
     "After {p} adds {b}, there are {a} + {b} = {ab} {i}. After {q} takes {c}, there are "
     "{ab} - {c} = {r}. The answer is {r}.",
     lambda a, b, c: a + b - c, lambda a, b, c: a + b > c),
    ("{p} reads {a} pages a day for {b} days and then {c} more pages. How many pages does {p} "
     "read?",
     "In {b} days {p} reads {a} * {b} = {ab} pages. With {c} more, {ab} + {c} = {r} pages. "
     "The answer is {r}.",
     lambda a, b, c: a * b + c, lambda a, b, c: True),
]
# Held out: test problems use only these templates.
TEST_MATH_TEMPLATES = [
    ("{p} had {a} {i}. {p} lost {c} and then found {b}. How many {i} does {p} have?",
     "After losing {c}, {p} has {a} - {c} = {ab} {i}. After finding {b}, {p} has {ab} + {b} = "
     "{r} {i}. The answer is {r}.",
     lambda a, b, c: a - c + b, lambda a, b, c: a > c),
    ("There are {a} bags with {b} {i} each. {p} adds {c} more {i}. How many {i} are there?",
     "The bags hold {a} * {b} = {ab} {i}. With {c} more, there are {ab} + {c} = {r}. "
     "The answer is {r}.",
     lambda a, b, c: a * b + c, lambda a, b, c: True),
]


def first_step(template_answer: str, a: int, b: int, c: int) -> int:
    """The intermediate value {ab} of a worked answer."""
    if "{a} * {b} = {ab}" in template_answer:
        return a * b
    if "{a} - {c} = {ab}" in template_answer:
        return a - c
    return a + b


def math_example(rng: random.Random, templates: list, triples_seen: set | None,
                 triples_out: set) -> dict:
    while True:
        question, answer, result, ok = rng.choice(templates)
        a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 9)
        if not ok(a, b, c):
            continue
        if triples_seen is not None and (a, b, c) in triples_seen:
            continue
        break
    triples_out.add((a, b, c))
    p, q = rng.sample(PEOPLE, 2)
    i = rng.choice(ITEMS)
    r = result(a, b, c)
    ab = first_step(answer, a, b, c)
    fields = dict(p=p, q=q, i=i, a=a, b=b, c=c, ab=ab, r=r)
    return {"prompt": "Solve the problem and end with 'The answer is N.': "
                      + question.format(**fields),
            "completion": answer.format(**fields), "answer": r}


def make_math(rng: random.Random) -> dict[str, list[dict]]:
    seen: set = set()
    train_valid = unique(lambda: math_example(rng, MATH_TEMPLATES, None, seen),
                         N_TRAIN + N_VALID, key="prompt")
    test = unique(lambda: math_example(rng, TEST_MATH_TEMPLATES, seen, set()), N_TEST,
                  key="prompt")
    return {"train": train_valid[:N_TRAIN], "validation": train_valid[N_TRAIN:], "test": test}


# ---------------------------------------------------------------- task 3: text-to-SQL

# domain: (table, text column, category column, category values, number columns)
SQL_DOMAINS = [
    ("employees", "name", "department", ["sales", "legal", "research"], ["salary", "age"]),
    ("books", "title", "genre", ["fantasy", "history", "poetry"], ["pages", "price"]),
    ("cars", "model", "maker", ["volvo", "fiat", "honda"], ["horsepower", "year"]),
    ("cities", "city", "country", ["peru", "kenya", "norway"], ["population", "area"]),
    ("movies", "title", "director", ["lee", "kurosawa", "varda"], ["runtime", "budget"]),
    ("students", "name", "major", ["physics", "music", "biology"], ["grade", "credits"]),
    ("hotels", "hotel", "district", ["harbor", "old town", "uptown"], ["rooms", "stars"]),
    ("albums", "album", "label", ["sub pop", "matador", "warp"], ["tracks", "length"]),
]
# Held out: test schemas come only from these domains.
TEST_SQL_DOMAINS = [
    ("ships", "vessel", "flag", ["malta", "panama", "liberia"], ["tonnage", "crew"]),
    ("recipes", "dish", "cuisine", ["thai", "greek", "mexican"], ["calories", "minutes"]),
    ("planets", "planet", "system", ["sol", "kepler", "trappist"], ["moons", "radius"]),
]


def sql_example(rng: random.Random, domains: list) -> dict:
    table, text_col, cat_col, cat_values, num_cols = rng.choice(domains)
    cols = ["id", text_col, cat_col, *num_cols]
    schema = f"{table}({', '.join(cols)})"
    num = rng.choice(num_cols)
    cat = rng.choice(cat_values)
    n = rng.randint(2, 60)
    k = rng.randint(2, 5)
    kind = rng.randrange(7)
    if kind == 0:
        question = f"Which {text_col} values have {num} greater than {n}?"
        query = f"SELECT {text_col} FROM {table} WHERE {num} > {n}"
    elif kind == 1:
        question = f"How many rows have {cat_col} equal to '{cat}'?"
        query = f"SELECT COUNT(*) FROM {table} WHERE {cat_col} = '{cat}'"
    elif kind == 2:
        question = f"What is the average {num} for each {cat_col}?"
        query = f"SELECT {cat_col}, AVG({num}) FROM {table} GROUP BY {cat_col}"
    elif kind == 3:
        question = f"List the {k} {text_col} values with the highest {num}."
        query = f"SELECT {text_col} FROM {table} ORDER BY {num} DESC LIMIT {k}"
    elif kind == 4:
        question = f"What is the largest {num} where {cat_col} is '{cat}'?"
        query = f"SELECT MAX({num}) FROM {table} WHERE {cat_col} = '{cat}'"
    elif kind == 5:
        question = f"Show the {text_col} and {num} of rows with {num} below {n}."
        query = f"SELECT {text_col}, {num} FROM {table} WHERE {num} < {n}"
    else:
        question = f"How many distinct {cat_col} values are there?"
        query = f"SELECT COUNT(DISTINCT {cat_col}) FROM {table}"
    prompt = f"Schema: {schema}\nWrite one SQL query for: {question}"
    return {"prompt": prompt, "completion": query, "schema": schema}


def make_sql(rng: random.Random) -> dict[str, list[dict]]:
    train_valid = unique(lambda: sql_example(rng, SQL_DOMAINS), N_TRAIN + N_VALID,
                         key="prompt")
    test = unique(lambda: sql_example(rng, TEST_SQL_DOMAINS), N_TEST, key="prompt")
    return {"train": train_valid[:N_TRAIN], "validation": train_valid[N_TRAIN:], "test": test}


# ---------------------------------------------------------------- common


def unique(draw, n: int, key: str) -> list[dict]:
    """`n` draws with distinct `key` values."""
    out, seen = [], set()
    while len(out) < n:
        e = draw()
        if e[key] in seen:
            continue
        seen.add(e[key])
        out.append(e)
    return out


TASKS = {"d2t": (make_d2t, 20261206), "math": (make_math, 20261207), "sql": (make_sql, 20261208)}


def main() -> None:
    out = Path(__file__).resolve().parent / "data"
    for task, (make, seed) in TASKS.items():
        splits = make(random.Random(seed))
        (out / task).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(out / task / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(f"{task}/{split}.jsonl: {len(rows)} examples")


if __name__ == "__main__":
    main()
