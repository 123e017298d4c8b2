"""`kubelora convert` on a file without kubelora metadata: which model family it is for. Flux.1's
and HunyuanVideo's diffusers module names coincide (and LTX-Video's and Cosmos' attention), so a
file that fits several families is never converted as one of them without a word."""
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kubelora_trainer.lora_family import FamilyChoiceError, beyond_release, choose, readers

MODELS = Path(__file__).resolve().parents[1] / "trainer" / "kubelora_trainer" / "models"
QKV = [f"transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v")]


def diffusers_file(modules, width=16, rank=4, seed=0):
    """A diffusers-format LoRA (transformer.<module>.lora_A/B.weight) as other trainers write it."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        out[f"transformer.{m}.lora_A.weight"] = torch.randn(rank, width, generator=g)
        out[f"transformer.{m}.lora_B.weight"] = torch.randn(width, rank, generator=g)
    return out


def test_released_blocks_are_those_of_the_shipped_configs_and_diffusers_defaults():
    from diffusers import CosmosTransformer3DModel, FluxTransformer2DModel, HunyuanVideoTransformer3DModel
    from kubelora_trainer.families import RULES

    def cfg(path):
        return json.loads((MODELS / path / "config.json").read_text())

    def default(cls, name):
        return inspect.signature(cls.__init__).parameters[name].default
    for flavour in ("flux-dev", "flux-schnell"):
        c = cfg(f"flux/configs/{flavour}/transformer")
        assert dict(RULES["flux"].released_blocks) == {"transformer_blocks": c["num_layers"],
                                                       "single_transformer_blocks": c["num_single_layers"]}
    assert dict(RULES["flux"].released_blocks) == {"transformer_blocks": default(FluxTransformer2DModel, "num_layers"),
                                                   "single_transformer_blocks": default(FluxTransformer2DModel,
                                                                                        "num_single_layers")}
    c = cfg("hunyuan_video/configs/transformer")
    hv = HunyuanVideoTransformer3DModel
    assert [c[k] for k in ("num_layers", "num_single_layers", "num_refiner_layers")] == [
        default(hv, k) for k in ("num_layers", "num_single_layers", "num_refiner_layers")]
    assert dict(RULES["hunyuan-video"].released_blocks) == {
        "transformer_blocks": c["num_layers"], "single_transformer_blocks": c["num_single_layers"],
        "context_embedder.token_refiner.refiner_blocks": c["num_refiner_layers"]}
    cosmos = [cfg(f"cosmos/configs/transformer-{s}")["num_layers"] for s in ("7b", "14b")]
    assert cosmos[0] == default(CosmosTransformer3DModel, "num_layers")
    assert dict(RULES["cosmos"].released_blocks) == {"transformer_blocks": max(cosmos)}


def test_flux_and_hunyuan_video_names_coincide_and_only_a_block_past_flux_tells_them_apart():
    """The parsers themselves: a Flux double-block q/k/v file reads as both; a name only one
    transformer has (token_refiner, x_embedder) reads as that one alone."""
    fits, why = readers(diffusers_file(QKV), "diffusers")
    assert set(fits) == {"flux", "hunyuan-video"} and set(why) == {"sdxl", "ltx-video", "cosmos"}
    assert "not modules of the LTX-Video transformer" in why["ltx-video"]
    fits, _ = readers(diffusers_file(QKV + ["context_embedder.token_refiner.refiner_blocks.0.attn.to_q"]), "diffusers")
    assert set(fits) == {"hunyuan-video"}
    fits, _ = readers(diffusers_file(QKV + ["x_embedder"]), "diffusers")
    assert set(fits) == {"flux"}
    mods = QKV + ["transformer_blocks.19.attn.to_q", "transformer_blocks.3.attn.to_q"]
    assert beyond_release("flux", mods) == ("transformer_blocks.19.attn.to_q is past the released flux model's 19 "
                                            "transformer_blocks (transformer_blocks.0-18)")
    assert beyond_release("hunyuan-video", mods) is None
    assert beyond_release("flux", ["single_transformer_blocks.38.proj_mlp"]).startswith("single_transformer_blocks.38")
    assert beyond_release("flux", ["single_transformer_blocks.37.proj_mlp", "transformer_blocks.18.ff.net.2"]) is None
    assert beyond_release("ltx-video", ["transformer_blocks.99.attn1.to_q"]) is None   # no released depth to hold it to


def test_choose_refuses_what_stays_ambiguous_and_says_what_it_chose():
    both = {"flux": QKV, "hunyuan-video": QKV}
    with pytest.raises(FamilyChoiceError) as e:
        choose(both, None)
    assert str(e.value) == ("its module names fit flux and hunyuan-video, and nothing in the file tells which "
                            "(no kubelora.model_type metadata); choose with --model-type flux or --model-type "
                            "hunyuan-video")
    # --model-type chooses, and the other fitting family is named
    t, notes = choose(both, "hunyuan-video")
    assert t == "hunyuan-video" and len(notes) == 1 and notes[0].startswith("note: its module names fit flux too")
    # a block past Flux.1's 19: HunyuanVideo, saying why not Flux
    past = QKV + ["transformer_blocks.19.attn.to_q"]
    t, notes = choose({"flux": past, "hunyuan-video": past}, None)
    assert t == "hunyuan-video" and "flux fits its names too, but transformer_blocks.19.attn.to_q is past" in notes[0]
    with pytest.raises(FamilyChoiceError, match=r"it fits hunyuan-video: is it a hunyuan-video LoRA\? "
                                                r"\(--model-type hunyuan-video\)"):
        choose({"flux": past, "hunyuan-video": past}, "flux")
    # only the named family fits, past its release (a deeper fine-tune): converted, with a warning
    t, notes = choose({"flux": past}, "flux")
    assert t == "flux" and notes[0].startswith("warning: transformer_blocks.19.attn.to_q is past")
    assert choose({"flux": QKV}, "flux") == ("flux", [])
    t, notes = choose({"flux": QKV}, None)
    assert t == "flux" and notes == ["note: converting it as flux, the family its module names fit "
                                     "(--model-type chooses another)"]
    assert choose({"flux": QKV}, "sdxl") == ("sdxl", [])   # its parser's error says why
    # past every fitting family's release: still ambiguous, with the reasons
    deep = ["transformer_blocks.40.attn.to_q"]
    with pytest.raises(FamilyChoiceError, match=r"fit flux and hunyuan-video \(transformer_blocks.40.attn.to_q is past"):
        choose({"flux": deep, "hunyuan-video": deep}, None)
    # LTX-Video and Cosmos share attn1/attn2: Cosmos 1.0 stops at 36 blocks
    attn = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.36.attn2.to_k"]
    assert choose({"ltx-video": attn, "cosmos": attn}, None)[0] == "ltx-video"
    with pytest.raises(FamilyChoiceError, match="fit ltx-video and cosmos"):
        choose({"ltx-video": attn[:1], "cosmos": attn[:1]}, None)


def test_convert_cli_refuses_an_ambiguous_file_and_notes_a_chosen_one(tmp_path, capsys):
    """The reported case: a Flux diffusers LoRA of double-block q/k/v only, no kubelora metadata,
    was written as a HunyuanVideo original-layout file without a word."""
    from safetensors import safe_open
    from kubelora_trainer.cli import main
    src, out = tmp_path / "flux_qkv.safetensors", tmp_path / "out.safetensors"
    save_file(diffusers_file(QKV), str(src))

    def run(*args):
        rc = main(["convert", str(src), str(out), "--from", "diffusers", *args])
        return (rc, *capsys.readouterr())
    rc, _, err = run("--to", "original")
    assert rc == 2 and not out.exists()
    assert err == (f"error: {src}: its module names fit flux and hunyuan-video, and nothing in the file tells which "
                   "(no kubelora.model_type metadata); choose with --model-type flux or --model-type hunyuan-video\n")
    rc, stdout, err = run("--to", "kohya", "--model-type", "flux")
    assert rc == 0 and "wrote" in stdout and "6 LoRA modules" in stdout
    assert err.startswith(f"note: {src}: its module names fit hunyuan-video too") and "as flux, as --model-type says" in err
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["kubelora.model_type"] == "flux"
    rc, _, err = run("--to", "original", "--model-type", "hunyuan-video")
    assert rc == 0 and f"note: {src}: its module names fit flux too" in err
    # a block Flux.1 does not have: detected as HunyuanVideo, and the file says so
    save_file(diffusers_file(QKV + ["transformer_blocks.19.attn.to_out.0"]), str(src))
    rc, _, err = run("--to", "original")
    assert rc == 0 and err.startswith(f"note: {src}: converting it as hunyuan-video") and "flux fits its names too" in err
    rc, _, err = run("--to", "kohya", "--model-type", "flux")
    assert rc == 2 and "is it a hunyuan-video LoRA? (--model-type hunyuan-video)" in err and len(err.splitlines()) == 1
    rc, _, err = run("--to", "kohya")   # detected, and kohya is not a HunyuanVideo format
    assert rc == 2 and "it is a hunyuan-video LoRA (by its module names), and format 'kohya' is not available" in err
    # kubelora's own file: its metadata says which, nothing to note
    save_file(diffusers_file(QKV), str(src), metadata={"kubelora.model_type": "flux"})
    rc, _, err = run("--to", "kohya")
    assert rc == 0 and err == ""
    # --model-type naming a family that does not read it: the parser's reason, and which one does
    save_file(diffusers_file(["context_embedder.token_refiner.refiner_blocks.0.attn.to_q"]), str(src))
    rc, _, err = run("--to", "kohya", "--model-type", "flux")
    assert rc == 2 and "not modules of the Flux transformer" in err and "(it reads as a hunyuan-video LoRA" in err


def test_a_file_that_breaks_one_familys_parser_is_that_familys_no_not_a_crash():
    """A kohya Flux single-block linear1 whose B has fewer rows than q, k and v need: the Flux
    parser's fused split says why (it raised a RuntimeError from torch.split), and the families
    that do not read the file are listed with their reasons."""
    import torch
    a, b = torch.zeros(4, 16), torch.zeros(20, 4)   # 20 rows < 3 x 16
    tensors = {"lora_unet_single_blocks_0_linear1.lora_down.weight": a,
               "lora_unet_single_blocks_0_linear1.lora_up.weight": b,
               "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(4.0)}
    fits, why = readers(tensors, "kohya")
    assert "flux" not in fits and "fused LoRA B has 20 rows" in why["flux"], why


@pytest.mark.parametrize("family,src_format,module", [
    ("flux", "kohya", "lora_unet_double_blocks_0_img_attn_qkv"),                # sd-scripts' Flux files
    ("hunyuan-video", "original", "transformer.double_blocks.0.img_attn_qkv"),  # diffusion-pipe's, ComfyUI's
])
def test_a_fused_lora_with_one_shared_a_converts_to_diffusers(tmp_path, capsys, family, src_format, module):
    """Other trainers fuse q, k and v into one LoRA with one A and a dense B (not kubelora's
    block-diagonal layout). Split for diffusers, q, k and v each take that A: the file is written
    (safetensors refused three keys sharing one tensor, and the CLI crashed), and each part's
    update B @ A is its rows of the fused update."""
    from safetensors.torch import load_file
    from kubelora_trainer.cli import main
    g = torch.Generator().manual_seed(1)
    width, rank = 8, 2
    a, b = torch.randn(rank, width, generator=g), torch.randn(3 * width, rank, generator=g)
    down, up = ((".lora_down.weight", ".lora_up.weight") if src_format == "kohya" else (".lora_A.weight", ".lora_B.weight"))
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({module + down: a, module + up: b, **({module + ".alpha": torch.tensor(float(rank))}
                                                     if src_format == "kohya" else {})}, str(src))
    rc = main(["convert", str(src), str(out), "--model-type", family, "--from", src_format, "--to", "diffusers"])
    stdout, err = capsys.readouterr()
    assert rc == 0 and "3 LoRA modules" in stdout, (stdout, err)
    got = load_file(str(out))
    parts = sorted(k[:-len(".lora_A.weight")] for k in got if k.endswith(".lora_A.weight"))
    assert len(parts) == 3, sorted(got)
    fused = b @ a
    deltas = [got[p + ".lora_B.weight"].float() @ got[p + ".lora_A.weight"].float() for p in parts]
    # each part is one third of the fused rows, in some order of the parts' names
    thirds = [fused[i * width:(i + 1) * width] for i in range(3)]
    for d in deltas:
        assert any(torch.allclose(d, t, atol=1e-5) for t in thirds)
