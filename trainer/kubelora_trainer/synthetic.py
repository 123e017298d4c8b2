"""Synthetic media and toy tokenizers shared by the tiny model builders (models/<family>/tiny.py),
the demo, tests and benchmarks: captioned images of coloured shapes, short videos, and CLIP / T5
tokenizers made from written vocabularies. Built offline; nothing is downloaded.
"""
from __future__ import annotations

import random
from pathlib import Path


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    chars = sorted({chr(b) for b in printable} | {chr(256 + i) for i in range(256 - len(printable))})
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")
    return tok, len(vocab)


def tiny_t5_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces += [("\u2581" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    from tokenizers.processors import TemplateProcessing
    tk.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  model_max_length=512)
    return tok, len(pieces)


COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "circle")


def build_synthetic_dataset(out: Path, n: int = 8, size: int = 48, seed: int = 0) -> Path:
    """n captioned images of coloured shapes (PNG + .txt), deterministic."""
    from PIL import Image, ImageDraw

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        color, shape = rng.choice(sorted(COLORS)), SHAPES[i % 2]
        im = Image.new("RGB", (size, size), (245, 245, 245))
        d = ImageDraw.Draw(im)
        a, b = rng.randint(2, size // 4), rng.randint(size // 2, size - 3)
        (d.rectangle if shape == "square" else d.ellipse)((a, a, b, b), fill=COLORS[color])
        im.save(out / f"img{i:03d}.png")
        (out / f"img{i:03d}.txt").write_text(f"a {color} {shape} on a white background")
    return out


def write_video(path: Path, frames, fps: int = 24, codec: str = "mpeg4") -> Path:
    """Encode RGB frames (PIL images, or HxWx3 uint8 arrays) of one size with even sides as a
    video file with PyAV."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = frames[0]
    w, h = first.size if hasattr(first, "size") and not hasattr(first, "shape") else (first.shape[1], first.shape[0])
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            frame = (av.VideoFrame.from_ndarray(f, format="rgb24") if hasattr(f, "shape")
                     else av.VideoFrame.from_image(f.convert("RGB")))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
