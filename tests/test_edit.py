"""The edit artifact (npt_tools.edit) on tiny random decoders: save / load, apply / undo (bitwise), the refusals
(non-finite, overflow, unknown names, shapes, tied tensors, 4-bit), NPT names, and merging into a Hugging Face
folder. The deltas come from a deterministic function of this module, not from a consolidation method."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import npt
from npt_tools import edit
from helpers import assert_parameters_unchanged as assert_unchanged, parameter_snapshot as snapshot
from helpers import seeded_deltas, tiny_model

ONE_TORCH_THREAD = True
EDITED = ("model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.gate_proj.weight",
          "model.layers.2.post_attention_layernorm.weight", "lm_head.weight")


def make_deltas(model, names=EDITED, scale=0.05, seed=7) -> dict[str, torch.Tensor]:
    return seeded_deltas(model, names, scale, seed)


def logits(model, seed=3):
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and text, text
    return text


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    deltas = make_deltas(model)
    out = edit.save_edit(tmp_path / "e", deltas, {"method": "test", "contexts": ["A is B."], "model_name": "tiny"})
    assert sorted(p.name for p in out.iterdir()) == sorted(edit.EDIT_FILES)
    loaded, meta = edit.load_edit(out)
    assert loaded.keys() == deltas.keys()
    assert all(torch.equal(loaded[n], deltas[n]) and loaded[n].dtype == torch.float32 for n in deltas)
    assert meta["method"] == "test" and meta["contexts"] == ["A is B."] and meta["model_name"] == "tiny"
    assert meta["format_version"] == edit.FORMAT_VERSION and meta["dtype"] == "float32"
    assert meta["layers"] == [0, 2]
    for n, d in deltas.items():
        assert meta["norms"][n] == pytest.approx(d.double().norm().item(), rel=1e-6)
    (tmp_path / "plain").mkdir()  # what the umask gives a folder and a file made the ordinary way
    (tmp_path / "plain" / "f").write_text("")
    modes = [p.stat().st_mode & 0o777 for p in (tmp_path / "plain", tmp_path / "plain" / "f")]
    assert [p.stat().st_mode & 0o777 for p in (out, out / edit.WEIGHTS_FILE, out / edit.META_FILE)] == modes[:1] + \
        modes[1:] * 2


def test_save_refuses_other_files_and_replaces_only_an_edit(tmp_path):
    model = tiny_model()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files") as e:
        edit.save_edit(tmp_path / "busy", make_deltas(model), overwrite=True)
    one_line(e)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    first = edit.save_edit(tmp_path / "e", make_deltas(model, seed=1))
    with pytest.raises(ValueError, match="already holds an edit"):
        edit.save_edit(first, make_deltas(model, seed=2))
    assert torch.equal(edit.load_edit(first)[0][EDITED[0]], make_deltas(model, seed=1)[EDITED[0]])
    edit.save_edit(first, make_deltas(model, seed=2), overwrite=True)
    assert torch.equal(edit.load_edit(first)[0][EDITED[0]], make_deltas(model, seed=2)[EDITED[0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "e"]  # no temporary folder left


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        edit.save_edit(tmp_path / "e", make_deltas(tiny_model()))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_save_refuses_non_finite(tmp_path, bad):
    deltas = make_deltas(tiny_model())
    deltas[EDITED[1]][3, 4] = bad
    with pytest.raises(ValueError, match="not finite") as e:
        edit.save_edit(tmp_path / "e", deltas)
    one_line(e)
    assert list(tmp_path.iterdir()) == []


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no edit at") as e:
        edit.load_edit(tmp_path / "missing")
    one_line(e)
    good = edit.save_edit(tmp_path / "e", make_deltas(tiny_model()))
    for name, corrupt, match in (
            ("json", lambda: (good / edit.META_FILE).write_text("{not json"), "not readable JSON"),
            ("weights", lambda: (good / edit.WEIGHTS_FILE).write_bytes(
                (good / edit.WEIGHTS_FILE).read_bytes()[:100]), "does not load"),
            ("names", lambda: (good / edit.META_FILE).write_text(json.dumps(
                {**meta, "norms": {"x": 1.0}})), "inconsistent"),
            ("version", lambda: (good / edit.META_FILE).write_text(json.dumps(
                {**meta, "format_version": 99})), "format_version 99")):
        edit.save_edit(good, make_deltas(tiny_model()), overwrite=True)
        meta = json.loads((good / edit.META_FILE).read_text())
        corrupt()
        with pytest.raises(ValueError, match=match) as e:
            edit.load_edit(good)
        one_line(e)


# ----------------------------------------------------------------------------- apply / undo
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_is_the_float64_sum_and_undo_is_bitwise(dtype):
    model = tiny_model().to(dtype)
    before = snapshot(model)
    deltas = make_deltas(model)
    handle = edit.apply_edit(model, deltas)
    params = edit.base_parameters(model)
    for n, d in deltas.items():
        expected = (before[n].double() + d.double()).to(dtype)  # the exact sum, rounded once
        assert params[n].dtype == dtype and torch.equal(params[n], expected), n
        assert not torch.equal(params[n], before[n]), n
    for n, p in model.named_parameters():
        if n not in deltas:
            assert torch.equal(p, before[n]), n
    edit.undo_edit(model, handle)
    assert_unchanged(model, before)


def test_undo_restores_what_w_plus_d_minus_d_would_not():
    """(w + d) - d is not w in floating point: the undo must come from the originals."""
    model = tiny_model()
    before = snapshot(model)
    deltas = make_deltas(model, scale=3.0)
    handle = edit.apply_edit(model, deltas)
    params = edit.base_parameters(model)
    assert any(not torch.equal(params[n] - d, before[n]) for n, d in deltas.items())
    edit.undo_edit(model, handle)
    assert_unchanged(model, before)


def test_applied_block_restores_on_exit_and_on_error():
    model = tiny_model()
    before = snapshot(model)
    deltas = make_deltas(model)
    with edit.applied(model, deltas):
        edited = logits(model)
    assert_unchanged(model, before)
    assert not torch.equal(edited, logits(model))
    with pytest.raises(RuntimeError, match="inside"):
        with edit.applied(model, deltas):
            raise RuntimeError("inside")
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_delta_changes_no_weight(bad):
    model = tiny_model()
    before = snapshot(model)
    deltas = make_deltas(model)
    deltas[EDITED[-1]][0, 0] = bad  # the last one: the others are fine and must not be written either
    with pytest.raises(ValueError, match="not finite") as e:
        edit.apply_edit(model, deltas)
    one_line(e)
    assert_unchanged(model, before)


def test_fp16_overflow_changes_no_weight():
    model = tiny_model().half()
    before = snapshot(model)
    deltas = make_deltas(model)
    deltas[EDITED[-1]][1, 2] = 7e4  # finite in fp32, beyond fp16's 65504 once added
    with pytest.raises(ValueError, match="overflows lm_head.weight") as e:
        edit.apply_edit(model, deltas)
    one_line(e)
    assert_unchanged(model, before)
    edit.apply_edit(tiny_model(), deltas)  # the same edit on the fp32 model is fine


def test_unknown_name_shape_and_tied_tensor_refused():
    model = tiny_model()
    before = snapshot(model)
    for deltas, match in (({**make_deltas(model), "model.layers.9.mlp.down_proj.weight": torch.zeros(64, 96)},
                           "not a base parameter"),
                          ({EDITED[0]: torch.zeros(96, 64)}, r"shape \(96, 64\)"),
                          ({}, "non-empty")):
        with pytest.raises(ValueError, match=match) as e:
            edit.apply_edit(model, deltas)
        one_line(e)
    assert_unchanged(model, before)
    tied = tiny_model(tie_word_embeddings=True)
    both = make_deltas(tied, names=("model.embed_tokens.weight", "lm_head.weight"))
    with pytest.raises(ValueError, match="one tied tensor"):
        edit.apply_edit(tied, both)
    edit.apply_edit(tied, {"lm_head.weight": both["lm_head.weight"]})  # either name alone edits the one tensor
    assert torch.equal(tied.model.embed_tokens.weight, tied.lm_head.weight)


def test_4bit_weight_refused():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model()
    old = model.model.layers[0].mlp.down_proj
    q = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=torch.float32,
                          quant_type="nf4")
    q.weight = bnb.nn.Params4bit(old.weight.data.clone(), requires_grad=False, quant_type="nf4")
    model.model.layers[0].mlp.down_proj = q.to("cpu")
    before = snapshot(model)
    with pytest.raises(ValueError, match="reload the model without quantization") as e:
        edit.apply_edit(model, make_deltas(tiny_model()))
    one_line(e)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- NPT names
def test_npt_model_names_map_and_adapters_are_never_edited():
    plain = tiny_model()
    converted = npt.convert_to_npt(copy.deepcopy(plain), npt.NPTConfig(rank=4, layers=[0, 2]))
    names = edit.base_parameters(converted)
    assert names.keys() == edit.base_parameters(plain).keys()
    assert names["model.layers.0.mlp.down_proj.weight"] is converted.model.layers[0].layer.mlp.down_proj.weight
    adapter_ids = {id(p) for p in npt.get_adapter_params(converted)}
    assert not adapter_ids & {id(p) for p in names.values()}
    adapters = [p.detach().clone() for p in npt.get_adapter_params(converted)]
    deltas = make_deltas(plain)
    edit.apply_edit(plain, deltas)
    edit.apply_edit(converted, deltas)
    assert all(torch.equal(a, p) for a, p in zip(adapters, npt.get_adapter_params(converted)))
    with npt.npt_disabled(converted):  # the base layers run as the plain model: the same edited weights
        assert torch.equal(logits(converted), logits(plain))
    with pytest.raises(ValueError, match="not a base parameter"):
        edit.apply_edit(converted, {"model.layers.0.adapter.A_proj.weight": torch.zeros(4, 64)})


# ----------------------------------------------------------------------------- merge
def test_merge_loads_with_from_pretrained(tmp_path, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    names = ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight")
    deltas = make_deltas(base, names=names)
    edit_dir = edit.save_edit(tmp_path / "e", deltas, {"method": "test"})
    out = edit.merge_edit(str(tiny_llama_dir), edit_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    edit.apply_edit(base, deltas)
    assert torch.equal(logits(merged), logits(base))
    meta = json.loads((out / edit.META_FILE).read_text())
    assert meta["method"] == "test" and meta["merged_into"] == str(tiny_llama_dir)
    assert meta["norms"] == json.loads((edit_dir / edit.META_FILE).read_text())["norms"]
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    with pytest.raises(ValueError, match="already holds a merged model") as e:
        edit.merge_edit(str(tiny_llama_dir), edit_dir, out)
    one_line(e)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files"):
        edit.merge_edit(str(tiny_llama_dir), edit_dir, tmp_path / "other", overwrite=True)
    edit.merge_edit(str(tiny_llama_dir), edit_dir, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "merged", "other"]
