#!/usr/bin/env python3
"""Make the small task the ready runs of `examples/runs/` train on: pull a person's name, age and
city out of one English sentence as a one-line JSON object.

    python3 examples/runs/data/make_data.py

Writes `train.jsonl` (200 examples) and `eval.jsonl` (24) beside this script, one JSON object a
line: {"prompt", "completion"}. Deterministic (a fixed seed, the standard library only), so the
committed files are what this script writes. The eval set's names and cities never occur in the
training set, so exact match on it measures the learned format and copying, not memorisation.
SmolLM2-135M-Instruct answers these prompts with prose or a fenced code block before training
(exact match 0); the format is learned within a few dozen LoRA steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = [
    "Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kira", "Luca", "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tara",
    "Umar", "Vera", "Wim", "Xenia", "Yusuf", "Zoe", "Amir", "Bianca", "Cyril", "Dalia",
    "Oscar", "Priya", "Rafael", "Sakura", "Tomas", "Ulla", "Viktor", "Wanda", "Yara", "Zane",
    "Anton", "Beatriz", "Carlos", "Daria", "Erik", "Freya", "Goran", "Hana", "Igor", "Jana",
    # held out for eval
    "Emil", "Fatima", "Gustav", "Helga", "Ivan", "Julia", "Kenji", "Leila", "Mateo", "Nadia",
]
CITIES = [
    "Paris", "Lisbon", "Oslo", "Cairo", "Lima", "Seoul", "Dublin", "Vienna", "Quito", "Accra",
    "Hanoi", "Zurich", "Perth", "Bogota", "Riga", "Tunis", "Kyoto", "Porto", "Malmo", "Denver",
    "Berlin", "Athens", "Dakar", "Manila", "Havana", "Krakow", "Leeds", "Geneva", "Boston", "Delhi",
    "Lagos", "Milan", "Osaka", "Sofia", "Tallinn", "Utrecht", "Valencia", "Warsaw", "Chicago", "Nice",
    # held out for eval
    "Madrid", "Nairobi", "Prague", "Toronto", "Austin", "Bergen", "Hamburg", "Lyon", "Seville", "Turin",
]
TRAIN_NAMES, EVAL_NAMES = NAMES[:50], NAMES[50:]
TRAIN_CITIES, EVAL_CITIES = CITIES[:40], CITIES[40:]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, {age}, from {city}.",
    "{name} ({age}) is based in {city}.",
    "Living in {city}, {name} just turned {age}.",
    "{city} is home to {name}, who is {age}.",
    "At {age}, {name} moved to {city}.",
]
INSTRUCTION = "Extract the name, age and city as JSON: "


def example(rng: random.Random, names: list[str], cities: list[str]) -> dict[str, str]:
    name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 80)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"prompt": INSTRUCTION + sentence, "completion": answer}


def main() -> None:
    rng = random.Random(20261206)
    here = Path(__file__).resolve().parent
    for file, count, names, cities in [
        ("train.jsonl", 200, TRAIN_NAMES, TRAIN_CITIES),
        ("eval.jsonl", 24, EVAL_NAMES, EVAL_CITIES),
    ]:
        lines = [json.dumps(example(rng, names, cities)) for _ in range(count)]
        (here / file).write_text("\n".join(lines) + "\n")
        print(f"{file}: {count} examples")


if __name__ == "__main__":
    main()
