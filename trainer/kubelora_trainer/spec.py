"""The LoRATrainingJob spec: one typed model that the CRD is generated from, the operator
validates with and the trainer reads. Imports without torch.

Field names are camelCase as on every Kubernetes resource; the diffusion-pipe option names map
one to one (``transformer_path`` -> ``transformerPath``), and an unknown snake_case field is
answered with its camelCase name.
"""
from __future__ import annotations

import difflib
import posixpath
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .models import FAMILIES

_SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def quantity(text: str) -> float:
    """A Kubernetes quantity ('8', '500m', '16Gi') as a number; ValueError when it is none. Pure."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*(Ki|Mi|Gi|Ti|Pi|[mkMGTP])?\s*", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _SUFFIX.get(m.group(2) or "", 1)


# a Kubernetes quantity as the API server parses one (resource.Quantity): digits, a decimal or
# binary suffix or an exponent
QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$"  # no negatives

GROUP = "kubelora.dev"
VERSION = "v1alpha1"
KIND = "LoRATrainingJob"
PLURAL = "loratrainingjobs"
SHORT_NAME = "ltj"

MODEL_TYPES = tuple(FAMILIES)
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.*|file://.*)$"
URI_HELP = "an s3://bucket/key URI or an absolute local path"
BUCKET_RULE = ("S3 bucket names are 3 to 63 characters: lowercase letters, digits, dots and hyphens, starting and "
               "ending with a letter or digit")


def uri_problem(uri: str) -> Optional[str]:
    """What is wrong with a URI the spec cannot hold (None when URI_PATTERN accepts it): for an s3://
    URI, what breaks the bucket-name rule ("bucket name 'b' has 1 character; S3 bucket names are 3
    to 63 ..."); else what is expected. Pure; the spec's messages and import-config --map use it."""
    if re.match(URI_PATTERN, uri):
        return None
    if not uri.startswith("s3://"):
        return f"expected {URI_HELP}"
    bucket = uri[len("s3://"):].split("/", 1)[0]
    if not bucket:
        return f"no bucket name; {BUCKET_RULE}"
    wrong = []
    if not 3 <= len(bucket) <= 63:
        wrong.append(f"has {len(bucket)} character{'s' if len(bucket) != 1 else ''}")
    if any("A" <= c <= "Z" for c in bucket):
        wrong.append("has uppercase letters")
    others = sorted({c for c in bucket if not ("a" <= c.lower() <= "z" or "0" <= c <= "9" or c in ".-")})
    if others:
        wrong.append("holds " + ", ".join(repr(c) for c in others))
    if bucket[0] in ".-" or bucket[-1] in ".-":
        wrong.append(f"starts or ends with {bucket[0] if bucket[0] in '.-' else bucket[-1]!r}")
    return f"bucket name {bucket!r} {' and '.join(wrong) or 'is not allowed'}; {BUCKET_RULE}"


PATTERN_CHARS = frozenset("\\()[]*+?|^${")


def is_pattern(target: str) -> bool:
    """An adapter.targetModules entry that is a regular expression (any of PATTERN_CHARS), not a
    module name suffix. Pure."""
    return any(c in PATTERN_CHARS for c in target)


class SpecError(ValueError):
    """A manifest that cannot be used; the message names the field path and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True)


def _uri(description: str, **kw: Any) -> Any:
    return Field(description=f"{description} ({URI_HELP}).", pattern=URI_PATTERN, **kw)


class ModelSpec(_Model):
    type: Literal[MODEL_TYPES] = Field(description=f"Model family: {', '.join(MODEL_TYPES)}.")
    diffusersPath: Optional[str] = _uri(
        "Folder in diffusers layout (model_index.json, transformer/ or unet/, vae/, text_encoder*/, tokenizer*/); "
        "flux, sdxl, ltx-video", default=None)
    checkpointPath: Optional[str] = _uri(
        "SDXL single-file checkpoint (e.g. sd_xl_base_1.0.safetensors), instead of diffusersPath", default=None)
    ckptPath: Optional[str] = _uri(
        "HunyuanVideo: folder in the official checkpoint layout (hunyuan-video-t2v-720p/, text_encoder/, text_encoder_2/)",
        default=None)
    transformerPath: Optional[str] = _uri(
        "Single-file transformer: Flux BFL .safetensors (overrides the diffusers one), HunyuanVideo ComfyUI file "
        "(bf16, or fp8 e4m3fn: upcast to model.dtype when loaded, unless model.transformerDtype: float8 keeps the "
        "frozen weights in fp8), Cosmos .pt", default=None)
    vaePath: Optional[str] = _uri("VAE file: hunyuan-video (ComfyUI layout), cosmos", default=None)
    llmPath: Optional[str] = _uri("HunyuanVideo: folder with the llava-llama-3 text encoder and tokenizer", default=None)
    clipPath: Optional[str] = _uri("HunyuanVideo: CLIP-L text encoder folder", default=None)
    textEncoderPath: Optional[str] = _uri("Cosmos: a folder holding the T5 encoder (a .safetensors file such as ComfyUI's "
                                          "oldt5_xxl_fp16.safetensors, or a transformers folder) and the google-t5/t5-11b "
                                          "tokenizer (spiece.model or tokenizer.json, beside it or in tokenizer/)",
                                          default=None)
    dtype: Literal["bfloat16", "float32"] = Field(
        default="bfloat16", description="Storage and compute dtype of the frozen base weights. float16 is not "
                                        "offered: it needs loss scaling, which kubelora does not do.")
    transformerDtype: Optional[Literal["float8"]] = Field(
        default=None, description="float8: store the frozen linears of the denoiser's blocks once in float8 e4m3 "
                                  "(one scale per row; half the weight memory of bfloat16) and run them as fp8 GEMMs "
                                  "(model.float8Compute); the family's sensitive ones (modulation and norm projections) are "
                                  "stored in float8 too but multiply in model.dtype. Embedders and final layers (outside "
                                  "the blocks) stay in model.dtype. Unset: the denoiser is stored in model.dtype.")
    float8Compute: Optional[Literal["fp8", "fp8_transposed", "dequant"]] = Field(
        default=None, description="With transformerDtype float8: fp8 (default) runs the forward and input-gradient "
                                  "GEMMs in fp8 (inputs quantized per row; GPUs with fp8 tensor cores, Ada/Hopper "
                                  "and newer; elsewhere dequant is used with a warning); fp8_transposed also stores "
                                  "each weight transposed, so the backward transposes nothing (weight memory as "
                                  "bfloat16; not yet measured faster, see docs/benchmarks.md); dequant multiplies "
                                  "with the weight dequantized to model.dtype (memory savings only, diffusion-pipe's "
                                  "transformer_dtype float8).")
    fluxShift: bool = Field(
        default=False, description="Flux: shift sampled timesteps by image resolution as the Flux schedule does.")
    bypassGuidanceEmbedding: bool = Field(
        default=False, description="Flux: ignore the guidance embedding (for de-distilled / Flex-style models).")
    guidance: Optional[float] = Field(
        default=None, ge=0.0, le=30.0,
        description="Flux: guidance value fed to the guidance embedding while training (default 1.0).")
    causalTemporalPositioning: Optional[bool] = Field(
        default=None, description="LTX-Video: place latent frame f at max(0, 8f-7) frames in the rotary positions, as "
                                  "the original pipeline (and diffusion-pipe, ComfyUI, diffusers' LTXConditionPipeline) "
                                  "does for checkpoints whose config sets causal_temporal_positioning (0.9.5 and later); "
                                  "false: at 8f (0.9.0, 0.9.1; diffusers' LTXPipeline). Unset: from the checkpoint, "
                                  "true when its VAE is the 0.9.5+ one (LTXVideo095DownBlock3D, how diffusers tells the "
                                  "versions apart). Images (one frame) are unaffected.")
    vPred: bool = Field(default=False, description="SDXL: true trains as v-prediction. False (the default): what the "
                                                   "checkpoint says (its v_pred key, or the diffusers scheduler's "
                                                   "prediction_type v_prediction), else epsilon; the log names the "
                                                   "objective used.")
    zeroTerminalSnr: Optional[bool] = Field(
        default=None, description="SDXL: rescale the noise schedule to zero terminal SNR (as NoobAI v-pred and other "
                                  "v-prediction fine-tunes were trained). Default: what the checkpoint says (its "
                                  "ztsnr key, or the diffusers scheduler's rescale_betas_zero_snr).")
    minSnrGamma: Optional[float] = Field(
        default=None, gt=0, description="SDXL: Min-SNR loss weighting gamma (e.g. 5); off when unset. The SNR is "
        "the checkpoint's schedule before any zero-terminal-SNR rescale, as in sd-scripts and diffusion-pipe.")


CAPTION_FIELDS = ("captionExtension", "captionPrefix", "shuffleTags", "shuffleVariants", "keepTags", "tagDelimiter",
                  "captionDropout", "missingCaption")


MASK_HELP = ("Folder of loss masks (diffusion-pipe's mask_path): an item's mask is the image with its stem in the "
             "same relative folder, the size of the item; its red channel weighs the loss (white trains, black is "
             "ignored). Items without one train unmasked")


class SourceSpec(_Model):
    """One folder of training media; unset options take the dataset's."""
    uri: str = _uri("Folder of images (and, for video families, videos) with captions")
    repeats: int = Field(default=1, ge=1, le=10000, description="How many times each item of this source is seen per epoch.")
    maskUri: Optional[str] = _uri(MASK_HELP, default=None)
    resolutions: Optional[list[int]] = Field(
        default=None, min_length=1, max_length=16,
        description="Override of dataset.resolutions for this source (areas given as square side lengths).")
    frameBuckets: Optional[list[int]] = Field(
        default=None, min_length=1, max_length=32, description="Override of dataset.frameBuckets for this source.")
    missingCaption: Optional[Literal["skip", "empty"]] = Field(default=None, description="Override of dataset.missingCaption.")
    captionExtension: Optional[str] = Field(default=None, pattern=r"^\.[A-Za-z0-9]+$",
                                            description="Override of dataset.captionExtension.")
    captionPrefix: Optional[str] = Field(default=None, max_length=1000, description="Override of dataset.captionPrefix.")
    shuffleTags: Optional[bool] = Field(default=None, description="Override of dataset.shuffleTags.")
    shuffleVariants: Optional[int] = Field(default=None, ge=1, le=64, description="Override of dataset.shuffleVariants.")
    keepTags: Optional[int] = Field(default=None, ge=0, le=1000, description="Override of dataset.keepTags.")
    tagDelimiter: Optional[str] = Field(default=None, min_length=1, max_length=8, description="Override of dataset.tagDelimiter.")
    captionDropout: Optional[float] = Field(default=None, ge=0.0, le=1.0, description="Override of dataset.captionDropout.")
    recursive: Optional[bool] = Field(default=None, description="Override of dataset.recursive.")


class DatasetSpec(_Model):
    uri: Optional[str] = _uri("Folder of images (and, for video families, videos) with same-stem .txt captions; "
                              "shorthand for one entry of dataset.sources (set exactly one of the two)", default=None)
    sources: Optional[list[SourceSpec]] = Field(
        default=None, min_length=1, max_length=64,
        description="Several folders, each with its own repeats and optional size, frame and caption overrides "
                    "(diffusion-pipe's [[directory]] entries). Set exactly one of dataset.uri and dataset.sources.")
    recursive: bool = Field(
        default=True, description="Read the items of each source's subfolders too. false: only the folder's own files, "
                                  "as diffusion-pipe and kohya read a folder (import-config sets it).")
    resolution: int = Field(
        default=512, ge=16, le=4096, multiple_of=16,
        description="Training resolution in pixels: square side, unless width and height are set. Multiple of 16. "
                    "Shorthand for resolutions: [resolution].")
    resolutions: Optional[list[int]] = Field(
        default=None, min_length=1, max_length=16,
        description="Training areas given as square side lengths (diffusion-pipe's resolutions): 512 means 512*512 "
                    "pixels, in the shape of each item's aspect-ratio bucket when enableArBucket is on (square "
                    "otherwise). Every item is trained at each of them. Replaces resolution.")
    width: Optional[int] = Field(default=None, ge=16, le=4096, multiple_of=16,
                                 description="Training width in pixels (with height; overrides resolution).")
    height: Optional[int] = Field(default=None, ge=16, le=4096, multiple_of=16,
                                  description="Training height in pixels (with width; overrides resolution).")
    enableArBucket: bool = Field(
        default=False, description="Aspect-ratio buckets: each item goes to the bucket nearest its aspect ratio (in "
                                   "log space), is resized to cover it and centre-cropped; every micro-batch comes "
                                   "from one bucket. Off: every item is resized to cover a square and centre-cropped.")
    minAr: float = Field(default=0.5, gt=0.0, le=1.0, description="Narrowest bucket's width/height (with enableArBucket).")
    maxAr: float = Field(default=2.0, ge=1.0, le=100.0, description="Widest bucket's width/height (with enableArBucket).")
    numArBuckets: int = Field(default=7, ge=1, le=64,
                              description="Aspect-ratio buckets, spaced evenly in log space from minAr to maxAr.")
    frames: Optional[int] = Field(
        default=None, ge=1, le=1024,
        description="Frames per training clip for video families (ltx-video 8k+1, hunyuan-video 4k+1, cosmos 1 or 121); "
                    "shorthand for frameBuckets: [frames]. Images are 1-frame clips.")
    frameBuckets: Optional[list[int]] = Field(
        default=None, min_length=1, max_length=32,
        description="Video families: clip lengths in frames (at the family's training frame rate); each video goes "
                    "to the longest bucket not longer than it, images to 1 (always added). Replaces frames.")
    videoClipMode: Literal["single_beginning", "single_middle", "multiple_overlapping"] = Field(
        default="single_beginning",
        description="Which frames of a longer video make its clip: one from the start, one from the middle, or "
                    "several overlapping clips spread evenly over the whole video (none of it cut off).")
    repeats: int = Field(default=1, ge=1, le=10000, description="How many times each item is seen per epoch (with dataset.uri).")
    maskUri: Optional[str] = _uri(MASK_HELP + ". With dataset.uri; with dataset.sources, set it per source",
                                  default=None)
    missingCaption: Literal["skip", "empty"] = Field(
        default="skip", description="Image without a caption file: skip it, or train it with an empty caption "
                                    "(captionPrefix still put before it: the trigger word alone). Counted either way.")
    captionExtension: str = Field(default=".txt", pattern=r"^\.[A-Za-z0-9]+$",
                                  description="Caption file extension (same stem as the media file). A captions.json "
                                              "({file name: caption or [captions]}) or captions.jsonl ({\"file\": ..., "
                                              "\"caption\": ...} per line) in the folder takes precedence.")
    captionPrefix: str = Field(
        default="", max_length=1000,
        description="Text put before every caption exactly as written (include a trailing space or comma if wanted), "
                    "e.g. a trigger word.")
    shuffleTags: bool = Field(default=False, description="Shuffle the caption's tags (split on tagDelimiter); "
                                                         "shuffleVariants shuffled orders are cached per item.")
    shuffleVariants: int = Field(default=4, ge=1, le=64,
                                 description="With shuffleTags: how many shuffled captions are encoded per item "
                                             "(diffusion-pipe's cache_shuffle_num); one is drawn per sample.")
    keepTags: int = Field(default=0, ge=0, le=1000, description="With shuffleTags: the first N tags keep their place.")
    tagDelimiter: str = Field(default=", ", min_length=1, max_length=8, description="What separates tags in a caption.")
    captionDropout: float = Field(default=0.0, ge=0.0, le=1.0,
                                  description="Probability that a sample trains with an empty caption (seeded).")
    cacheOnly: bool = Field(
        default=False,
        description="Build the latent and text-embedding cache on the nodes' cache volume (resources.cacheVolumeClaim) "
                    "and stop successfully without training; manifest.json then says cacheOnly: true. A later job on "
                    "the same data and model skips encoding and loads neither the VAE nor the text encoders.")
    cacheUri: Optional[str] = _uri(
        "A prefix the latent cache is shared through, so that a job on another node pool or cluster skips encoding: "
        "before encoding, the entries (and media probes) missing on every node that are found under it are "
        "downloaded; after encoding, the new ones are uploaded. One LIST of the prefix per run; it must be "
        "writable (checked before stage-in). A failed download or upload is a warning (those entries are encoded "
        "here, or not shared), never a failed run. Entries are keyed by content, so jobs on other data or models "
        "can share one prefix", default=None)

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, v):
        if v is not None and any(r < 16 or r > 4096 or r % 16 for r in v):
            raise ValueError("each resolution is a square side in pixels, 16..4096 and a multiple of 16")
        return v

    @model_validator(mode="after")
    def _one_form(self) -> "DatasetSpec":
        if (self.uri is None) == (self.sources is None):
            raise ValueError("dataset: set exactly one of dataset.uri (one folder) and dataset.sources (several)")
        # compared with the defaults, not model_fields_set: the API server fills defaults in before the operator reads
        if self.sources is not None and self.repeats != 1:
            raise ValueError("dataset.repeats: with dataset.sources, set repeats on each source")
        if self.sources is not None and self.maskUri is not None:
            raise ValueError("dataset.maskUri: with dataset.sources, set maskUri on each source that has masks")
        for where, data, mask in self._mask_pairs():
            if mask.rstrip("/") == data.rstrip("/"):
                raise ValueError(f"{where}.maskUri: the masks need a folder of their own (each would be its own "
                                 f"image's mask and be trained as an item): move them, e.g. to {data.rstrip('/')}/masks")
        if self.resolutions is not None and self.resolution != 512:
            raise ValueError("dataset.resolution and dataset.resolutions: set one (resolution: N is resolutions: [N])")
        if self.frameBuckets is not None and self.frames is not None:
            raise ValueError("dataset.frames and dataset.frameBuckets: set one (frames: N is frameBuckets: [N])")
        if self.width is not None and (self.resolutions is not None or
                                       self.resolution != type(self).model_fields["resolution"].default):
            field = "resolutions" if self.resolutions is not None else "resolution"
            raise ValueError(f"dataset.{field}: dataset.width/height fix the one training size, so {field} would be "
                             "ignored; remove one of them")
        if self.enableArBucket and self.width is not None:
            raise ValueError("dataset.width/height fix one size, which aspect-ratio buckets would ignore: remove them "
                             "or dataset.enableArBucket")
        if self.enableArBucket and self.minAr > self.maxAr:
            raise ValueError("dataset.minAr exceeds dataset.maxAr")
        for f in ("minAr", "maxAr", "numArBuckets"):
            if not self.enableArBucket and getattr(self, f) != type(self).model_fields[f].default:
                raise ValueError(f"dataset.{f} applies only with enableArBucket: true; set that too or remove it")
        for f in ("shuffleVariants", "keepTags", "tagDelimiter"):
            # the dataset's value reaches the sources that shuffle tags and leave the field unset
            own = [(s.shuffleTags, getattr(s, f)) for s in self.sources] if self.sources else [(None, None)]
            reached = any((shuffles if shuffles is not None else self.shuffleTags) and value is None
                          for shuffles, value in own)
            if getattr(self, f) != type(self).model_fields[f].default and not reached:
                shuffled = self.shuffleTags or any(s.shuffleTags for s in self.sources or ())
                raise ValueError(f"dataset.{f} applies only with shuffleTags: true; set that too or remove it"
                                 if not shuffled else
                                 f"dataset.{f} applies to no source (none that shuffles tags leaves {f} unset); "
                                 "remove it")
        if self.cacheUri is not None:
            cache = self.cacheUri.rstrip("/")
            for field, u in self.uri_fields().items():
                data = u.rstrip("/")
                if cache == data or cache.startswith(data + "/") or data.startswith(cache + "/"):
                    raise ValueError(f"dataset.cacheUri ({self.cacheUri}) and {field} ({u}) overlap: the cache would be "
                                     f"staged as training data, or the data pushed as cache; use a prefix of its own")
        for i, s in enumerate(self.sources or ()):
            shuffles = s.shuffleTags if s.shuffleTags is not None else self.shuffleTags
            for f in ("shuffleVariants", "keepTags", "tagDelimiter"):
                if getattr(s, f) is not None and not shuffles:
                    raise ValueError(f"dataset.sources[{i}].{f} applies only with shuffleTags: true (on the source or "
                                     "the dataset); set that too or remove it")
            if s.resolutions is not None and self.width is not None:
                raise ValueError(f"dataset.sources[{i}].resolutions: dataset.width/height fix one size for every source; "
                                 "remove one of them")
            if s.resolutions is not None and any(r < 16 or r > 4096 or r % 16 for r in s.resolutions):
                raise ValueError(f"dataset.sources[{i}].resolutions: each is a square side in pixels, 16..4096 and a "
                                 "multiple of 16")
        return self

    @property
    def uris(self) -> list[str]:
        """Every source's URI (dataset.uri alone in the shorthand form)."""
        return [self.uri] if self.uri is not None else [s.uri for s in self.sources]

    @property
    def mask_uris(self) -> list[Optional[str]]:
        """Every source's mask folder URI, None where it has none (in the order of uris)."""
        return [self.maskUri] if self.uri is not None else [s.maskUri for s in self.sources]

    def uri_fields(self) -> dict[str, str]:
        """{field path: URI} of every dataset folder, masks included (for messages that name the field)."""
        if self.uri is not None:
            return {"dataset.uri": self.uri, **({"dataset.maskUri": self.maskUri} if self.maskUri else {})}
        return {f"dataset.sources[{i}].{f}": u for i, s in enumerate(self.sources)
                for f, u in (("uri", s.uri), ("maskUri", s.maskUri)) if u}

    def _mask_pairs(self) -> list[tuple[str, str, str]]:
        if self.uri is not None:
            return [("dataset", self.uri, self.maskUri)] if self.maskUri else []
        return [(f"dataset.sources[{i}]", s.uri, s.maskUri) for i, s in enumerate(self.sources or ()) if s.maskUri]


class AdapterSpec(_Model):
    type: Literal["lora", "full"] = Field(
        default="lora", description="lora: low-rank adapters on a frozen base. full: every weight of the denoiser "
                                    "(transformer or UNet) is trained (fp32 master weights; training.sharding decides "
                                    "whether ranks replicate or FSDP2-shard them; checkpoints then hold every weight and "
                                    "two AdamW moments, about 12 bytes per parameter), exported as a diffusers folder and as the "
                                    "family's native single file of the denoiser alone (flux: BFL layout; sdxl: the UNet "
                                    "as model.diffusion_model.*, no VAE or text encoders; ltx-video, hunyuan-video, cosmos: "
                                    "the original release's layout; docs/formats.md); rank, alpha, dropout and "
                                    "targetModules do not apply.")
    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r.")
    alpha: Optional[float] = Field(
        default=None, gt=0, description="LoRA alpha; the update is scaled by alpha/rank. Defaults to the rank (scale 1).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targetModules: Optional[list[str]] = Field(
        default=None, min_length=1,
        description="Module name suffixes to adapt (attn.to_q adapts every module whose name ends so); an entry holding "
                    "any of \\ ( ) [ ] * + ? | ^ $ { is a regular expression matched against the whole module name "
                    "(as peft's target_modules string). Defaults to the family's attention and MLP linears. Applies to the "
                    "denoiser (transformer or UNet); SDXL's text encoders keep their default targets. An entry that "
                    "matches no linear layer is refused.")

    initFrom: Optional[str] = _uri(
        "A LoRA to start from instead of zero (diffusion-pipe's init_from_existing; kohya's network_weights): a "
        ".safetensors file, or a folder holding exactly one, in any LoRA format of model.type that `kubelora convert` "
        "reads (e.g. a LoRA this or another trainer exported). Its rank must equal adapter.rank and each of its modules "
        "must be a target; targets it lacks start from zero, with a warning. Its scale is kept: the update it makes "
        "at step 0 is the file's, whatever adapter.alpha is. Read at the start only (a resume takes the checkpoint's)",
        default=None)

    @field_validator("targetModules")
    @classmethod
    def _targets_compile(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        for i, entry in enumerate(v or ()):
            if is_pattern(entry):
                try:
                    re.compile(f"(?:{entry})")  # as lora.peft_targets joins it (a global flag must come first)
                except re.error as e:
                    raise ValueError(f"entry {i}, {entry!r}, is not a regular expression ({e})") from None
        return v

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


class TrainingSpec(_Model):
    steps: int = Field(default=1000, ge=1, le=10_000_000, description="Optimizer steps to train.")
    learningRate: float = Field(default=1e-4, gt=0, le=1.0, description="Peak AdamW learning rate.")
    textEncoderLearningRate: Optional[float] = Field(
        default=None, ge=0, le=1.0,
        description="Learning rate for text-encoder LoRA in families that train the text encoders (SDXL); defaults to "
                    "learningRate. 0: no LoRA on the text encoders (the denoiser alone is trained), as diffusion-pipe's "
                    "text_encoder_1_lr = text_encoder_2_lr = 0.")
    lrScheduler: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="Schedule after warmup: constant, linear or cosine down towards 0, which it reaches "
                                      "just after the last step (as diffusers' schedules do).")
    warmupSteps: int = Field(default=0, ge=0, description="Linear warmup to learningRate over this many steps "
                                                          "(step k of N runs at k/N of it).")
    weightDecay: float = Field(default=0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    betas: list[float] = Field(default=[0.9, 0.99], min_length=2, max_length=2, description="AdamW betas.")
    epsilon: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    maxGradNorm: Optional[float] = Field(default=1.0, gt=0, description="Clip the gradient norm to this; null disables clipping.")
    microBatchSize: int = Field(default=1, ge=1, le=1024, description="Samples per rank per forward pass.")
    gradientAccumulationSteps: int = Field(default=1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    seed: int = Field(default=42, ge=0, description="Seed for sampling, noise and LoRA init.")
    timestepSampling: Literal["logit_normal", "uniform"] = Field(
        default="logit_normal", description="How flow-matching timesteps are drawn (flux, ltx-video, hunyuan-video; "
                                            "sdxl and cosmos draw their noise levels their own way and refuse "
                                            "another value).")
    sigmoidScale: float = Field(
        default=1.0, gt=0.0, le=100.0, description="With timestepSampling logit_normal: t = sigmoid(sigmoidScale x a "
                                                   "standard normal draw); above 1 spreads t towards 0 and 1 "
                                                   "(diffusion-pipe's sigmoid_scale).")
    timestepShift: Optional[float] = Field(
        default=None, gt=0.0, le=100.0,
        description="Shift each sampled t towards noise by a constant: shift t / (1 + (shift - 1) t), the same at "
                    "every resolution (diffusion-pipe's shift; flux, ltx-video, hunyuan-video). Flux: instead of "
                    "model.fluxShift.")
    logEvery: int = Field(default=1, ge=1, description="Log progress every N steps.")
    gradientCheckpointing: Optional[bool] = Field(
        default=None,
        description="Recompute block activations in backward: much less memory, ~30% more compute for the blocks "
                    "recomputed. true: every block (or one in gradientCheckpointingEvery); false: none. Unset: chosen "
                    "per run on a GPU: one forward of the largest micro-batch measures what each block keeps for "
                    "backward, and the fewest blocks are recomputed that keep the predicted peak within 92% of the "
                    "GPU's memory less 1 GiB (or training.memoryBudgetGiB); with sharding auto, weights "
                    "are sharded when even recomputing every block would not fit. None on a CPU; every block with "
                    "cpuOffload.")
    memoryBudgetGiB: Optional[float] = Field(
        default=None, gt=0, le=4096,
        description="With gradientCheckpointing unset: the GPU memory (GiB per GPU) the memory plan may use, "
                    "when less than the default 92% of the GPU's memory less 1 GiB (a GPU shared with another "
                    "process, a MIG slice, or memory kept free): fewer activations kept, more blocks recomputed. "
                    "A larger value than the default is lowered to it (a warning). On a CPU, which has no limit "
                    "known, setting it makes the plan run with it. Refused with gradientCheckpointing set or "
                    "cpuOffload, which plan nothing.")
    gradientCheckpointingEvery: int = Field(
        default=1, ge=1, le=64,
        description="With gradientCheckpointing, checkpoint one repeated block in N (selective by block, as "
                    "torchtitan's selective_ac_option): 1 checkpoints every block; 2 every other block, keeping "
                    "about half the activations for about half the recompute.")
    compile: Optional[bool] = Field(
        default=None, description="torch.compile each transformer block (regional compile; the first steps take a "
                                  "minute or more to compile). Unset: on for NVIDIA GPUs of compute capability 8.0 "
                                  "(Ampere) and newer, where it measured 1.8x faster (docs/benchmarks.md) and is what "
                                  "makes fp8 pay, a block that fails to compile then running eagerly; off on CPU, on "
                                  "older GPUs, with training.cpuOffload (not measured on a GPU yet) and where the "
                                  "image lacks a C compiler or Python's headers (a warning says so).")
    attentionBackend: Literal["auto", "flash", "cudnn"] = Field(
        default="auto", description="The attention kernel on NVIDIA GPUs (no effect on CPU: a warning). cudnn: "
                                    "cuDNN's fused attention (on an H100 about half the flash kernels' time; a Flux "
                                    "fp8 step 1.11x faster, docs/benchmarks.md); flash: cuDNN's kernel off, torch "
                                    "runs flash attention (its memory-efficient kernel where a mask is passed). auto: "
                                    "cudnn for LoRA training with compiled blocks on Hopper GPUs (compute capability "
                                    "9.x), flash elsewhere (eager blocks, a full fine-tune's eager attention outside "
                                    "the blocks: cuDNN's backward crashed the eager Flux step on an H100). Set flash "
                                    "if a run's loss turns NaN with cuDNN (known cuDNN backward bugs with attention "
                                    "masks).")
    sharding: Literal["auto", "replicate", "shard"] = Field(
        default="auto", description="How several ranks hold the model. replicate: a full copy on every GPU, and only "
                                    "the adapters' gradients travel (one all-reduce per optimizer step); shard: FSDP2 "
                                    "splits every weight across ranks and gathers each block's weights in every "
                                    "forward and backward (for bases that do not fit one GPU). auto: replicate when "
                                    "what is held takes at most half of one GPU's memory (the weights; for a full "
                                    "fine-tune 4x: weights, gradients and AdamW's two moments), else shard; with "
                                    "training.gradientCheckpointing unset, by the memory plan: replicate whenever it "
                                    "fits, else whichever of the two has the lower predicted peak.")
    cpuOffload: bool = Field(
        default=False,
        description="Keep the trained model's weights (and their gradients and optimizer state) in CPU memory and "
                    "bring each block to the GPU only for its forward and backward (FSDP2's CPUOffloadPolicy; with "
                    "one process too), for a model larger than the GPU's memory. Slower: every step copies the "
                    "weights over PCIe. The model is loaded into CPU memory, never whole onto the GPU. Implies "
                    "sharding: shard.")
    checkpointEverySteps: Optional[int] = Field(
        default=None, ge=1, description="Write a training-state checkpoint (adapters, optimizer, sampler, RNG) every N "
                                        "steps to output.uri/checkpoints/; the next run of the manifest resumes from it.")
    checkpointEveryMinutes: Optional[float] = Field(
        default=30.0, gt=0, description="Also write one when this many minutes passed since the last (null: never by "
                                        "time). A checkpoint is always written when the run is told to stop (SIGTERM, "
                                        "SIGINT), and at the last step of a LoRA run (so a failed export or upload "
                                        "is retried without training again).")
    checkpointKeep: int = Field(default=2, ge=1, le=100, description="Complete checkpoints kept; older ones are deleted.")

    @model_validator(mode="after")
    def _checkpointing(self) -> "TrainingSpec":
        if self.cpuOffload and self.sharding == "replicate":
            raise ValueError("training.cpuOffload keeps the weights in CPU memory through FSDP2, which shards them: "
                             "set training.sharding to auto or shard, or remove cpuOffload")
        if self.gradientCheckpointingEvery != 1 and self.gradientCheckpointing is not True:
            raise ValueError("training.gradientCheckpointingEvery picks which blocks gradientCheckpointing recomputes: "
                             "set training.gradientCheckpointing: true, or remove gradientCheckpointingEvery")
        return self

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must be in [0, 1), e.g. [0.9, 0.99]")
        return v


class OutputSpec(_Model):
    uri: str = _uri("Where the LoRA file, manifest.json and checkpoints are written")
    name: str = Field(default="lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$",
                      description="File name stem of the exported LoRA (<name>.safetensors).")
    formats: Optional[list[Literal["diffusers", "kohya", "comfyui", "original"]]] = Field(
        default=None, min_length=1, max_length=4,
        description="LoRA files to write: the first is <name>.safetensors, others <name>.<format>.safetensors. "
                    "Default: the family's community format (sdxl kohya, flux diffusers, ltx-video comfyui, "
                    "hunyuan-video original, cosmos comfyui).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype of the tensors in the LoRA files (diffusion-pipe's save_dtype; bfloat16 "
                                       "or float16 halve the file, as most shared LoRAs are; the .alpha scalars stay "
                                       "float32, exact). The checkpoints keep "
                                       "float32. Not for adapter.type full, whose files take model.dtype.")
    onExisting: Literal["resume", "fail", "overwrite"] = Field(
        default="resume", description="When output.uri already holds checkpoints or a finished run: "
                                      "resume from the newest checkpoint (and do nothing if the run finished; "
                                      "refused when the checkpoints were trained with other settings), fail, or "
                                      "overwrite (delete the old checkpoints, train from step 1). Under the "
                                      "operator this is about another job's output: a retry of the same "
                                      "LoRATrainingJob (after a preemption or a crash) always resumes its own "
                                      "checkpoints and keeps its own finished result.")


class StorageSpec(_Model):
    endpoint: Optional[str] = Field(
        default=None, pattern=r"^https?://[^\s/]+(/.*)?$",
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph...). Default: AWS, or AWS_ENDPOINT_URL.")
    region: Optional[str] = Field(default=None, description="S3 region. Default: AWS_REGION / AWS_DEFAULT_REGION or us-east-1.")
    addressingStyle: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="S3 addressing; auto means path-style when an endpoint is set (MinIO), virtual otherwise.")
    credentialsSecret: Optional[str] = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of a Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN), "
                    "in the job's namespace: the trainer pods get these three keys, each by name (no other key of the "
                    "Secret reaches them; endpoint and region go in storage.endpoint/region). Never put keys in the spec.")


QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


# typed (not a free dict) so that a misspelt field or value is refused at apply (against the CRD) or
# by parse_spec, rather than dropped by the API server when the operator makes the Job, which would
# leave the pods Pending on a taint they were meant to take
class Toleration(_Model):
    """A pod toleration (core/v1 Toleration)."""
    # "" as Kubernetes reads it (and Helm and `kubectl get -o yaml` write it): unset
    key: Optional[str] = Field(default=None, max_length=316,
                               pattern=r"^(([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$",
                               description="The taint key; empty with operator Exists: every taint.")
    operator: Optional[Literal["Exists", "Equal", ""]] = Field(default=None,
                                                               description="Exists or Equal (the default).")
    value: Optional[str] = Field(default=None, max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
                                 description="The taint value, with operator Equal (a label value).")
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""]] = Field(
        default=None, description="The taint effect to tolerate; empty: all effects.")
    tolerationSeconds: Optional[int] = Field(default=None, description="With effect NoExecute: how long the pod "
                                                                        "stays bound after the taint is added.")

    @model_validator(mode="after")
    def _rules(self) -> "Toleration":   # the API server's ValidateTolerations
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key needs operator: Exists (it tolerates every taint)")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds applies to effect NoExecute only")
        return self


class ResourcesSpec(_Model):
    nodes: int = Field(default=1, ge=1, le=512, description="Number of nodes (pods), one torchrun agent each.")
    gpusPerNode: int = Field(default=1, ge=0, le=16, description="GPUs per node = training processes per node; 0 trains on CPU.")
    gpuResource: str = Field(
        default="nvidia.com/gpu", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="The extended resource each pod requests gpusPerNode of: nvidia.com/gpu, or a MIG profile such as "
                    "nvidia.com/mig-3g.40gb (the NVIDIA device plugin's mixed strategy).")
    serviceAccountName: Optional[str] = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="The trainer pods' ServiceAccount, for AWS IRSA or EKS Pod Identity to reach S3 instead of "
                    "storage.credentialsSecret (boto3 finds those credentials itself; the pods still mount no "
                    "Kubernetes API token). GKE and Azure workload identity give no S3 credentials: GCS's S3 "
                    "interface needs HMAC keys in a credentialsSecret. Default: the namespace's default ServiceAccount.")
    image: Optional[str] = Field(default=None, description="Trainer image; defaults to the operator's configured image.")
    requests: dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN)]] = Field(
        default_factory=dict, description="Extra container resource requests (cpu, memory, ...), as Kubernetes "
                                          "quantities (8, 500m, 64Gi).")
    limits: dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN)]] = Field(
        default_factory=dict, description="Extra container resource limits, as Kubernetes quantities; each at least "
                                          "its request.")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Pod tolerations.")
    priorityClassName: Optional[str] = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253,
                                             description="Pod priorityClassName.")
    schedulerName: Optional[str] = Field(default=None, description="Pod schedulerName (e.g. for gang scheduling).")
    cacheVolumeClaim: Optional[str] = Field(
        default=None, description="PVC for the model/data cache; an emptyDir when unset.")
    cacheSize: Optional[str] = Field(
        default=None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$",
        description="Size of each pod's own cache (the emptyDir used without cacheVolumeClaim: the staged-in model, "
                    "the captions, the node's share of the media (about 1/nodes) and the latent cache), e.g. 200Gi: "
                    "the emptyDir's sizeLimit and an ephemeral-storage request of that much, so the scheduler places "
                    "the pod on a node with that much local disk instead of the kubelet evicting it when the disk "
                    "fills (a cache over the size is evicted too, with a message naming it; the trainer refuses inputs "
                    "larger than what is left of it before fetching them). Unset: no limit and no request.")
    podAnnotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations on the trainer pods, e.g. karpenter.sh/do-not-disrupt: \"true\" (Karpenter's "
                    "consolidation and drift then leave a running job's nodes alone) or "
                    "cluster-autoscaler.kubernetes.io/safe-to-evict: \"false\".")

    @field_validator("podAnnotations")
    @classmethod
    def _annotation_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            prefix, _, name = key.rpartition("/")
            if not (QUALIFIED_NAME.fullmatch(name) and len(name) <= 63
                    and (not prefix or (DNS_SUBDOMAIN.fullmatch(prefix) and len(prefix) <= 253))):
                raise ValueError(f"{key!r} is not an annotation key: [prefix/]name, the name at most 63 letters, "
                                 "digits, '-', '_' or '.' (alphanumeric at both ends), the prefix a DNS subdomain")
        return v


class RunPolicySpec(_Model):
    backoffLimit: int = Field(default=3, ge=0, le=100, description="Retries of the whole run after a failure (all nodes restart together; disruptions such as preemption do not count).")
    activeDeadlineSeconds: Optional[int] = Field(default=None, ge=1, description="Limit in seconds on the time the run's trainer Jobs run (as the Job controller counts it: not while suspended or queued), summed over gang restarts: a Job made again gets only what is left, and once it is spent the job fails (DeadlineExceeded).")
    ttlSecondsAfterFinished: Optional[int] = Field(default=None, ge=0, description="Delete the job's children this long after it finished (the resource and its status stay).")
    terminationGracePeriodSeconds: int = Field(
        default=120, ge=1, le=3600,
        description="Time each pod gets after SIGTERM (preemption, eviction, drain, suspend) to finish its step and "
                    "write the checkpoint before it is killed; the pods' terminationGracePeriodSeconds. Kubernetes' "
                    "default of 30 s can cut a long step or a large checkpoint short (a node's own shutdown, e.g. a "
                    "spot reclaim, may allow less whatever this says).")
    suspend: bool = Field(
        default=False, description="Suspend (or keep suspended) the job: its pods stop (the trainer checkpoints on "
                                   "SIGTERM) and resume from the newest checkpoint when set back to false. The only "
                                   "field that may change after creation. Not applied to a job submitted to Kueue "
                                   "(label kueue.x-k8s.io/queue-name): Kueue owns the trainer Job's suspension "
                                   "(it starts the Job when it admits it); hold such a job through Kueue "
                                   "(docs/kueue.md).")


class SamplePromptSpec(_Model):
    prompt: str = Field(min_length=1, max_length=2000, description="Text of the sample.")
    negativePrompt: Optional[str] = Field(
        default=None, max_length=2000, description="What to steer away from (families with classifier-free "
                                                   "guidance: sdxl, ltx-video, cosmos). Default: samples.negativePrompt "
                                                   "(cosmos: its pipeline's default negative prompt).")
    seed: Optional[int] = Field(default=None, ge=0, description="Noise seed. Default: samples.seed.")
    width: Optional[int] = Field(default=None, ge=16, le=4096, multiple_of=16,
                                 description="Width in pixels (with height). Default: samples.width, else the dataset's.")
    height: Optional[int] = Field(default=None, ge=16, le=4096, multiple_of=16,
                                  description="Height in pixels (with width). Default: samples.height, else the dataset's.")
    frames: Optional[int] = Field(default=None, ge=1, le=1024,
                                  description="Video families: frames. Default: samples.frames, else the dataset's.")
    guidance: Optional[float] = Field(default=None, ge=0.0, le=30.0,
                                      description="Guidance scale (flux, hunyuan-video: the embedded guidance; the "
                                                  "others: classifier-free, on above 1). Default: samples.guidance, "
                                                  "else the family's.")
    steps: Optional[int] = Field(default=None, ge=1, le=500,
                                 description="Denoising steps. Default: samples.steps, else the family's.")


def _family_defaults(what: str) -> str:
    from .families import RULES
    return ", ".join(f"{t} {getattr(r.sampling, what):g}" for t, r in RULES.items() if r.sampling is not None)


class SamplesSpec(_Model):
    prompts: list[SamplePromptSpec] = Field(min_length=1, max_length=64, description="The samples to make at each "
                                            "sample step (the per-prompt settings override the defaults below).")
    everySteps: Optional[int] = Field(default=None, ge=1, description="Sample every N training steps.")
    atStart: bool = Field(default=True, description="Sample before the first step (the base model, for comparison; with "
                                                    "adapter.initFrom, the starting adapter); not on a resume, which lists the samples "
                                                    "the earlier attempt made.")
    atEnd: bool = Field(default=True, description="Sample after the last step.")
    negativePrompt: Optional[str] = Field(default=None, max_length=2000, description="Default negative prompt (families "
                                          "with classifier-free guidance: sdxl, ltx-video, cosmos; unset: none, cosmos "
                                          "its pipeline's default; \"\" an empty one, also for cosmos).")
    seed: int = Field(default=0, ge=0, description="Default noise seed.")
    width: Optional[int] = Field(default=None, ge=16, le=4096, multiple_of=16, description="Default width.")
    height: Optional[int] = Field(default=None, ge=16, le=4096, multiple_of=16, description="Default height.")
    frames: Optional[int] = Field(default=None, ge=1, le=1024, description="Default frames (video families).")
    guidance: Optional[float] = Field(default=None, ge=0.0, le=30.0, description="Default guidance scale (flux, "
                                      "hunyuan-video: the embedded guidance; the others: classifier-free, on above 1). "
                                      f"Unset: the family's ({_family_defaults('guidance')}).")
    steps: Optional[int] = Field(default=None, ge=1, le=500, description="Default denoising steps. Unset: the "
                                 f"family's ({_family_defaults('steps')}).")


DEFAULT_EVAL_QUANTILES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]   # diffusion-pipe's
EVAL_SOURCE_UNUSED = ("repeats", "shuffleTags", "shuffleVariants", "keepTags", "tagDelimiter", "captionDropout")


class EvaluationSpec(_Model):
    """A held-out loss at fixed timesteps (diffusion-pipe's eval_datasets): the training timestep
    distribution's inverse CDF at each quantile, the same noise at every evaluation."""
    sources: list[SourceSpec] = Field(
        min_length=1, max_length=64,
        description="Held-out folders, as dataset.sources (unset options taken from dataset). Never trained on; each "
                    "item is evaluated once per quantile at each of its training areas (and, with videoClipMode "
                    "multiple_overlapping, each clip), with its first caption, unshuffled and never dropped "
                    "(repeats, shuffleTags and captionDropout do not apply).")
    everySteps: Optional[int] = Field(default=None, ge=1, description="Evaluate every N training steps.")
    everyEpochs: Optional[int] = Field(default=None, ge=1, description="Evaluate at the step that ends every N-th "
                                                                     "epoch.")
    beforeFirstStep: bool = Field(default=True, description="Evaluate the base model (with adapter.initFrom: the "
                                                            "starting adapter) before the first step (not on "
                                                            "a resume). The last step is always evaluated.")
    quantiles: list[float] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_QUANTILES), min_length=1, max_length=32,
        description="Where in the family's training timestep distribution to evaluate: each item's loss at the "
                    "distribution's inverse CDF at each quantile (sdxl: timestep int(q * 1000); cosmos: the "
                    "log-normal sigma), in (0, 1). The evaluation loss is their mean.")
    microBatchSize: Optional[int] = Field(default=None, ge=1, le=1024,
                                          description="Samples per rank per evaluation forward. Unset: "
                                                      "training.microBatchSize.")

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, v: list[float]) -> list[float]:
        if not all(0.0 < q < 1.0 for q in v):
            raise ValueError("each quantile is in (0, 1) exclusive, e.g. [0.1, 0.5, 0.9]")
        if len(set(v)) != len(v):
            raise ValueError("a quantile is listed twice")
        return v

    @model_validator(mode="after")
    def _sources(self) -> "EvaluationSpec":
        for i, s in enumerate(self.sources):
            for f in EVAL_SOURCE_UNUSED:
                if getattr(s, f) != SourceSpec.model_fields[f].default:
                    raise ValueError(f"evaluation.sources[{i}].{f}: evaluation items are each evaluated once, with "
                                     "their first caption, unshuffled and never dropped; remove it")
            if s.maskUri is not None and s.maskUri.rstrip("/") == s.uri.rstrip("/"):
                raise ValueError(f"evaluation.sources[{i}].maskUri: the masks need a folder of their own: move them, "
                                 f"e.g. to {s.uri.rstrip('/')}/masks")
            if s.resolutions is not None and any(r < 16 or r > 4096 or r % 16 for r in s.resolutions):
                raise ValueError(f"evaluation.sources[{i}].resolutions: each is a square side in pixels, 16..4096 and "
                                 "a multiple of 16")
        return self

    def uri_fields(self) -> dict[str, str]:
        """{field path: URI} of every evaluation folder, masks included."""
        return {f"evaluation.sources[{i}].{f}": u for i, s in enumerate(self.sources)
                for f, u in (("uri", s.uri), ("maskUri", s.maskUri)) if u}


def normalized_uri(uri: str) -> str:
    """A folder URI for comparing prefixes: file:// dropped, a local path normalized (., .., doubled
    slashes), an s3:// key's doubled slashes kept (S3 keys are strings), ending in one '/'. Pure."""
    if uri.startswith("s3://"):
        return uri.rstrip("/") + "/"
    path = posixpath.normpath(uri.removeprefix("file://"))
    return path.rstrip("/") + "/"


def uris_overlap(a: str, b: str) -> bool:
    """Whether two folders are the same or one holds the other. Pure."""
    na, nb = normalized_uri(a), normalized_uri(b)
    return na.startswith(nb) or nb.startswith(na)


def check_evaluation(spec: "LoRATrainingJobSpec") -> Optional[str]:
    """What the evaluation section cannot do with the rest of the spec, naming the field. Pure."""
    ev, d = spec.evaluation, spec.dataset
    if ev is None:
        return None
    from .families import check_eval_sources
    problem = check_eval_sources(spec.model.type, ev.sources)
    if problem:
        return problem
    for i, s in enumerate(ev.sources):
        if s.resolutions is not None and d.width is not None:
            return (f"evaluation.sources[{i}].resolutions: dataset.width/height fix one size for every source; "
                    "remove one of them")
    from .captions import recursive_of
    train = ([("dataset.uri", d.uri, d.recursive)] if d.uri is not None else
             [(f"dataset.sources[{j}].uri", t.uri, recursive_of(d, t)) for j, t in enumerate(d.sources)])
    for i, s in enumerate(ev.sources):
        for field, u, deep in train:
            a, b = normalized_uri(s.uri), normalized_uri(u)
            # a folder inside another is read by it only when that one reads its subfolders
            if a == b or (a.startswith(b) and deep) or (b.startswith(a) and recursive_of(d, s)):
                return (f"evaluation.sources[{i}].uri ({s.uri}) and {field} ({u}) overlap (the same folder, or one "
                        "inside the other that reads its subfolders: dataset.recursive), so held-out items would be "
                        "trained on, or trained ones evaluated; give the evaluation a folder of its own, beside the "
                        "training data")
    if d.cacheUri is not None:
        cache = d.cacheUri.rstrip("/")
        for field, u in ev.uri_fields().items():
            data = u.rstrip("/")
            if cache == data or cache.startswith(data + "/") or data.startswith(cache + "/"):
                return (f"dataset.cacheUri ({d.cacheUri}) and {field} ({u}) overlap: the cache would be staged as "
                        f"evaluation data, or the data pushed as cache; use a prefix of its own")
    return None


class LoRATrainingJobSpec(_Model):
    """Desired state of a LoRA training run."""
    model: ModelSpec = Field(description="Base model to adapt.")
    dataset: DatasetSpec = Field(description="Training data.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec, description="Adapter to train.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
    output: OutputSpec = Field(description="Where results go.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 connection settings (no secrets).")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pods, GPUs and scheduling.")
    runPolicy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Retries, deadlines, cleanup and suspension.")
    samples: Optional[SamplesSpec] = Field(
        default=None, description="Sample images or videos during training (under output.uri/samples/step-N/, shown "
                                  "in report.html). Unset: no sampling, at no cost.")
    evaluation: Optional[EvaluationSpec] = Field(
        default=None, description="A held-out loss at fixed timesteps, for choosing a checkpoint (the training "
                                  "loss of a diffusion model is too noisy to read): logged, in the metrics, "
                                  "progress.json, manifest.json and report.html. Unset: none.")

    def input_fields(self) -> dict[str, str]:
        """{spec field: URI} of the inputs that are not data: the model's paths and adapter.initFrom."""
        from .families import PATH_FIELDS
        out = {f"model.{f}": getattr(self.model, f) for f in PATH_FIELDS if getattr(self.model, f)}
        return {**out, **({"adapter.initFrom": self.adapter.initFrom} if self.adapter.initFrom else {})}

    @model_validator(mode="after")
    def _cross_field(self) -> "LoRATrainingJobSpec":
        from .families import check_family
        problem = check_family(self.model, self.dataset, self.output)
        if problem:
            raise ValueError(problem)
        if self.training.warmupSteps > self.training.steps:
            raise ValueError(f"training.warmupSteps ({self.training.warmupSteps}) exceeds training.steps ({self.training.steps})")
        if self.training.cpuOffload and self.samples is not None:
            raise ValueError("spec.samples with training.cpuOffload: sampling through a model whose weights FSDP2 keeps "
                             "in CPU memory is not supported yet; remove one of them (or sample the exported LoRA "
                             "after training)")
        if self.resources.gpusPerNode == 0 and self.resources.gpuResource != ResourcesSpec.model_fields["gpuResource"].default:
            raise ValueError(f"resources.gpuResource ({self.resources.gpuResource}): with gpusPerNode 0 no GPU is "
                             "requested, so it would be unused; remove it or request GPUs")
        if self.dataset.cacheOnly and self.samples is not None:
            raise ValueError("dataset.cacheOnly builds the cache and trains nothing, so spec.samples would never be made: "
                             "remove one of them")
        problem = ignored_settings(self)
        if problem:
            raise ValueError(problem)
        problem = check_evaluation(self)
        if problem:
            raise ValueError(problem)
        from .sample_plan import check_samples
        problem = check_samples(self)
        if problem:
            raise ValueError(problem)
        return self


# dataset fields every source (and evaluation source) may override; read only through them
SOURCE_OVERRIDES = ("captionPrefix", "captionExtension", "missingCaption", "captionDropout", "recursive",
                    "resolutions", "frameBuckets")


def overridden_dataset_field(spec: "LoRATrainingJobSpec") -> Optional[str]:
    """A dataset-wide value (not its default) that no source reads, because every one of
    dataset.sources (and evaluation.sources) sets its own: the user's trigger word or areas would be
    silently unused. An evaluation source never drops captions, so it reads no captionDropout."""
    d = spec.dataset
    if d.sources is None:
        return None
    evals = list(spec.evaluation.sources) if spec.evaluation is not None else []
    for f in SOURCE_OVERRIDES:
        if getattr(d, f) == type(d).model_fields[f].get_default(call_default_factory=True):
            continue
        readers = list(d.sources) + ([] if f == "captionDropout" else evals)
        if all(getattr(s, f) is not None for s in readers):
            return (f"dataset.{f}: every source sets its own {f}, so the dataset's ({getattr(d, f)!r}) applies to "
                    f"none; remove it, or remove {f} from the sources that should take it")
    return None


def ignored_settings(spec: "LoRATrainingJobSpec") -> Optional[str]:
    """A setting that would be silently ignored or overwritten, as a message naming the field."""
    from .families import RULES
    if spec.training.textEncoderLearningRate is not None and not RULES[spec.model.type].trains_text_encoders:
        return (f"training.textEncoderLearningRate: model.type {spec.model.type} trains no text encoder "
                f"(only {', '.join(t for t, r in RULES.items() if r.trains_text_encoders)} does); remove it")
    if spec.adapter.type == "full":
        # by value, not by what was written: the API server fills the defaults in
        lora_only = sorted(f for f in ("rank", "alpha", "dropout", "targetModules", "initFrom")
                           if getattr(spec.adapter, f) != AdapterSpec.model_fields[f].default)
        if lora_only:
            return f"adapter.{lora_only[0]}: applies to adapter.type lora only; remove it for a full fine-tune"
        if spec.model.transformerDtype == "float8":
            return ("model.transformerDtype: float8 stores frozen weights; a full fine-tune (adapter.type full) "
                    "trains them: remove it")
        if spec.training.textEncoderLearningRate is not None:
            return "training.textEncoderLearningRate: a full fine-tune trains the denoiser only; remove it"
        if spec.output.formats:
            return "output.formats: LoRA file formats; a full fine-tune is exported as a diffusers folder (and a single file)"
        if spec.output.dtype != OutputSpec.model_fields["dtype"].default:
            return "output.dtype: the dtype of LoRA files; a full fine-tune's files take model.dtype: remove it"
    if spec.model.bypassGuidanceEmbedding and spec.model.guidance is not None:
        return ("model.guidance: model.bypassGuidanceEmbedding leaves the guidance embedding out, so no guidance "
                "is fed while training; remove one of them")
    for f in ("timestepSampling", "sigmoidScale", "timestepShift"):
        if getattr(spec.training, f) != TrainingSpec.model_fields[f].default and not RULES[spec.model.type].flow_matching:
            return (f"training.{f}: applies to the flow-matching families "
                    f"({', '.join(t for t, r in RULES.items() if r.flow_matching)}); model.type {spec.model.type} "
                    "draws its noise levels its own way: remove it")
    if spec.training.sigmoidScale != 1.0 and spec.training.timestepSampling != "logit_normal":
        return "training.sigmoidScale: scales the logit-normal draw; with timestepSampling uniform remove it"
    if spec.training.timestepShift and spec.model.fluxShift:
        return ("training.timestepShift: a constant shift, where model.fluxShift shifts by resolution; set one of "
                "them (diffusion-pipe uses shift when both are set)")
    if spec.model.float8Compute is not None and spec.model.transformerDtype != "float8":
        return "model.float8Compute: applies only with model.transformerDtype: float8; set that too or remove it"
    if spec.training.memoryBudgetGiB is not None and (spec.training.gradientCheckpointing is not None
                                                      or spec.training.cpuOffload):
        what = ("training.cpuOffload recomputes every block" if spec.training.cpuOffload else
                "training.gradientCheckpointing set says which blocks are recomputed")
        return (f"training.memoryBudgetGiB: budgets the memory plan, which runs with gradientCheckpointing unset; "
                f"{what}: remove one of them")
    if spec.resources.cacheSize and spec.resources.cacheVolumeClaim:
        return ("resources.cacheSize sizes the per-pod cache (an emptyDir); with resources.cacheVolumeClaim the "
                "claim's own size applies: remove one of them")
    if spec.resources.cacheSize and "ephemeral-storage" in spec.resources.requests:
        return ("resources.requests['ephemeral-storage'] is set from resources.cacheSize "
                f"({spec.resources.cacheSize}); remove one of them")
    asked = dict(spec.resources.requests)
    if spec.resources.cacheSize and not spec.resources.cacheVolumeClaim:  # the pods request it (manifests.job)
        asked.setdefault("ephemeral-storage", spec.resources.cacheSize)
    for res, request in asked.items():
        limit = spec.resources.limits.get(res)
        try:
            over = limit is not None and quantity(request) > quantity(limit)
        except ValueError:
            over = False   # a form quantity() does not read (an exponent suffix): the API server checks it
        if over:
            what = (f"resources.requests['{res}']" if res in spec.resources.requests else
                    "resources.cacheSize (the pods' ephemeral-storage request)")
            return (f"{what} ({request}) exceeds resources.limits['{res}'] ({limit}): the API server refuses such a "
                    "pod; raise the limit or lower the request")
    for kind in ("requests", "limits"):
        gpu = spec.resources.gpuResource
        if gpu in getattr(spec.resources, kind):
            return (f"resources.{kind}['{gpu}'] is set from resources.gpusPerNode "
                    f"({spec.resources.gpusPerNode}); remove it and set gpusPerNode")
    out = spec.output.uri.rstrip("/")
    data_fields = {**spec.dataset.uri_fields(), **(spec.evaluation.uri_fields() if spec.evaluation else {})}
    for where, u in data_fields.items():
        data = u.rstrip("/")
        if out == data or out.startswith(data + "/"):
            return (f"output.uri ({spec.output.uri}) is inside {where} ({u}): outputs would be "
                    f"mixed with the {'evaluation' if where.startswith('evaluation') else 'training'} data; write "
                    f"them elsewhere")
    return None


# ---------------------------------------------------------------- loading and errors

def _camel_hint(loc: tuple, model: type[BaseModel]) -> str:
    """For an unknown field, suggest the known field it most resembles."""
    import types
    import typing

    def unwrap(t):  # Optional[X] -> X
        while typing.get_origin(t) in (typing.Union, types.UnionType):
            t = next(a for a in typing.get_args(t) if a is not type(None))
        return t
    name = str(loc[-1])
    cur: Any = model
    for part in loc[:-1]:
        cur = unwrap(cur)
        if isinstance(part, int):  # an item of a list: its type
            args = typing.get_args(cur)
            cur = args[0] if args else None
            continue
        f = getattr(cur, "model_fields", {}).get(str(part))
        if f is None:
            return ""
        cur = f.annotation
    known = list(getattr(unwrap(cur), "model_fields", {}))
    guess = difflib.get_close_matches(to_camel(name), known, n=1, cutoff=0.6)
    return f"; did you mean {guess[0]!r}?" if guess else f"; known fields: {', '.join(known)}"


LITERAL_HINTS = {
    (("model", "dtype"), "float16"): " (float16 training underflows small gradients without loss scaling, which "
                                     "kubelora does not do; use bfloat16, or float32 on GPUs without bfloat16)",
}


def format_errors(err: ValidationError, prefix: str = "spec") -> str:
    lines = []
    for e in err.errors():
        loc = e["loc"]
        path = ".".join([prefix, *(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc)]).replace(".[", "[")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field" + _camel_hint(e["loc"], LoRATrainingJobSpec)
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; accepted values: {e['ctx']['expected']}" + LITERAL_HINTS.get((loc, e["input"]), "")
        elif e["type"] == "string_pattern_mismatch" and "s3://" in e["ctx"].get("pattern", ""):
            msg = f"got {e['input']!r}; {uri_problem(e['input'])}"
        elif e["type"] == "string_pattern_mismatch" and e["ctx"].get("pattern") == QUANTITY_PATTERN:
            msg = f"got {e['input']!r}; not a Kubernetes quantity (e.g. 8, 500m, 64Gi; binary suffixes Ki Mi Gi Ti)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not loc:
                path = ""
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{path}: {msg}" if path else msg)
    return "invalid LoRATrainingJob spec:\n  " + "\n  ".join(lines)


# The children's names derive from metadata.name: the headless Service `<name>-workers` must be a
# DNS-1035 label (63 at most, a letter first, no dots), so the name is refused at apply time (the
# CRD's rules, crd.NAME_RULES) rather than leaving a job whose Service the API server will not create.
MAX_NAME = 63 - len("-workers")
NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_TOO_LONG = f"metadata.name must be at most {MAX_NAME} characters (the trainer's Service is <name>-workers)"
NAME_BAD_CHARACTERS = ("metadata.name must start with a letter and hold only lowercase letters, digits and '-' "
                       "(the trainer's Service name is a DNS-1035 label: no dots)")


def check_name(name: Any) -> None:
    """The CRD's rules for metadata.name, as the API server applies them. Raises SpecError."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise SpecError(f"{NAME_BAD_CHARACTERS}; got {name!r}")
    if len(name) > MAX_NAME:
        raise SpecError(f"{NAME_TOO_LONG}; got {len(name)}")


# Checks added after jobs were admitted without them run only when a job is admitted (a new job,
# `kubelora validate`, `kubelora run`), never on the spec of a job the operator already follows:
# refused there, a running job would no longer be followed and a finished one never cleaned up.
ADMISSION_CHECKS = (overridden_dataset_field,)


def _as_admitted(data: dict) -> dict:
    """An admitted job's spec as its pods got it: tolerations were free maps before they were typed,
    and the API server dropped a field that is none of a Toleration's when it made the Job; so does
    this, rather than refusing a job that runs (decision 78)."""
    resources = data.get("resources") if isinstance(data, dict) else None
    tolerations = resources.get("tolerations") if isinstance(resources, dict) else None
    if not isinstance(tolerations, list):
        return data
    known = set(Toleration.model_fields)
    kept = [{k: v for k, v in t.items() if k in known} if isinstance(t, dict) else t for t in tolerations]
    return {**data, "resources": {**resources, "tolerations": kept}}


def parse_spec(data: dict[str, Any], admitted: bool = False) -> LoRATrainingJobSpec:
    """Validate a spec dict, or a whole CR manifest (apiVersion/kind/metadata/spec), or a spec
    under `spec:` alone (as the README shows for a workstation run). admitted: the spec of a job
    already admitted (the operator's sync), which ADMISSION_CHECKS do not refuse again."""
    if not isinstance(data, dict):
        raise SpecError("the manifest must be a mapping with a 'spec' section (or the spec itself)")
    if "spec" in data and not set(data) - {"spec", "metadata"}:
        data = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, **data}
    if "kind" in data or "apiVersion" in data:
        unknown = sorted(set(data) - {"apiVersion", "kind", "metadata", "spec", "status"})
        if unknown:
            guess = difflib.get_close_matches(unknown[0], ["spec", "metadata", "kind", "apiVersion"], n=1, cutoff=0.5)
            raise SpecError(f"{unknown[0]}: unknown top-level field" + (f"; did you mean {guess[0]!r}?" if guess else
                                                                        "; a manifest has apiVersion, kind, metadata, spec"))
        if "spec" not in data:
            raise SpecError("spec: the manifest has no spec section")
        if data.get("kind") != KIND:
            raise SpecError(f"kind: expected {KIND}, got {data.get('kind')!r}")
        if data.get("apiVersion") != f"{GROUP}/{VERSION}":
            raise SpecError(f"apiVersion: expected {GROUP}/{VERSION}, got {data.get('apiVersion')!r}")
        name = (data.get("metadata") or {}).get("name") if isinstance(data.get("metadata"), dict) else None
        if name is not None:
            check_name(name)
        data = data.get("spec") or {}
    if admitted:
        data = _as_admitted(data)
    try:
        # strict, as the API server is: "1000" is not an integer and "true" not a boolean
        spec = LoRATrainingJobSpec.model_validate(data, strict=True)
    except ValidationError as e:
        raise SpecError(format_errors(e)) from None
    for check in () if admitted else ADMISSION_CHECKS:
        problem = check(spec)
        if problem:
            raise SpecError(f"invalid LoRATrainingJob spec:\n  {problem}")
    return spec


class KubeYamlLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: `1e-4` is a number (PyYAML's YAML 1.1 resolver wants a dot)."""


KubeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)$"), list("-+0123456789."))


def load_spec(path: str | Path) -> LoRATrainingJobSpec:
    text = Path(path).read_text()
    try:
        docs = [d for d in yaml.load_all(text, Loader=KubeYamlLoader) if d is not None]
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if len(docs) != 1:
        raise SpecError(f"{path}: expected exactly one YAML document, found {len(docs)}")
    return parse_spec(docs[0])


def name_from(text: str, default: str = "job") -> str:
    """A metadata.name the CRD accepts (check_name) made from a file stem or a user's name:
    lowercase letters, digits and single '-', a letter first ('lora-' put before a digit). Pure."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")
    if slug and not slug[0].isalpha():
        slug = f"lora-{slug}"
    return slug[:MAX_NAME].rstrip("-") or default


def manifest_name(path: str | Path) -> str:
    """metadata.name of a CR manifest, or one made from the file stem for a bare spec."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc, dict) else None
    return name or name_from(Path(path).stem)


def dump_spec(spec: LoRATrainingJobSpec) -> dict[str, Any]:
    """The resolved spec (defaults filled) as plain data in manifest field names."""
    return spec.model_dump(mode="json")
