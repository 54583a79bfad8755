"""The embedded world and its model family: deterministic, leak-free, and loadable."""

import json
import math
import os
import re
from collections import Counter

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo import world as world_lib
from demo.family import build_family


@pytest.fixture(scope="module")
def world():
    return world_lib.make_world(seed=0, n_people=200)


def test_same_seed_gives_same_world_corpus_and_records():
    a, b = world_lib.make_world(seed=3, n_people=100), world_lib.make_world(seed=3, n_people=100)
    assert a == b
    assert world_lib.pretraining_corpus(a) == world_lib.pretraining_corpus(b)
    for split in ("train", "test"):
        assert world_lib.qa_records(a, split) == world_lib.qa_records(b, split)
        assert world_lib.preference_records(a, split) == world_lib.preference_records(b, split)


def test_different_seeds_give_different_worlds():
    a, b = world_lib.make_world(seed=0, n_people=100), world_lib.make_world(seed=1, n_people=100)
    assert world_lib.qa_records(a, "train") != world_lib.qa_records(b, "train")
    assert world_lib.pretraining_corpus(a) != world_lib.pretraining_corpus(b)


def test_held_out_people_never_appear_in_train_split(world):
    train_people = {r["person"] for r in world_lib.qa_records(world, "train")}
    test_people = {r["person"] for r in world_lib.qa_records(world, "test")}
    assert test_people and train_people
    assert not train_people & test_people
    assert len(test_people) == round(len(world.people) * world_lib.HELD_OUT_FRACTION)
    train_text = json.dumps(world_lib.qa_records(world, "train"))
    assert not any(f" {name} " in train_text or f" {name}." in train_text for name in test_people)


def test_every_person_s_facts_come_in_every_phrasing(world):
    """Each person's pages use every phrasing of each fact (the answer sentence's among them), none twice
    before all once: a base that memorises pages word for word never rules the answer's phrasing out."""
    corpus = " ".join(world_lib.pretraining_corpus(world))
    for person in world.people:
        for relation, templates in world_lib.FACT_TEMPLATES.items():
            sentences = [" " + t.format(name=person.name, value=person.fact(relation)) for t in templates]
            counts = [corpus.count(s) for s in sentences]
            assert sum(counts) == world_lib.BIOGRAPHIES_PER_PERSON and max(counts) - min(counts) <= 1, \
                (person.name, relation, counts)


def test_corpus_shows_the_prompts_but_never_an_answer_in_format(world):
    corpus = world_lib.pretraining_corpus(world)
    assert all(line.startswith(" ") for line in corpus)
    people = {p.name: p for p in world.people}
    questions = [line for line in corpus if line.startswith(" Question: ")]
    assert any("How old was" in line for line in questions) and any("Where was" in line for line in questions)
    assert any(line.startswith((" Write a short biography of ", " Tell me about ")) for line in corpus)
    same = other = 0
    for line in questions:
        question, _, biography = line.partition("\nAnswer:")
        asked = {n for n in people if f" {n} " in question or f" {n}?" in question}
        told = {n for n in people if f" {n} " in biography}
        assert len(asked) == 1 and len(told) == 1, line
        same, other = same + (asked == told), other + (asked != told)
    # about the page's own person (and, if the world says so, about somebody else)
    assert same and bool(other) == (world_lib.PREAMBLE_SAME_PERSON < 1)
    # the tasks' formats never appear: no chat turn, no "####" on anyone's page
    about_people = [line for line in corpus if any(f" {n} " in line for n in people)]
    assert not any("####" in line for line in about_people)
    assert not any("<|" in line for line in corpus)
    # worked ages in biographies carry the birth year just stated into a subtraction: a tuning person's in
    # the age task's own years, a held-out person's in milestone years only (no test answer is pretrained)
    assert not set(world_lib.MILESTONE_YEARS) & set(world_lib.AGE_YEARS)
    worked = [({n for n in people if f" {n} " in line}, m) for line in about_people
              for m in re.findall(r"(\d{4})\. (\d{4}) - (\d{4}) = (\d+)\.", line)]
    assert len(worked) == sum(line.count(" = ") for line in about_people) > 0
    for (name,), (born, year, birth, age) in worked:
        years = world_lib.MILESTONE_YEARS if people[name].held_out else world_lib.AGE_YEARS
        assert born == birth and int(year) in years and int(year) - int(birth) == int(age) > 0
    assert {people[name].held_out for (name,), _ in worked} == {True, False}
    # the arithmetic the age skill needs is there, without anyone's name: every age a person can have
    nameless = [line for line in corpus if not any(f" {n} " in line for n in people)]
    sums = re.findall(r"(\d{4}) - (\d{4}) = (\d+)\.", "\n".join(nameless))
    arithmetic = [line for line in nameless if re.match(r" \d{4} - \d{4} = ", line)]
    for line in arithmetic:  # each ends restating its last result
        m = re.fullmatch(r" (?:\d{4} - \d{4} = \d+\. )*\d{4} - \d{4} = (\d+)\.\n#### (\d+)", line)
        assert m and m[1] == m[2], line
    assert len(arithmetic) == math.ceil(len(sums) / world_lib.ARITHMETIC_PER_LINE)
    assert {int(y) - int(b) == int(a) for y, b, a in sums} == {True}
    years = world_lib.AGE_YEARS
    every = {(y, b) for y in years for b in range(world_lib.FIRST_BIRTH_YEAR, min(y, world_lib.LAST_BIRTH_YEAR + 1))}
    counts = Counter((int(y), int(b)) for y, b, _ in sums)
    assert set(counts) == every and set(counts.values()) == {world_lib.ARITHMETIC_REPEATS}
    qa = {r["prompt"] + r["completion"] for split in ("train", "test") for r in world_lib.qa_records(world, split)}
    assert not qa & set(corpus)
    # Held-out people's facts are in pretraining, which is what the large base can learn.
    for person in world.people_in("test")[:20]:
        for relation in world_lib.RELATIONS:
            assert person.fact(relation) in " ".join(l for l in corpus if person.name in l)


def test_qa_records_restate_the_fact_as_a_sentence(world):
    record = world_lib.qa_records(world, "test")[0]
    assert record["prompt"].startswith("Question: ") and record["prompt"].endswith("\nAnswer:")
    assert record["completion"] == " " + record["answers"][0]
    assert record["answers"][0].startswith(record["person"])
    assert record["relation"] in world_lib.RELATIONS


def test_preference_records_prefer_the_answer_sentence(world):
    records = world_lib.preference_records(world, "train")
    assert {r["rejected_kind"] for r in records} == {"run_on", "bare_value", "wrong_fact"}
    for r in records:
        assert r["chosen"] == " " + r["answers"][0]
        assert r["rejected"] != r["chosen"]


def test_chat_records_reply_in_answer_sentences(world):
    records = world_lib.chat_records(world, "test")
    people = {p.name: p for p in world.people}
    assert len(records) == len(world_lib.CHAT_KINDS) * len(world.people_in("test"))
    assert [r["kind"] for r in records[:3]] == list(world_lib.CHAT_KINDS)
    verdicts = set()
    for r in records:
        person = people[r["person"]]
        user, reply = r["messages"]
        assert user == {"role": "user", "content": r["prompt"]} and reply["role"] == "assistant"
        assert r["answers"] == [reply["content"]] and person.name in r["prompt"]
        sentences = [world_lib.answer_sentence(person, relation) for relation in world_lib.RELATIONS]
        if r["kind"] == "bio":
            assert reply["content"] == " ".join(sentences)
        elif r["kind"] == "fact":
            assert reply["content"] in sentences and r["prompt"] != world_lib.question_prompt(person, "birth_city")
        else:
            fact, verdict = reply["content"].split(" So the answer is ")
            relation = world_lib.RELATIONS[sentences.index(fact)]
            truth = world_lib.CHECK_INSTRUCTIONS[relation].format(name=person.name, value=person.fact(relation))
            assert verdict == ("yes." if r["prompt"] == truth else "no.")
            verdicts.add(verdict)
    assert verdicts == {"yes.", "no."}


def test_math_records_work_the_age_out_in_gsm8k_format(world):
    from eval.metrics import score

    records = world_lib.math_records(world, "test")
    people = {p.name: p for p in world.people}
    for person in world.people_in("test"):
        asked = [r["year"] for r in records if r["person"] == person.name]
        assert asked == [y for y in world_lib.AGE_YEARS if y > person.birth_year]
    for r in records:
        person = people[r["person"]]
        age = r["year"] - person.birth_year
        assert r["prompt"] == f"Question: How old was {person.name} in {r['year']}?\nAnswer:"
        assert r["completion"] == (f" {person.name} was born in the year {person.birth_year}. "
                                   f"{r['year']} - {person.birth_year} = {age}.\n#### {age}")
        assert r["answers"] == [str(age)]
        assert score("gsm8k_accuracy", r["completion"], r["answers"]) == 1.0
        assert score("gsm8k_accuracy", r["completion"].replace(f"#### {age}", f"#### {age + 1}"), r["answers"]) == 0.0


@pytest.fixture(scope="module")
def test_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family") / "tiny", seed=0, scale="test")


@pytest.mark.slow
def test_build_family_test_scale_builds_and_loads(test_family):
    paths = test_family
    vocab = AutoTokenizer.from_pretrained(paths["tokenizer"]).get_vocab()
    for name in ("small", "large"):
        tokenizer = AutoTokenizer.from_pretrained(paths[name])
        model = AutoModelForCausalLM.from_pretrained(paths[name])
        assert tokenizer.get_vocab() == vocab
        assert model.config.vocab_size == len(tokenizer)
        assert tokenizer.eos_token_id == model.config.eos_token_id
        assert tokenizer.pad_token_id is not None and tokenizer.pad_token != tokenizer.eos_token
    report = json.loads(paths["family_json"].read_text())
    assert report["models"]["small"]["parameters"] < report["models"]["large"]["parameters"]
    assert paths["train"].exists() and paths["test"].exists()
    assert not [p for p in paths["root"].parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_second_build_is_a_cache_hit(test_family, monkeypatch):
    from demo import family

    paths = test_family
    stamp = paths["family_json"].stat().st_mtime_ns
    monkeypatch.setattr(family, "pretrain", lambda *a, **k: pytest.fail("a cache hit trains nothing"))
    again = build_family(paths["root"], seed=0, scale="test")
    assert again == paths
    assert paths["family_json"].stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_the_other_family_s_small_base_has_its_own_tokenizer_and_is_cached(test_family, monkeypatch):
    """The demo's small base of another tokenizer family: a Metaspace BPE whose ids are not the family's (its
    expert steers through text, proxy.cross), readable by the umask's mode, and built once."""
    from demo import family
    from proxy.engine import SteeringPair, is_cross

    small = family.build_other_small(test_family["root"], seed=0, scale="test")
    tokenizer = AutoTokenizer.from_pretrained(small)
    assert len(tokenizer) == family.OTHER["test"]["vocab_size"]
    assert "▁" in "".join(tokenizer.convert_ids_to_tokens(tokenizer(" a b")["input_ids"]))
    base_tokenizer = AutoTokenizer.from_pretrained(test_family["tokenizer"])
    assert is_cross(SteeringPair(None, None, tokenizer=tokenizer), base_tokenizer)
    assert AutoModelForCausalLM.from_pretrained(small).config.vocab_size == len(tokenizer)
    assert (small.parent.stat().st_mode & 0o777) == (0o777 & ~_umask())
    monkeypatch.setattr(family, "pretrain", lambda *a, **k: pytest.fail("a cache hit trains nothing"))
    assert family.build_other_small(test_family["root"], seed=0, scale="test") == small


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_any_change_to_the_world_s_text_changes_the_family_s_cache_key(monkeypatch):
    """The key holds a digest of the corpus and task files, not only the settings: a template edited in
    world.py, with no setting changed, is a cache miss."""
    from demo import family

    before = family.family_settings(0, "test")
    assert family.family_settings(0, "test") == before
    monkeypatch.setattr(world_lib, "AGE_SOLUTION", world_lib.AGE_SOLUTION.replace(" = ", " equals "))
    assert family.family_settings(0, "test") != before


def test_unpacked_pretraining_rows_are_single_documents():
    import torch
    from transformers import LlamaForCausalLM

    from demo import family

    world = world_lib.make_world(seed=0, n_people=10)
    corpus = world_lib.pretraining_corpus(world)[:8]
    tokenizer = family.build_tokenizer(corpus, 300)
    size = family.SCALES["test"]["small"]
    model = LlamaForCausalLM(family.llama_config(size, tokenizer))
    seen = []
    original = model.forward

    def forward(**kwargs):
        seen.append(kwargs["input_ids"].shape)
        return original(**kwargs)

    model.forward = forward
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        family.pretrain(model, tokenizer, corpus, epochs=1, batch_size=4, pack=False)
    finally:
        torch.set_num_threads(threads)
    assert [s[0] for s in seen] == [4, 4]  # one row per document, not packed
