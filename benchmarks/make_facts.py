"""Writes the project's fact set, benchmarks/facts/*.json, from the subject -> object tables of
benchmarks/facts/tables.txt and the prompt templates below (both written for this project; README.md there).

A subject is kept in the main set only where the embedded model knows it: on the record's prompt, the true object
has the highest probability among all the relation's objects (CounterFact's measure: the mean log-probability per
target token; not greedy decoding, whose rate is reported beside it). Its paraphrases use the relation's other
templates, kept whether or not the model gets them right bare (the count it gets is stored per record); its
neighbourhood prompts ask the record's prompt about other subjects with the same true object that the model knows,
so that an edit that leaks to them shows as NS < 1; target_new is another object of the relation, drawn at random.

Writes counterfacts.json (the main set: known facts of the nine MAIN relations, at most --per_relation each),
unseen.json (known facts of the UNSEEN relations, other templates), sequential.json (one record per subject of the
main relations: the main set first, then the other known ones, then the unknown ones, marked "known": false) and
quality.json (the model's bare scores and the counts, also printed).

    python -m benchmarks.make_facts   # about 3 minutes on one CPU thread
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import click
import torch

from npt_tools.counterfact import (Record, candidate_scores, evaluate_records, in_context, save_records,  # noqa: E402
                                   target_scores)
from npt_tools.models import EMBEDDED_MODEL, load_base_model  # noqa: E402

FACTS = Path(__file__).resolve().parent / "facts"


@dataclasses.dataclass(frozen=True)
class Relation:
    prompt: str  # the record's prompt, "{}" for the subject
    paraphrases: tuple[str, ...]  # the same question in other words


MAIN = {
    "city_country": Relation("The city of {} is in the country of", (
        "In which country is {}? It is in", "{} is a city in the country of", "{} is located in the country of")),
    "country_continent": Relation("{} is a country in", (
        "{} lies on the continent of", "{} is a country on the continent of", "The continent where {} is located is")),
    "company_country": Relation("{} was founded in the country of", (
        "{} is a company from", "The company {} is headquartered in", "{} is a company based in")),
    "product_maker": Relation("{} was developed by", ("{} is made by", "{} is a product of", "{} was created by")),
    "athlete_sport": Relation("The sport {} is known for is", (
        "{} is a professional", "{} is famous for playing", "{} is a famous")),
    "person_profession": Relation("By profession, {} was a", (
        "{} is best known as a", "{} was a well-known", "{} was a famous")),
    "person_language": Relation("The mother tongue of {} is", (
        "{} was a native speaker of", "The native language of {} is", "{} grew up speaking")),
    "landmark_city": Relation("{} is located in the city of", (
        "{} is in the city of", "{} is a famous landmark in", "{} can be found in the city of")),
    "animal_class": Relation("The {} is a kind of", (
        "The {} is an animal known as a", "The {} is a", "Biologically, the {} is a")),
}
UNSEEN = {  # relations and templates the main set never uses
    "city_state": Relation("The city of {} is located in the US state of", (
        "{}, a city in the US state of", "The state that {} belongs to is", "Which US state is {} in? The answer is")),
    "food_country": Relation("The cuisine that {} comes from is that of", (
        "{} originally comes from", "The dish {} originated in", "{} is a traditional dish from")),
    "musician_instrument": Relation("The instrument {} played was the", (
        "{} was famous for playing the", "{} is best remembered for playing the", "{} was a virtuoso of the")),
    "team_sport": Relation("{} is a professional team that plays", (
        "The sport played by {} is", "{} competes in the sport of", "Fans of {} love watching")),
}
NEIGHBOURS = 8  # neighbourhood prompts per record, at most


def read_tables(path: Path) -> dict[str, dict[str, str]]:
    """{relation: {subject: object}} from '## relation' sections of 'object: subject | subject' lines."""
    tables, relation, seen = {}, None, set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if line.startswith("## "):
            relation = line[3:].strip()
            tables[relation] = {}
        elif line and not line.startswith("#"):
            obj, _, subjects = line.partition(":")
            for s in (s.strip() for s in subjects.split("|")):
                if s in seen or relation is None:
                    raise ValueError(f"{path}:{n}: subject {s!r} repeated or outside a relation")
                seen.add(s)
                tables[relation][s] = obj.strip()
    return tables


def fill(template: str, subject: str) -> tuple[str, str]:
    """(prompt with '{}', subject): a subject written 'the X' gives the prompt its article ('The {} is ...')."""
    if subject.startswith("the "):
        template, subject = template.replace("{}", "the {}"), subject[4:]
        template = template[0].upper() + template[1:]
    return template, subject


def ask(template: str, subject: str) -> str:
    prompt, subject = fill(template, subject)
    return prompt.format(subject)


def true_first(model, tok, template: str, table: dict[str, str]) -> dict[str, bool]:
    """{subject: the model ranks its object first among the relation's objects on this template}."""
    objects = sorted(set(table.values()))
    subjects = list(table)
    best = candidate_scores(model, tok, [ask(template, s) for s in subjects], objects).argmin(1)
    return {s: objects[int(i)] == table[s] for s, i in zip(subjects, best)}


def make_records(name: str, rel: Relation, table: dict[str, str], known: dict[str, bool], seed: int) -> list[Record]:
    """One record per subject of the relation, in the table's order."""
    objects = sorted(set(table.values()))
    records = []
    for i, (subject, obj) in enumerate(table.items()):
        rng = random.Random(f"{seed}/{name}/{subject}")
        others = [s for s in table if table[s] == obj and s != subject]
        rng.shuffle(others)
        neighbours = [s for s in others if known[s]]
        prompt, bare = fill(rel.prompt, subject)
        records.append(Record(
            prompt=prompt, subject=bare, target_true=obj, target_new=rng.choice([o for o in objects if o != obj]),
            paraphrase_prompts=[ask(t, subject) for t in rel.paraphrases],
            neighborhood_prompts=neighbourhood(rel, neighbours or others),
            relation=name, extra={"known": known[subject], "neighbours_known": bool(neighbours)}))
    return records


def neighbourhood(rel: Relation, subjects: list[str], least: int = 5) -> list[str]:
    """The record's prompt about up to NEIGHBOURS other subjects; with fewer than `least`, the paraphrase
    templates about them too, up to `least` prompts."""
    prompts = [ask(rel.prompt, s) for s in subjects[:NEIGHBOURS]]
    more = (ask(t, s) for t in rel.paraphrases for s in subjects)
    while len(prompts) < least and (p := next(more, None)) is not None:
        prompts.append(p)
    return prompts


def build(model, tok, relations: dict[str, Relation], tables: dict, seed: int) -> dict[str, list[Record]]:
    """{relation: records}, every subject's knowledge checked on the record's prompt and on each paraphrase."""
    out = {}
    for name, rel in relations.items():
        known = true_first(model, tok, rel.prompt, tables[name])
        records = make_records(name, rel, tables[name], known, seed)
        para = [true_first(model, tok, t, tables[name]) for t in rel.paraphrases]
        for r, subject in zip(records, tables[name]):
            r.extra["paraphrases_known"] = sum(p[subject] for p in para)
        out[name] = records
        print(f"{name}: {sum(known.values())}/{len(known)} known on {rel.prompt!r}", flush=True)
    return out


def select(by_relation: dict[str, list[Record]], per_relation: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(the main set: up to per_relation known records with neighbours per relation, drawn at random; the rest)."""
    chosen, rest = [], []
    for name, records in by_relation.items():
        ok = [r for r in records if r.extra["known"] and r.extra["neighbours_known"]]
        random.Random(f"{seed}/{name}").shuffle(ok)
        chosen += ok[:per_relation]
        rest += [r for r in records if r not in ok[:per_relation]]
    return chosen, rest


def quality(model, tok, records: list[Record], candidates: dict[str, int]) -> dict:
    """The model's bare and in-context scores on a set, per relation: the candidates tried, the records kept,
    paraphrases the model gets right bare, and greedy top-1 of the true object on the record's prompt."""
    top1 = target_scores(model, tok, [r.query for r in records], [r.target_true for r in records])[1]
    rows = {}
    for name in dict.fromkeys(r.relation for r in records):
        idx = [i for i, r in enumerate(records) if r.relation == name]
        rows[name] = {"candidates": candidates[name], "kept": len(idx),
                      "paraphrases_known": sum(records[i].extra["paraphrases_known"] for i in idx)
                      / sum(len(records[i].paraphrase_prompts) for i in idx),
                      "true_greedy_top1": top1[idx].float().mean().item(),
                      "neighbour_prompts": sum(len(records[i].neighborhood_prompts) for i in idx) / len(idx)}
    return {"relations": rows, "bare": evaluate_records(model, tok, records),
            "in_context": evaluate_records(model, tok, records, prefix=in_context)}


def number(records: list[Record], start: int) -> None:
    for i, r in enumerate(records):
        r.case_id = start + i


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--per_relation", type=int, default=40, show_default=True, help="Main-set records per relation, at most.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws (target_new, the selection).")
def main(per_relation: int, seed: int):
    torch.set_num_threads(1)
    model, tok = load_base_model(EMBEDDED_MODEL)
    tables = read_tables(FACTS / "tables.txt")
    main_by, unseen_by = build(model, tok, MAIN, tables, seed), build(model, tok, UNSEEN, tables, seed)
    pool = [r for records in main_by.values() for r in records]
    number(pool, 0)
    chosen, rest = select(main_by, per_relation, seed)
    unseen = [r for records in unseen_by.values() for r in records if r.extra["known"]]
    number(unseen, 10000)
    sequential = chosen + [r for r in rest if r.extra["known"]] + [r for r in rest if not r.extra["known"]]
    save_records(chosen, FACTS / "counterfacts.json")
    save_records(unseen, FACTS / "unseen.json")
    save_records(sequential, FACTS / "sequential.json")
    report = {"filter": "the true object has the highest mean log-probability per token among the relation's objects",
              "main": quality(model, tok, chosen, {n: len(tables[n]) for n in MAIN}),
              "unseen": quality(model, tok, unseen, {n: len(tables[n]) for n in UNSEEN}),
              "sequential": {"records": len(sequential), "known": sum(r.extra["known"] for r in sequential)}}
    (FACTS / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
