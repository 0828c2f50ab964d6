"""A synthetic biography corpus for LMLM (datamodules/lmlm.py): made-up people, three facts each.

Every person (first + last name, unique) has a birthplace, an occupation and an employer, drawn
with a seeded generator. Each biography states the three facts as LMLM lookup calls in one of a few
sentence templates; `render` of it is the plain text a baseline model trains on. Generated here,
so it works offline and the facts are known exactly (the fact-accuracy benchmark needs that).
"""

from __future__ import annotations

import random

from datamodules.lmlm import Fact, call

FIRST = ("Ada Alan Bea Cora Dion Ezra Fay Gus Hana Ivo Jude Kai Lena Milo Nia Otto Pia Quin Rosa Saul Tess Umar "
         "Vera Wes Xena Yuri Zoe Abel Bram Cleo").split()
LAST = ("Byron Hale Moss Reed Stone Vance Wolfe Young Zane Ames Brook Cole Dunn Ellis Frost Grant Hayes Irwin Jory "
        "Kerr Lund Marsh Nash Orr Pike").split()
CITIES = ("Leeds Oslo Porto Lyon Turin Bergen Cork Graz Malmo Split Ghent Basel Kiel Riga Bonn Nantes Krakow Aarhus "
          "Delft Padua").split()
JOBS = ("baker painter sailor farmer teacher doctor miner weaver potter tailor lawyer nurse pilot chemist carpenter "
        "gardener").split()
FIRMS = ("Acme Globex Initech Umbrella Hooli Vandelay Stark Wonka Tyrell Cyberdyne Soylent Oscorp").split()

RELATIONS = {"birthplace": CITIES, "occupation": JOBS, "employer": FIRMS}

# the text before each fact's call; "{n}" is the person's name
LEADS = {
    "birthplace": ("{n} was born in", "{n} grew up in"),
    "occupation": ("{n} works as a", "By trade {n} is a"),
    "employer": ("{n} is employed by", "{n} has a job at"),
}


def people(n: int, seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """n distinct (name, {relation: value}) with seeded random facts."""
    rng = random.Random(seed)
    names = [f"{a} {b}" for a in FIRST for b in LAST]
    if n > len(names):
        raise ValueError(f"at most {len(names)} distinct people, asked for {n}")
    chosen = rng.sample(names, n)
    return [(name, {r: rng.choice(vals) for r, vals in RELATIONS.items()}) for name in chosen]


def biography(name: str, attrs: dict[str, str], rng: random.Random) -> str:
    """One annotated biography: a title line and the three facts in random order and wording."""
    rels = list(attrs)
    rng.shuffle(rels)
    sentences = [f"{rng.choice(LEADS[r]).format(n=name)}{call(name, r, attrs[r])}." for r in rels]
    return f"About {name}. " + " ".join(sentences)


def corpus(n_people: int, copies: int = 3, seed: int = 0) -> tuple[list[str], list[Fact]]:
    """(annotated documents, every fact): `copies` differently worded biographies per person, shuffled."""
    rng = random.Random(seed + 1)
    ppl = people(n_people, seed)
    docs = [biography(name, attrs, rng) for _ in range(copies) for name, attrs in ppl]
    rng.shuffle(docs)
    facts = [Fact(name, r, v) for name, attrs in ppl for r, v in attrs.items()]
    return docs, facts


def question(name: str, relation: str) -> str:
    """The prompt a fact is asked with: the title and the first template's lead."""
    return f"About {name}. " + LEADS[relation][0].format(n=name)
