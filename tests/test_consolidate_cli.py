"""npt-consolidate (npt_tools.consolidate_cli): bad input is one line, exit 2, nothing written; the artifact it
writes is the edit it made (plain model + edit.safetensors = the edited model, bitwise), and --merge_into loads
with from_pretrained. Fast tier: a tiny random Llama with a seeded stand-in for the consolidation method (the
artifact's plumbing, not the method, is under test). Integration tier: the embedded model and the real method."""
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import npt
from npt_tools import consolidate_cli, edit, plasticity
from helpers import assert_parameters_unchanged, parameter_snapshot, seeded_deltas

ONE_TORCH_THREAD = True
CONTEXT = "The capital of France is Rome."
QUERY = "The capital of France is"
NAMES = ("model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight")


def invoke(*args):
    return CliRunner().invoke(consolidate_cli.main, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code,
                                                                                          result.stderr)
    assert "Traceback" not in result.output
    return lines[0]


def stand_in(deltas_of):
    """A compute_edit replacement that returns deltas_of(model) and records its calls."""
    calls = []

    def compute_edit(model, tokenizer, contexts, records=None, **options):
        calls.append({"contexts": list(contexts), "records": records, **options})
        return deltas_of(model)
    compute_edit.calls = calls
    return compute_edit


def facts_file(tmp_path):
    record = {"requested_rewrite": {"prompt": "The capital of {} is", "subject": "France",
                                    "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
              "paraphrase_prompts": ["France's capital city is"], "neighborhood_prompts": ["The capital of Spain is"]}
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([record]))
    return path


# ----------------------------------------------------------------------------- bad input (fast)
def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "two.txt").write_text("A is B.\n")
    (tmp_path / "facts.json").write_text("{not json")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    out = ["--output_dir", tmp_path / "out"]
    return {
        "no context": (out, "nothing to write"),
        "empty context": (["--context", "  ", *out], "--context is empty"),
        "two context flags": (["--context", CONTEXT, "--contexts_file", tmp_path / "two.txt", *out], "combined"),
        "empty file": (["--contexts_file", tmp_path / "empty.txt", *out], "holds no context"),
        "missing file": (["--contexts_file", tmp_path / "nope.txt", *out], "cannot read"),
        "bad facts": (["--facts", tmp_path / "facts.json", *out], "--facts"),
        "missing facts": (["--facts", tmp_path / "nope.json", *out], "--facts"),
        "busy output": (["--context", CONTEXT, "--output_dir", tmp_path / "busy"], "other files"),
        "same folders": (["--context", CONTEXT, *out, "--merge_into", tmp_path / "out"], "one folder"),
        "nothing to do": (["--context", CONTEXT], "nothing to do"),
        "bad checkpoint": (["--context", CONTEXT, *out, "--checkpoint", tmp_path / "nope"], "--checkpoint"),
        "4-bit": (["--context", CONTEXT, *out, "--use_quantization"], "full precision"),
        "unknown method": (["--context", CONTEXT, *out, "--method", "no-such-method"], "--method"),
        "unknown option": (["--context", CONTEXT, *out, "--edit_option", "max_chnage=0"], "NAME one of"),
        "bad option value": (["--context", CONTEXT, *out, "--edit_option", "donors=four"], "donors takes int"),
        "negative option": (["--context", CONTEXT, *out, "--edit_option", "layers=1,-2"], "must not be negative"),
        "unknown direction": (["--context", CONTEXT, *out, "--edit_option", "direction=newton"], "direction is one of"),
    }


CASES = ("no context", "empty context", "two context flags", "empty file", "missing file", "bad facts",
         "missing facts", "busy output", "same folders", "nothing to do", "bad checkpoint", "4-bit", "unknown method",
         "unknown option", "bad option value", "negative option", "unknown direction")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, tiny_llama_dir, monkeypatch):
    method = stand_in(lambda model: seeded_deltas(model, NAMES))
    monkeypatch.setattr(plasticity, "compute_edit", method)
    args, match = bad_inputs(tmp_path)[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert match in error_line(invoke("--model_name", tiny_llama_dir, *args))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not method.calls


@pytest.mark.parametrize("bad", ["nan", "fp32 logits overflow", "fp16 overflow"])
def test_non_finite_edit_is_refused_and_nothing_written(bad, tmp_path, tiny_llama_dir, monkeypatch):
    def deltas_of(model):
        deltas = seeded_deltas(model, NAMES)
        if bad == "nan":
            deltas[NAMES[1]][0, 0] = float("nan")
        elif bad == "fp16 overflow":
            deltas[NAMES[0]][0, 0] = 7e4
        else:  # finite weights whose forward overflows: the MLP's input ~1e30, gate * up beyond fp32
            norm = model.model.layers[0].post_attention_layernorm.weight
            deltas["model.layers.0.post_attention_layernorm.weight"] = torch.full_like(norm, 1e30)
        return deltas
    monkeypatch.setattr(plasticity, "compute_edit", stand_in(deltas_of))
    precision = ["--use_fp16"] if bad == "fp16 overflow" else []
    result = invoke("--model_name", tiny_llama_dir, "--context", CONTEXT, "--output_dir", tmp_path / "out",
                    "--merge_into", tmp_path / "merged", *precision)
    assert "nothing" in error_line(result) or "no weight was changed" in error_line(result)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the artifact is the edit (fast)
def test_artifact_and_merge_are_the_edited_model(tmp_path, tiny_llama_dir, monkeypatch):
    method = stand_in(lambda model: seeded_deltas(model, NAMES))
    monkeypatch.setattr(plasticity, "compute_edit", method)
    (tmp_path / "contexts.txt").write_text("A is B.\n\nC is D.\n")
    result = invoke("--model_name", tiny_llama_dir, "--contexts_file", tmp_path / "contexts.txt", "--query", QUERY,
                    "--output_dir", tmp_path / "out", "--merge_into", tmp_path / "merged",
                    "--edit_option", "max_change=0", "--edit_option", " layers = 0,1")
    assert result.exit_code == 0, result.output
    assert method.calls[0]["contexts"] == ["A is B.", "C is D."]  # in order, blank lines skipped
    assert method.calls[0]["max_change"] == 0.0 and method.calls[0]["layers"] == (0, 1)
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert rows == ["bare", "in", "edited"]
    deltas, meta = edit.load_edit(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    expected = seeded_deltas(plain, NAMES)
    assert deltas.keys() == expected.keys() and all(torch.equal(deltas[n], expected[n]) for n in deltas)
    assert meta["options"] == {"max_change": 0.0, "layers": [0, 1]}
    assert meta["contexts"] == ["A is B.", "C is D."] and meta["layers"] == [0, 1] and meta["model_name"] == str(
        tiny_llama_dir)
    edit.apply_edit(plain, deltas)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(1, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, plain(input_ids=ids).logits)
    again = invoke("--model_name", tiny_llama_dir, "--context", CONTEXT, "--output_dir", tmp_path / "out")
    assert "--overwrite_output_dir" in error_line(again)


def test_checkpoint_edits_the_npt_model_under_plain_names(tmp_path, tiny_llama_dir, monkeypatch):
    converted = npt.convert_to_npt(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), npt.NPTConfig(rank=4))
    npt.save_adapters(converted, tmp_path / "ckpt")
    seen = []

    def deltas_of(model):
        seen.append(len(npt.npt_layers(model)))
        return seeded_deltas(model, NAMES)
    monkeypatch.setattr(plasticity, "compute_edit", stand_in(deltas_of))
    result = invoke("--model_name", tiny_llama_dir, "--checkpoint", tmp_path / "ckpt", "--context", CONTEXT,
                    "--output_dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert seen == [2]  # the method ran on the NPT model
    deltas, meta = edit.load_edit(tmp_path / "out")
    assert set(deltas) == set(NAMES) and meta["checkpoint"] == str(tmp_path / "ckpt")
    edit.apply_edit(converted, deltas)  # the names are the plain model's, and they apply to the NPT model


def test_facts_print_metrics_before_and_after(tmp_path, tiny_llama_dir, monkeypatch):
    method = stand_in(lambda model: seeded_deltas(model, NAMES))
    monkeypatch.setattr(plasticity, "compute_edit", method)
    result = invoke("--model_name", tiny_llama_dir, "--facts", facts_file(tmp_path))
    assert result.exit_code == 0, result.output
    assert method.calls[0]["contexts"] == ["The capital of France is Rome."]
    assert [r.subject for r in method.calls[0]["records"]] == ["France"]
    table = {line.split("  ")[0].strip(): line.split()[-8:] for line in result.stdout.splitlines()
             if line.startswith(("bare", "in context", "edited"))}
    assert table.keys() == {"bare", "in context", "edited"}
    assert all(0 <= float(x) <= 1 for row in table.values() for x in row)
    assert list(tmp_path.iterdir()) == [tmp_path / "facts.json"]  # no --output_dir: nothing written
    assert "NS without" not in result.stdout  # no neighbour of France is edited


def test_facts_ns_without_the_neighbours_the_edit_rewrites(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(plasticity, "compute_edit", stand_in(lambda model: seeded_deltas(model, NAMES)))
    france = json.loads(facts_file(tmp_path).read_text())[0]
    spain = {"requested_rewrite": {"prompt": "The capital of {} is", "subject": "Spain", "target_new": {"str": "Oslo"},
                                   "target_true": {"str": "Madrid"}},
             "paraphrase_prompts": [], "neighborhood_prompts": ["The capital of Italy is", "Spainish is"]}
    (tmp_path / "facts.json").write_text(json.dumps([france, spain]))
    result = invoke("--model_name", tiny_llama_dir, "--facts", tmp_path / "facts.json")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("NS without"))
    assert line.startswith("NS without the 1 of 3 neighbourhood prompts that name a subject written here: ")


# ----------------------------------------------------------------------------- the real method (integration)
@pytest.mark.integration
def test_cli_artifact_gives_the_library_edit_bitwise(tmp_path, embedded):
    """npt-consolidate --context ... --output_dir D: the plain model plus D/edit.safetensors gives the logits of
    the model the library edits (compute_edit + apply_edit), bitwise; undo restores every weight; --merge_into
    loads with from_pretrained and gives the same logits."""
    model, tokenizer = embedded
    result = invoke("--context", CONTEXT, "--query", QUERY, "--output_dir", tmp_path / "D",
                    "--merge_into", tmp_path / "M")
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert rows == ["bare", "in", "edited"]
    saved, meta = edit.load_edit(tmp_path / "D")
    assert meta["contexts"] == [CONTEXT] and meta["method"] == plasticity.DEFAULT_METHOD
    ids = tokenizer([QUERY, "Python is a programming language"], return_tensors="pt", padding=True)
    before = parameter_snapshot(model)
    with torch.no_grad():
        bare = model(**ids).logits
        handle = edit.apply_edit(model, saved)
        from_artifact = model(**ids).logits
        edit.undo_edit(model, handle)
        assert_parameters_unchanged(model, before)
        library = plasticity.compute_edit(model, tokenizer, [CONTEXT])
        assert library.keys() == saved.keys() and all(torch.equal(library[n], saved[n]) for n in saved)
        handle = edit.apply_edit(model, library)
        edited = model(**ids).logits
        edit.undo_edit(model, handle)
    assert_parameters_unchanged(model, before)
    assert torch.equal(from_artifact, edited) and not torch.equal(bare, edited)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "M")
    with torch.no_grad():
        assert torch.equal(merged(**ids).logits, edited)
