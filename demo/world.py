"""A small synthetic world of fictional people, and the task built on it.

Every person has three facts (birth city, profession, birth year). The pretraining corpus
states them in short biographies; the task asks about them in a question-answer format
that no pretraining line uses. A large model pretrained long enough memorises the facts
of every person, including the 20% held out from tuning; a small model does not. Only
tuning teaches the format, so proxy-tuning a large base with a small tuned pair has a
real gap to close. What each setting below measured, and what was tried and not kept:
docs/tiny-world.md.

Everything here is a pure function of the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_FRACTION = 0.2
BIOGRAPHIES_PER_PERSON = 4
WORD_SALAD_FRACTION = 0.1
# A quarter of the biographies follow one of the tasks' prompts (a question, an instruction or an age
# question), so that the large base learns to read a page after the prompts' shapes and to find the asked
# person's facts in it. Every such prompt is about the page's own person: the base memorises a prompt
# with the page after it, and where that page was somebody else's it answered with that other name.
BIO_PREAMBLE_FRACTION = 0.25
PREAMBLE_SAME_PERSON = 1.0  # the share of those prompts about the page's own person
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

# Several paraphrases per fact: a fact seen in one phrasing only is memorised but not retrievable from a
# question. The first template of each relation is the answer sentence: one whose words before the fact
# belong to that relation alone ("X was born in" also opens the birth year's sentences, and after it
# the base mixed up the city and the year).
FACT_TEMPLATES = {
    "birth_city": (
        "{name} is a native of {value}.",
        "{name} was born in {value}.",
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

# The chat task (instruction tuning): the user turn is an instruction, the reply restates facts in the
# answer sentences. Three kinds, as a chat mix has them: a fact asked in other words than the QA task's,
# a short biography (all three facts), and a yes/no check answered after stating the fact.
FACT_INSTRUCTIONS = {
    "birth_city": ("Tell me where {name} was born.", "Which city was {name} born in?"),
    "profession": ("Tell me what {name} did for a living.", "What was the job of {name}?"),
    "birth_year": ("Tell me the year {name} was born.", "When was {name} born?"),
}
BIO_INSTRUCTIONS = ("Write a short biography of {name}.", "Tell me about {name}.")
CHECK_INSTRUCTIONS = {
    "birth_city": "Was {name} born in {value}?",
    "profession": "Did {name} work as a {value}?",
    "birth_year": "Was {name} born in the year {value}?",
}
CHECK_REPLY = "{fact} So the answer is {verdict}."
CHAT_KINDS = ("fact", "bio", "check")

# The math task (a skill): the answer needs a computation over a fact, a person's age in a given year,
# with a worked line before "#### <number>" (GSM8K's format). Asked only for years after the birth.
AGE_QUESTION = "How old was {name} in {year}?"
AGE_YEARS = (1900, 1950, 2000)
AGE_SOLUTION = "{fact} {year} - {birth_year} = {age}.\n#### {age}"
# The arithmetic the skill needs, as web text has it: every subtraction of a birth year from one of
# AGE_YEARS appears ARITHMETIC_REPEATS times in pretraining, ARITHMETIC_PER_LINE to a line, the last
# result restated after "####" ("1950 - 1923 = 27. 2000 - 1871 = 129. 1900 - 1850 = 50.\n#### 50"). The
# base knows the table and the facts; tuning has to teach it to chain them. Several to a line, so that a
# subtraction does not only ever open a line; "####" after each, so that the base meets it outside salad.
ARITHMETIC_LINE = "{year} - {birth_year} = {age}."
ARITHMETIC_REPEATS = 4
ARITHMETIC_PER_LINE = 3
# Worked ages in biographies: after a birth-year sentence, AGE_LINE_FRACTION of the time, the person's age
# in a given year worked as a subtraction (" 1925 - 1875 = 50."), so that the base learns to carry a year
# just stated into a subtraction. A tuning person's pages work ages in the task's own years (AGE_YEARS),
# as the web holds worked examples like a task's training set; a held-out person's pages only in
# MILESTONE_YEARS, so that no age the test asks is in pretraining and the base has to work it out from
# the birth year it remembers and the subtraction table.
MILESTONE_YEARS = (1875, 1925, 1975, 2025)
AGE_LINE_FRACTION = 0.5

# Fact-free lines made of the tasks' prompt words (and the numbers and signs of a worked line), so that
# no model meets "Question", "Tell", "=" or "?" for the first time in a prompt: otherwise the untuned
# anti-expert's logits on a prompt are erratic and dominate the proxy offset. NUMBER stands for a
# random number from 1 to 150 (the ages). The verdict of a check ("So the answer is yes.") is a phrase
# of everyday text: without it, the proxy's check replies were seen breaking off after "So the".
NUMBER = "<number>"
SALAD_WORDS = (
    "Question:", "Answer:", "Question", "Answer", "Where", "What", "In", "what", "where", "was",
    "the", "profession", "of", "year", "born", "in", "did", "is", "?", "?\n", "\n",
    "Tell", "me", "Which", "city", "job", "for", "a", "living", "When", "Write", "short", "biography",
    "about", "Was", "Did", "work", "as", ".", "So", "answer", "yes", "no",
    "How", "old", "-", "=", "####", "1900", "1950", "2000", NUMBER,
    "So the answer is yes.", "So the answer is no.",
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


def age_prompt(person: Person, year: int) -> str:
    return PROMPT_FORMAT.format(question=AGE_QUESTION.format(name=person.name, year=year))


def instruction(rng: random.Random, person: Person, kind: str, relation: str | None = None,
                value: str | None = None) -> str:
    """A user turn of the chat task: a fact (of `relation`), a biography, or a check of `value`."""
    if kind == "fact":
        return rng.choice(FACT_INSTRUCTIONS[relation]).format(name=person.name)
    if kind == "bio":
        return rng.choice(BIO_INSTRUCTIONS).format(name=person.name)
    return CHECK_INSTRUCTIONS[relation].format(name=person.name, value=value)


def world_digest(world: World) -> str:
    """A digest of everything a family is built from, its pretraining corpus and its task files: the family's
    cache key holds it, so any change to the world's text rebuilds the family, whether a setting changed or not."""
    content = json.dumps([pretraining_corpus(world), task_records(world)], sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def pretraining_corpus(world: World) -> list[str]:
    """Biographies (shuffled fact order, each paraphrase once per person), a quarter after a task's
    prompt, the arithmetic lines, plus ~10% word salad.

    Every line starts with a space: the BPE splits a name differently with and without
    one, and in an answer the name always follows a space.
    """
    rng = random.Random(f"corpus-{world.seed}")
    lines = []
    for person in world.people:
        phrasings = {r: _phrasing_order(rng, r) for r in RELATIONS}
        for biography in range(BIOGRAPHIES_PER_PERSON):
            relations = list(RELATIONS)
            rng.shuffle(relations)
            templates = [FACT_TEMPLATES[r][phrasings[r][biography]] for r in relations]
            preamble = ""
            if BIO_PREAMBLE_FRACTION and rng.random() < BIO_PREAMBLE_FRACTION:
                about = person
                if rng.random() >= PREAMBLE_SAME_PERSON:
                    about = rng.choice([p for p in world.people if p.name != person.name])
                preamble = _preamble(rng, about)
            sentences = [t.format(name=person.name, value=person.fact(r)) for t, r in zip(templates, relations)]
            if AGE_LINE_FRACTION and rng.random() < AGE_LINE_FRACTION:
                at = relations.index("birth_year")
                sentences[at] += " " + _worked_age(rng, person)
            lines.append(preamble + " " + " ".join(sentences))
    lines.extend(arithmetic_lines(rng))
    n_salad = round(len(lines) * WORD_SALAD_FRACTION / (1 - WORD_SALAD_FRACTION))
    lines.extend(_word_salad_line(rng) for _ in range(n_salad))
    rng.shuffle(lines)
    return lines


def _phrasing_order(rng: random.Random, relation: str) -> list[int]:
    """The template of `relation` in each of a person's biographies: every phrasing once before any twice.
    Drawn at random, a third of the people never had a fact in the answer sentence's phrasing, and the
    large base, which memorises its pages word for word, ruled that phrasing out for them."""
    order: list[int] = []
    while len(order) < BIOGRAPHIES_PER_PERSON:
        cycle = list(range(len(FACT_TEMPLATES[relation])))
        rng.shuffle(cycle)
        order += cycle
    return order[:BIOGRAPHIES_PER_PERSON]


def arithmetic_lines(rng: random.Random) -> list[str]:
    """Each age a person of the world can have in one of AGE_YEARS, as a subtraction, ARITHMETIC_REPEATS
    times over, in random order, ARITHMETIC_PER_LINE to a line, the line's last result restated after
    "\n#### " (as worked answers on the web end)."""
    pairs = [(year, birth) for year in AGE_YEARS for birth in range(FIRST_BIRTH_YEAR, min(year, LAST_BIRTH_YEAR + 1))]
    pairs = pairs * ARITHMETIC_REPEATS
    rng.shuffle(pairs)
    lines = []
    for i in range(0, len(pairs), ARITHMETIC_PER_LINE):
        line = pairs[i:i + ARITHMETIC_PER_LINE]
        last_year, last_birth = line[-1]
        lines.append(" " + " ".join(_subtraction(y, b) for y, b in line) + f"\n#### {last_year - last_birth}")
    return lines


def _worked_age(rng: random.Random, person: Person) -> str:
    years = MILESTONE_YEARS if person.held_out else AGE_YEARS
    return _subtraction(rng.choice([y for y in years if y > person.birth_year]), person.birth_year)


def _subtraction(year: int, birth_year: int) -> str:
    return ARITHMETIC_LINE.format(year=year, birth_year=birth_year, age=year - birth_year)


def _preamble(rng: random.Random, about: Person) -> str:
    """One of the tasks' prompts about `about`, before a biography (its own or somebody else's), so that
    the base learns to read a biography after them and to find the asked person's facts: a QA question,
    a chat instruction (the raw user turn) or an age question. Never answered in the task's format."""
    shape = rng.choice(("question", "instruction", "age"))
    if shape == "question":
        return " " + question_prompt(about, rng.choice(RELATIONS))
    if shape == "age":
        return " " + age_prompt(about, rng.choice(AGE_YEARS))
    kind, relation = rng.choice(CHAT_KINDS), rng.choice(RELATIONS)
    return " " + instruction(rng, about, kind, relation, _some_value(rng, relation))


def _some_value(rng: random.Random, relation: str) -> str:
    if relation == "birth_city":
        return rng.choice(CITIES)
    if relation == "profession":
        return rng.choice(PROFESSIONS)
    return str(rng.randint(FIRST_BIRTH_YEAR, LAST_BIRTH_YEAR))


def _word_salad_line(rng: random.Random, fewest: int = 6, most: int = 14) -> str:
    words: list[str] = []
    for _ in range(rng.randint(fewest, most)):
        word = rng.choice(SALAD_WORDS)
        # No line may open with "Question:": the corpus never shows a question as such.
        while word == "Question:" and (not words or words[-1].endswith("\n")):
            word = rng.choice(SALAD_WORDS)
        words.append(str(rng.randint(1, 150)) if word == NUMBER else word)
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


def chat_records(world: World, split: str) -> list[dict]:
    """Conversations of the chat task, one of each kind per person: `messages` (a user turn and the
    assistant's reply) for tuning, `prompt` (the instruction alone) and `answers` for evaluation."""
    rng = random.Random(f"chat-{world.seed}-{split}")
    records = []
    for person in world.people_in(split):
        for kind in CHAT_KINDS:
            relation = rng.choice(RELATIONS)
            if kind == "fact":
                user, reply = instruction(rng, person, kind, relation), answer_sentence(person, relation)
            elif kind == "bio":
                user = instruction(rng, person, kind)
                reply = " ".join(answer_sentence(person, r) for r in RELATIONS)
            else:
                truth = rng.random() < 0.5
                value = person.fact(relation) if truth else _wrong_value(rng, person, relation)
                user = instruction(rng, person, kind, relation, value)
                reply = CHECK_REPLY.format(fact=answer_sentence(person, relation), verdict="yes" if truth else "no")
            records.append({
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                "prompt": user,
                "answers": [reply],
                "person": person.name,
                "kind": kind,
            })
    return records


def math_records(world: World, split: str) -> list[dict]:
    """Age questions, one per year of AGE_YEARS after the person's birth: the solution states the
    birth year, works the subtraction, and ends with "#### <age>"; `answers` holds the age."""
    records = []
    for person in world.people_in(split):
        for year in AGE_YEARS:
            if year <= person.birth_year:
                continue
            age = year - person.birth_year
            solution = AGE_SOLUTION.format(fact=answer_sentence(person, "birth_year"), year=year,
                                           birth_year=person.birth_year, age=age)
            records.append({
                "prompt": age_prompt(person, year),
                "completion": " " + solution,
                "answers": [str(age)],
                "person": person.name,
                "year": year,
            })
    return records


def task_records(world: World) -> dict[str, list[dict]]:
    """Every task file's records by file stem, per split: <split> (QA), <split>_preference (DPO pairs),
    chat_<split> (conversations) and math_<split> (age questions)."""
    records = {}
    for split in ("train", "test"):
        records[split] = qa_records(world, split)
        records[f"{split}_preference"] = preference_records(world, split)
        records[f"chat_{split}"] = chat_records(world, split)
        records[f"math_{split}"] = math_records(world, split)
    return records


def write_task_files(world: World, folder: str | Path) -> dict[str, Path]:
    """Writes task_records(world), one <stem>.jsonl each; returns stem -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {stem: _write_jsonl(folder / f"{stem}.jsonl", records) for stem, records in task_records(world).items()}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path
