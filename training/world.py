"""A small synthetic world of fictional people, and the task built on it.

Every person has three facts (birth city, profession, birth year). The pretraining corpus
states them in short biographies; the task asks about them in a question-answer format
that no pretraining line uses. A large model pretrained long enough memorises the facts
of every person, including the 20% held out from tuning; a small model does not. Only
tuning teaches the format, so proxy-tuning a large base with a small tuned pair has a
real gap to close (see /work/shared/research/tiny-world.md for the probes behind this).

Everything here is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# SFT settings measured in scripts/probe_world.py (full fine-tuning, completion-only loss on
# prompt/completion records, EOS appended by TRL, cosine schedule, 5% warmup, batch 32).
# The small expert needs many epochs to learn the format and to stop (1e-3 steered better
# than 2e-3: proxy EM 58% vs 50% at alpha 1, seed 0). The large base reached 95% EM on
# held-out people at 3e-4 for 4 epochs; a low rate keeps the facts it memorised intact.
SFT_BATCH_SIZE = 32
SFT_WARMUP_RATIO = 0.05
SFT_SMALL_LEARNING_RATE = 1e-3
SFT_SMALL_EPOCHS = 8
SFT_LARGE_LEARNING_RATE = 3e-4
SFT_LARGE_EPOCHS = 4
SFT_SETTINGS = {
    "small": {"learning_rate": SFT_SMALL_LEARNING_RATE, "num_train_epochs": SFT_SMALL_EPOCHS},
    "large": {"learning_rate": SFT_LARGE_LEARNING_RATE, "num_train_epochs": SFT_LARGE_EPOCHS},
    "per_device_train_batch_size": SFT_BATCH_SIZE,
    "warmup_ratio": SFT_WARMUP_RATIO,
    "lr_scheduler_type": "cosine",
    "full_fine_tuning": True,
}

HELD_OUT_FRACTION = 0.2
BIOGRAPHIES_PER_PERSON = 4
WORD_SALAD_FRACTION = 0.1
# A share of biographies open with a few salad words: a large base trained one document
# per row otherwise learns "a document that opens with Question/Answer words is salad" and,
# after a question prompt, no longer retrieves the facts it recalls perfectly in a plain
# biography (seed 0: cloze 100%, yet the base's city after "Answer: X was born in" was wrong).
# Off by default: with 0.25 and an unpacked 18-epoch large base (seed 0) the proxy closed 53%
# of the gap vs 61% for the packed default (large base 95% cloze; errors: salad words inserted).
# A quarter of the biographies follow a question about somebody else: the large base learns to read a
# biography after the task's prompt shape without ever seeing a question answered. Measured (seed 0,
# 600 held-out questions, proxy at alpha 1): 61% of the gap closed without preambles, 74% with these;
# loose salad words as preamble leaked into answers (53%), and unpacked pretraining collapsed (2-14%).
BIO_PREAMBLE_FRACTION = 0.25
BIO_PREAMBLE_KIND = "question"  # "salad": loose question words; "question": a question about someone else

RELATIONS = ("birth_city", "profession", "birth_year")

CITIES = (
    "Highmoor", "Yarrowdale", "Ashbury", "Brackenford", "Coldwater", "Dunmere", "Eastwick",
    "Fernhollow", "Glenrock", "Harrowgate", "Ironvale", "Kestrel Bay", "Larkspur", "Millbrook",
    "Northfen", "Oakhaven", "Pinecrest", "Queensmouth", "Ravenholm", "Saltmarsh", "Thornbury",
    "Underhill", "Valeport", "Westerly", "Wolfden", "Brightwater", "Stonebridge", "Redcliff",
    "Silverlake", "Mossgrove",
)
PROFESSIONS = (
    "baker", "carpenter", "doctor", "farmer", "fisherman", "gardener", "lawyer", "painter",
    "pilot", "poet", "sailor", "tailor", "teacher", "weaver", "blacksmith", "chemist",
    "dentist", "librarian", "musician", "potter",
)
FIRST_BIRTH_YEAR, LAST_BIRTH_YEAR = 1850, 1999

# Several paraphrases per fact: a fact seen in one phrasing only is memorised but not
# retrievable from a question. The first template of each relation is the answer sentence.
FACT_TEMPLATES = {
    "birth_city": (
        "{name} was born in {value}.",
        "{name} is a native of {value}.",
        "{name} came into the world in {value}.",
        "The birthplace of {name} is {value}.",
    ),
    "profession": (
        "{name} worked as a {value}.",
        "{name} earned a living as a {value}.",
        "By trade, {name} was a {value}.",
        "The profession of {name} was {value}.",
    ),
    "birth_year": (
        "{name} was born in the year {value}.",
        "{name} was born during {value}.",
        "The birth year of {name} is {value}.",
        "{name} arrived in {value}.",
    ),
}
QUESTION_TEMPLATES = {
    "birth_city": "Where was {name} born?",
    "profession": "What was the profession of {name}?",
    "birth_year": "In what year was {name} born?",
}
PROMPT_FORMAT = "Question: {question}\nAnswer:"

# Fact-free lines made of the prompt's own words, so that no model meets "Question", "Answer"
# or "?" for the first time in a question: otherwise the untuned anti-expert's logits on a
# question are erratic and dominate the proxy offset.
SALAD_WORDS = (
    "Question:", "Answer:", "Question", "Answer", "Where", "What", "In", "what", "where", "was",
    "the", "profession", "of", "year", "born", "in", "did", "is", "?", "?\n", "\n",
)

_SYLLABLES = (
    "za", "ra", "lo", "mi", "ke", "tor", "vel", "an", "dri", "su", "ba", "nor", "gi", "fen",
    "ul", "qua", "ses", "ta", "por", "li", "ven", "ka", "mor", "e", "thi", "zel", "as", "dun",
    "ro", "wi", "ny", "hal", "bre", "os", "cal", "pe", "um", "jo", "ri", "sa",
)


@dataclass(frozen=True)
class Person:
    name: str
    birth_city: str
    profession: str
    birth_year: int
    held_out: bool

    def fact(self, relation: str) -> str:
        return str(getattr(self, relation))


@dataclass(frozen=True)
class World:
    seed: int
    people: tuple[Person, ...]

    def people_in(self, split: str) -> list[Person]:
        if split == "train":
            return [p for p in self.people if not p.held_out]
        if split == "test":
            return [p for p in self.people if p.held_out]
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")


def make_world(seed: int = 0, n_people: int = 1000) -> World:
    rng = random.Random(seed)
    names = _unique_names(rng, n_people)
    held_out = set(rng.sample(range(n_people), round(n_people * HELD_OUT_FRACTION)))
    people = tuple(
        Person(
            name=name,
            birth_city=rng.choice(CITIES),
            profession=rng.choice(PROFESSIONS),
            birth_year=rng.randint(FIRST_BIRTH_YEAR, LAST_BIRTH_YEAR),
            held_out=i in held_out,
        )
        for i, name in enumerate(names)
    )
    return World(seed=seed, people=people)


def _unique_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if len(name) >= 4 and name not in seen:
            seen.add(name)
            names.append(name)
    return names


def fact_sentence(person: Person, relation: str, template_index: int = 0) -> str:
    template = FACT_TEMPLATES[relation][template_index]
    return template.format(name=person.name, value=person.fact(relation))


def answer_sentence(person: Person, relation: str) -> str:
    """The answer restates the fact, so the content token is predicted in a context that
    pretraining made familiar to both small models."""
    return fact_sentence(person, relation, 0)


def question_prompt(person: Person, relation: str) -> str:
    question = QUESTION_TEMPLATES[relation].format(name=person.name)
    return PROMPT_FORMAT.format(question=question)


def corpus_settings() -> dict:
    """What shapes the pretraining text beyond the seed: part of the family's cache key."""
    return {"biographies_per_person": BIOGRAPHIES_PER_PERSON, "word_salad_fraction": WORD_SALAD_FRACTION,
            "bio_preamble_fraction": BIO_PREAMBLE_FRACTION, "bio_preamble_kind": BIO_PREAMBLE_KIND}


def pretraining_corpus(world: World) -> list[str]:
    """Biographies (shuffled fact order, random paraphrases) plus ~10% word salad.

    Every line starts with a space: the BPE splits a name differently with and without
    one, and in an answer the name always follows a space.
    """
    rng = random.Random(f"corpus-{world.seed}")
    lines = []
    for person in world.people:
        for _ in range(BIOGRAPHIES_PER_PERSON):
            relations = list(RELATIONS)
            rng.shuffle(relations)
            sentences = [
                fact_sentence(person, r, rng.randrange(len(FACT_TEMPLATES[r]))) for r in relations
            ]
            line = " " + " ".join(sentences)
            if BIO_PREAMBLE_FRACTION and rng.random() < BIO_PREAMBLE_FRACTION:
                line = _preamble(rng, world, person) + line
            lines.append(line)
    n_salad = round(len(lines) * WORD_SALAD_FRACTION / (1 - WORD_SALAD_FRACTION))
    lines.extend(_word_salad_line(rng) for _ in range(n_salad))
    rng.shuffle(lines)
    return lines


def _preamble(rng: random.Random, world: World, person: Person) -> str:
    """Text before a biography that says nothing about it, so that the base learns to read a
    biography after an unrelated prefix. A "question" preamble asks about somebody else: the base
    never sees a question answered, yet meets the task's prompt shape before a biography."""
    if BIO_PREAMBLE_KIND == "question":
        other = rng.choice([p for p in world.people if p.name != person.name])
        return " " + question_prompt(other, rng.choice(RELATIONS)).strip()
    return _word_salad_line(rng, 3, 8) + rng.choice((" ", "\n"))


def _word_salad_line(rng: random.Random, fewest: int = 6, most: int = 14) -> str:
    words: list[str] = []
    for _ in range(rng.randint(fewest, most)):
        word = rng.choice(SALAD_WORDS)
        # No line may open with "Question:": the corpus never shows a question as such.
        while word == "Question:" and (not words or words[-1].endswith("\n")):
            word = rng.choice(SALAD_WORDS)
        words.append(word)
    text = " " + " ".join(words)
    return text.replace("\n ", "\n")


def qa_records(world: World, split: str) -> list[dict]:
    records = []
    for person in world.people_in(split):
        for relation in RELATIONS:
            answer = answer_sentence(person, relation)
            records.append({
                "prompt": question_prompt(person, relation),
                "completion": " " + answer,
                "answers": [answer],
                "person": person.name,
                "relation": relation,
            })
    return records


def preference_records(world: World, split: str) -> list[dict]:
    """DPO pairs: chosen is the answer sentence; rejected is one of the failures a
    format-less model makes (it runs on past the answer, answers with a bare value, or
    states a wrong fact in the right format), cycling so that each kind is a third."""
    rng = random.Random(f"preference-{world.seed}-{split}")
    records = []
    for i, record in enumerate(qa_records(world, split)):
        person = next(p for p in world.people if p.name == record["person"])
        relation = record["relation"]
        kind = ("run_on", "bare_value", "wrong_fact")[i % 3]
        rejected = _rejected_answer(rng, person, relation, kind)
        records.append({
            "prompt": record["prompt"],
            "chosen": record["completion"],
            "rejected": rejected,
            "rejected_kind": kind,
            "answers": record["answers"],
            "person": record["person"],
            "relation": relation,
        })
    return records


def _rejected_answer(rng: random.Random, person: Person, relation: str, kind: str) -> str:
    answer = answer_sentence(person, relation)
    if kind == "run_on":
        other = rng.choice([r for r in RELATIONS if r != relation])
        return " " + answer + " " + fact_sentence(person, other, rng.randrange(4))
    if kind == "bare_value":
        return " " + person.fact(relation)
    wrong_value = _wrong_value(rng, person, relation)
    return " " + FACT_TEMPLATES[relation][0].format(name=person.name, value=wrong_value)


def _wrong_value(rng: random.Random, person: Person, relation: str) -> str:
    if relation == "birth_city":
        return rng.choice([c for c in CITIES if c != person.birth_city])
    if relation == "profession":
        return rng.choice([p for p in PROFESSIONS if p != person.profession])
    year = person.birth_year
    while year == person.birth_year:
        year = rng.randint(FIRST_BIRTH_YEAR, LAST_BIRTH_YEAR)
    return str(year)


def write_task_files(world: World, folder: str | Path) -> dict[str, Path]:
    """Writes train.jsonl/test.jsonl (QA) and train_preference.jsonl/test_preference.jsonl (DPO)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "test"):
        paths[split] = _write_jsonl(folder / f"{split}.jsonl", qa_records(world, split))
        paths[f"{split}_preference"] = _write_jsonl(
            folder / f"{split}_preference.jsonl", preference_records(world, split)
        )
    return paths


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path
