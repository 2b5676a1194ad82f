"""The project's fact set (benchmarks/facts): what issue 26 asks of it, read from the files (fast), and the
filter checked again on the embedded model (integration)."""
import random
import re

import pytest

from npt_tools.counterfact import candidate_scores, load_records
from helpers import ROOT

from benchmarks.make_facts import MAIN, UNSEEN, read_tables

FACTS = ROOT / "benchmarks" / "facts"


@pytest.fixture(scope="module")
def sets():
    return {name: load_records(FACTS / f"{name}.json") for name in ("counterfacts", "unseen", "sequential")}


def test_main_set(sets):
    main = sets["counterfacts"]
    relations = {r.relation for r in main}
    assert len(main) >= 200 and len(relations) >= 8 and relations <= set(MAIN)
    tables = read_tables(FACTS / "tables.txt")
    for r in main:
        objects = set(tables[r.relation].values())
        assert r.extra["known"] and r.target_true != r.target_new and {r.target_true, r.target_new} <= objects
        assert len(r.paraphrase_prompts) >= 3 and r.query not in r.paraphrase_prompts
        assert 1 <= len(r.neighborhood_prompts) <= 10
        assert not any(re.search(rf"\b{re.escape(r.subject)}\b", p) for p in r.neighborhood_prompts)
        assert r.context == f"{r.query} {r.target_new}."


def test_neighbours_share_the_true_object(sets):
    """A neighbourhood prompt is about another subject of the relation whose true object is the record's."""
    tables = read_tables(FACTS / "tables.txt")
    for r in sets["counterfacts"]:
        same = [s.removeprefix("the ") for s, o in tables[r.relation].items() if o == r.target_true]
        for p in r.neighborhood_prompts:
            assert any(s in p for s in same if s != r.subject), (r.subject, p)


def test_unseen_and_sequential(sets):
    unseen, pool, main = sets["unseen"], sets["sequential"], sets["counterfacts"]
    assert {r.relation for r in unseen} <= set(UNSEEN) and len({r.relation for r in unseen}) >= 3
    templates = {r.prompt.replace("The {}", "{}") for r in main} | {p.replace("The {}", "{}") for r in main
                                                                      for p in MAIN[r.relation].paraphrases}
    assert not {r.prompt.replace("The {}", "{}") for r in unseen} & templates
    assert len(pool) >= 1000 and len({r.subject for r in pool}) == len(pool)
    assert [r.case_id for r in pool[:len(main)]] == [r.case_id for r in main]  # the main set first
    assert not {r.subject for r in pool} & {r.subject for r in unseen}


@pytest.mark.integration
def test_the_model_ranks_the_true_object_first(sets, embedded):
    """The filter, again: on 30 records drawn from the main set, the true object scores highest among the
    relation's objects on the record's prompt, and the unseen set likewise."""
    model, tok = embedded
    tables = read_tables(FACTS / "tables.txt")
    for name in ("counterfacts", "unseen"):
        for r in random.Random(0).sample(sets[name], 30):
            objects = sorted(set(tables[r.relation].values()))
            scores = candidate_scores(model, tok, [r.query], objects)[0]
            assert objects[int(scores.argmin())] == r.target_true, r.query
