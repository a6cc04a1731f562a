"""Throughput of the extraction engine, side by side with a HALP-style loop, on the same inputs.

    python scripts/benchmark.py --models tiny --device cpu          # the tiny checkpoints (CI smoke run)
    python scripts/benchmark.py --models full --device cuda --peak-tflops 989
    python scripts/benchmark.py --preset quick --peak-tflops 989    # fits 10 minutes on one GPU
    python scripts/benchmark.py --preset quick --models tiny --device cpu

Models: the tiny checkpoints (`vlmstates.demo.tiny`), or full-size architectures with random weights built from
the real checkpoints' dimensions (FULL_SIZE below), initialised directly on the device in bf16, with the
real processor classes and the tiny builders' local tokenizers (no download). Inputs: synthetic images of
realistic sizes and HALP-like questions; every answer is exactly `--new-tokens` long (min = max), so
random weights do not change the work.

Measured in one run on the same inputs: the engine (`vlmstates.extraction.engine.Extractor`, its real code path) at
each `--batch-sizes` with each `--decodings` (the model entry's `decoding`: method `engine` for the default
dynamic cache, `engine_static`, `engine_static_compiled`), the engine prefill-only (`answers: false`: the same
prefill, no decoding) at each, and a HALP-style loop: one sample at a time, a generate pass, a separate forward pass with
output_hidden_states and a projector hook, and a separate vision-tower pass. Each configuration runs
`--repeats` times in a row; the run with the median samples/s is reported.

Each configuration (family x method x batch size) is appended to `--out` (JSON lines, after one line of
the run's environment and settings) as it completes, so a run cut short keeps what it measured; one that
fails is saved with its error and the next one runs, and a failed sample is counted in its configuration's
row (`failed_samples`), never an abort. `--resume` skips the configurations already saved as ok. The
printed table is built from the file.

Prefill FLOPs are counted from the model: 2 x parameters x tokens, for the decoder blocks over the real
(unpadded) prompt tokens and for the vision tower over the patch tokens it encoded; the LM head (one
token per sample in prefill) and attention's sequence-quadratic terms are left out. The HALP-style loop
is credited with the same useful FLOPs (one prefill per sample), so its TFLOP/s is useful work per second.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlmstates.extraction.adapters import adapter_for_family
from vlmstates.extraction.adapters.base import LoadedModel, check_decoding
from vlmstates.extraction.attention import TEXT, choose_attention, from_pretrained_argument
from vlmstates.extraction.engine import (
    Extractor,
    Prepared,
    Question,
    configure_cuda_allocator,
    load_model,
    select_device,
    select_dtype,
)
from vlmstates.extraction.hooks import forward_hooks
from vlmstates.images import load_image, resolve_image_path
from vlmstates.settings import DECODINGS, DYNAMIC, ModelSettings, default_layers
from vlmstates.store import write_embeddings

FAMILIES = ("qwen2_5_vl", "gemma3", "phi4_multimodal")
#: The method name of the engine's prefill-only runs (no answers, no decoding).
PREFILL_ONLY = "prefill_only"
#: The method name of the engine's answering runs with the default (dynamic) cache.
ENGINE = "engine"


def engine_method(decoding: str) -> str:
    """The method name of the engine's answering runs with a `decoding` (settings.DECODINGS)."""
    return ENGINE if decoding == DYNAMIC else f"{ENGINE}_{decoding}"


#: method name -> the `decoding` of the engine's answering runs
DECODING_OF_METHOD = {engine_method(decoding): decoding for decoding in DECODINGS}


# -- full-size architectures (dimensions from the checkpoints' public config.json) ------------------
@dataclass(frozen=True)
class FullSize:
    checkpoint: str
    text: dict
    vision: dict
    extra: dict = field(default_factory=dict)


FULL_SIZE = {
    "qwen2_5_vl": FullSize(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
            hidden_act="silu",
            in_channels=3,
        ),
        extra=dict(min_pixels=3136, max_pixels=12845056, tie_word_embeddings=False),
    ),
    "gemma3": FullSize(
        "google/gemma-3-12b-it",
        text=dict(
            vocab_size=262208,
            hidden_size=3840,
            intermediate_size=15360,
            num_hidden_layers=48,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
            max_position_embeddings=131072,
            sliding_window=1024,
            sliding_window_pattern=6,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
        vision=dict(
            model_type="siglip_vision_model",
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=896,
            patch_size=14,
            vision_use_head=False,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        extra=dict(mm_tokens_per_image=256),
    ),
    "phi4_multimodal": FullSize(
        "microsoft/Phi-4-multimodal-instruct",
        text=dict(
            vocab_size=200064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=24,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
        # SigLIP tower on 448-pixel crops; the audio encoder keeps transformers' defaults (the real sizes)
        vision=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=448,
            patch_size=14,
            crop_size=448,
            feature_layer=-2,
        ),
        extra=dict(partial_rotary_factor=0.75, rope_theta=10000.0),
    ),
}


def _phi4_rope(rotary_dim: int, theta: float, partial: float) -> dict:
    # Long-RoPE factors change no shape and no FLOP count; these ramps stand in for the real lists.
    n = rotary_dim // 2
    ramp = [1.0 + i / (n - 1) for i in range(n)]
    return {
        "rope_type": "longrope",
        "rope_theta": theta,
        "partial_rotary_factor": partial,
        "short_factor": ramp,
        "long_factor": [f * 4 for f in ramp],
    }


def _full_size_qwen(spec: FullSize):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )

    from vlmstates.demo.tiny import qwen2_5_vl as tiny

    small = tiny.build_processor()
    geometry = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessor(
        min_pixels=spec.extra["min_pixels"], max_pixels=spec.extra["max_pixels"], **geometry
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=small.tokenizer,
        video_processor=small.video_processor,
        chat_template=tiny.CHAT_TEMPLATE,
    )
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    pad, eos = ids[tiny.PAD_TOKEN], ids[tiny.IM_END]
    config = Qwen2_5_VLConfig(
        text_config=dict(spec.text, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad),
        vision_config=spec.vision,
        image_token_id=ids[tiny.IMAGE_PAD],
        video_token_id=ids[tiny.VIDEO_PAD],
        vision_start_token_id=ids[tiny.VISION_START],
        vision_end_token_id=ids[tiny.VISION_END],
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=spec.extra["tie_word_embeddings"],
    )
    return Qwen2_5_VLForConditionalGeneration, config, processor


def _full_size_gemma(spec: FullSize):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    from vlmstates.demo.tiny import gemma3 as tiny

    small = tiny.build_processor()
    size = spec.vision["image_size"]
    image_processor = Gemma3ImageProcessor(
        size={"height": size, "width": size},
        resample=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_pan_and_scan=False,
    )
    tokens = spec.extra["mm_tokens_per_image"]
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=small.tokenizer,
        chat_template=tiny.CHAT_TEMPLATE,
        image_seq_length=tokens,
    )
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    pad, bos, eos = tid(tiny.PAD), tid(tiny.BOS), [tid(tiny.EOS), tid(tiny.END_OF_TURN)]
    config = Gemma3Config(
        text_config=dict(spec.text, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos),
        vision_config=spec.vision,
        mm_tokens_per_image=tokens,
        boi_token_index=tid(tiny.BOI),
        eoi_token_index=tid(tiny.EOI),
        image_token_index=tid(tiny.IMAGE_SOFT),
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    return Gemma3ForConditionalGeneration, config, processor


def _full_size_phi4(spec: FullSize):
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    from vlmstates.demo.tiny import phi4_multimodal as tiny

    processor = tiny.build_processor()  # the real image geometry: 448-pixel crops, up to 36 of them
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    eot, end = tid(tiny.ENDOFTEXT), tid(tiny.END)
    text = spec.text
    rotary_dim = int(text["hidden_size"] // text["num_attention_heads"] * spec.extra["partial_rotary_factor"])
    config = Phi4MultimodalConfig(
        **text,
        rope_parameters=_phi4_rope(rotary_dim, spec.extra["rope_theta"], spec.extra["partial_rotary_factor"]),
        vision_config=dict(spec.vision, image_token_id=tid(tiny.IMAGE)),
        audio_config=dict(audio_token_id=tid(tiny.AUDIO)),
        bos_token_id=eot,
        eos_token_id=[eot, end],
        pad_token_id=eot,
    )
    return Phi4MultimodalForCausalLM, config, processor


_FULL_SIZE_BUILDERS = {"qwen2_5_vl": _full_size_qwen, "gemma3": _full_size_gemma, "phi4_multimodal": _full_size_phi4}


def build_full_size(family: str, device: torch.device, dtype: torch.dtype, settings: ModelSettings) -> LoadedModel:
    """A full-size architecture with random weights, created directly on `device` in `dtype`."""
    from transformers import GenerationConfig

    model_class, config, processor = _FULL_SIZE_BUILDERS[family](FULL_SIZE[family])
    processor.tokenizer.padding_side = "left"
    attention = choose_attention(
        family, settings.attn_implementation, device.type, f"models.{settings.name}.attn_implementation"
    )
    with torch.device(device):
        model = model_class._from_config(
            config, dtype=dtype, attn_implementation=from_pretrained_argument(family, attention)
        )
    model.eval()
    text = config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, pad_token_id=text.pad_token_id, eos_token_id=text.eos_token_id
    )
    adapter = adapter_for_family(family)
    adapter.prepare_model(model)  # what the adapter's load does to a checkpoint's model
    return LoadedModel(model, processor, adapter, settings, device, dtype, attention[TEXT])


class VisionTokens:
    """Counts the tokens the vision tower encodes while `active` (a forward hook reading output shapes)."""

    def __init__(self, tower: torch.nn.Module):
        self.tower, self.count, self.active = tower, 0, True

    def hooked(self) -> contextlib.AbstractContextManager[None]:
        return forward_hooks(after=[(self.tower, self._hook)])

    def _hook(self, module, args, output) -> None:
        if self.active:
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            self.count += hidden.shape[:-1].numel()


class PrefillClock:
    """Marks when the prefill of a generate() call ends: the model's first forward after `start()`."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.prefill_end: float | None = None

    def hooked(self) -> contextlib.AbstractContextManager[None]:
        return forward_hooks(after=[(self.model, self._hook)])

    def start(self) -> None:
        self.prefill_end = None

    def _hook(self, module, args, output) -> None:
        if self.prefill_end is None:
            _sync(self.device)
            self.prefill_end = time.perf_counter()


@dataclass
class StageTimes:
    """Seconds per stage of the engine, summed over batches (its `StageTimer`). `prepare` runs in the
    prefetch thread, overlapped with the model; `wait` is the time the model waited for it."""

    clock: PrefillClock
    prepare: float = 0.0
    wait: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    batches: int = 0
    prompt_tokens: int = 0
    padded_tokens: int = 0  # batch rows x padded length: the tokens prefill actually processed

    @contextlib.contextmanager
    def __call__(self, stage: str, prepared: Prepared | None):
        start = time.perf_counter()
        if stage == "model":
            self.clock.start()
        yield  # a stage that raises (out of memory in the batch-size search) is not counted
        end = time.perf_counter()
        if stage == "prepare":
            self.prepare += end - start
        elif stage == "wait":
            self.wait += end - start
        else:
            prefill_end = self.clock.prefill_end or end
            self.prefill += prefill_end - start
            self.decode += end - prefill_end
            self.batches += 1
            self.prompt_tokens += sum(prepared.positions.num_prompt_tokens)
            self.padded_tokens += prepared.batch.input_ids.numel()


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- inputs ------------------------------------------------------------------------------------------
OBJECTS = ("dog", "cat", "car", "person", "bicycle", "umbrella", "cup", "chair", "clock", "bus", "bird", "laptop")
RELATIONS = ("to the left of", "to the right of", "above", "below", "next to", "behind")
TEMPLATES = (
    "Is there a {a} in the image?",
    "What color is the {a}?",
    "How many {a}s are there in the picture?",
    "Is the {a} {r} the {b}? Answer yes or no.",
    "Look at the picture carefully. Is the statement 'the {a} is {r} the {b}' true or false?",
    "Describe the {a} in this image in detail, including its color, its size and where it is relative to the {b}.",
    "Please describe everything you can see in this image, paying attention to any {a} or {b} and how they are arranged.",
)


def synthetic_inputs(root: Path, n: int, sizes: list[tuple[int, int]], seed: int) -> list[Question]:
    """`n` questions of HALP-like lengths (5 to 21 words), each with its own JPEG image, sizes in turn."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    questions = []
    for i in range(n):
        image_id = f"image_{i:04d}.jpg"
        _synthetic_image(sizes[i % len(sizes)], rng).save(root / image_id, quality=90)
        a, b = rng.sample(OBJECTS, 2)
        text = rng.choice(TEMPLATES).format(a=a, b=b, r=rng.choice(RELATIONS))
        questions.append(Question(f"q{i:04d}", image_id, text, "yes"))
    return questions


def _synthetic_image(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A background and a dozen filled shapes (sizes from 42x42 pixels up)."""
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randrange(20, width // 2), y0 + rng.randrange(20, height // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


# -- measurement -------------------------------------------------------------------------------------
@dataclass
class Run:
    method: str
    batch_size: int
    seconds: float
    samples: int
    prompt_tokens: int
    padded_tokens: int
    vision_tokens: int
    peak_memory_mb: float
    breakdown_s: dict
    failed_samples: int = 0  # samples the run recorded failed (counted in its time, not an abort)
    first_sample_error: str | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: torch's peak allocated memory; CPU: the process's peak RSS since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(
    loaded, questions, images_dir, batch_size, new_tokens, out_dir, tower, answers: bool = True, decoding=DYNAMIC
) -> Run:
    """The engine on the questions; `answers` False: prefill-only (the model entry's `answers: false`);
    `decoding`: the model entry's (a family that cannot use it fails the configuration with the ConfigError)."""
    device = loaded.device
    method = engine_method(decoding) if answers else PREFILL_ONLY
    loaded = replace(loaded, settings=replace(loaded.settings, answers=answers, decoding=decoding))
    check_decoding(loaded.adapter, loaded.settings)
    timings = StageTimes(PrefillClock(loaded.model, device))
    extractor = Extractor(loaded, progress=False, batch_size=batch_size, min_new_tokens=new_tokens, stage_timer=timings)
    reset_peak_memory(device)
    vision = VisionTokens(tower)
    with vision.hooked(), timings.clock.hooked():
        _sync(device)
        start = time.perf_counter()
        results = extractor.extract(questions, images_dir)
        _sync(device)
        extracted = time.perf_counter()
    write_embeddings(out_dir / f"{method}_{batch_size}.h5", results, extractor.vector_dims(), extractor.attributes())
    end = time.perf_counter()
    failed = [r.error for r in results if r.status != "ok"]
    breakdown = dict(
        preprocess=timings.prepare,
        preprocess_wait=timings.wait,
        prefill=timings.prefill,
        decode=timings.decode,
        write=end - extracted,
    )
    return Run(
        method,
        batch_size,
        end - start,
        len(questions),
        timings.prompt_tokens,
        timings.padded_tokens,
        vision.count,
        peak_memory_mb(device),
        breakdown,
        len(failed),
        failed[0] if failed else None,
    )


def run_halp_loop(loaded, questions, images_dir, new_tokens, tower) -> Run:
    """One sample at a time: generate, then a forward pass with output_hidden_states and a projector hook,
    then the vision tower alone (HALP's reference code does these as separate passes)."""
    adapter, model, device = loaded.adapter, loaded.model, loaded.device
    layers = default_layers(len(adapter.decoder_blocks(model)))
    times = dict(preprocess=0.0, preprocess_wait=0.0, prefill=0.0, decode=0.0, write=0.0)
    prompt_tokens = 0
    kept = []  # results stay in memory: the loop is not charged for writing them
    failed: list[str] = []
    reset_peak_memory(device)
    _sync(device)
    start = time.perf_counter()
    clock, vision = PrefillClock(model, device), VisionTokens(tower)
    with torch.inference_mode(), clock.hooked(), vision.hooked():
        for q in questions:
            try:
                prompt_tokens += _halp_sample(loaded, q, images_dir, new_tokens, layers, clock, vision, times, kept)
            except Exception as error:  # a failed sample is counted, as the engine's are, and the loop goes on
                vision.active = False
                failed.append(f"{type(error).__name__}: {error}")
    seconds = time.perf_counter() - start
    return Run(
        "halp_loop",
        1,
        seconds,
        len(questions),
        prompt_tokens,
        prompt_tokens,
        vision.count,
        peak_memory_mb(device),
        times,
        len(failed),
        failed[0] if failed else None,
    )


def _halp_sample(loaded, q, images_dir, new_tokens, layers, clock, vision, times, kept) -> int:
    """One sample of the HALP-style loop; adds its stage times to `times`, returns its prompt tokens."""
    adapter, model, device = loaded.adapter, loaded.model, loaded.device
    t0 = time.perf_counter()
    image = load_image(resolve_image_path(images_dir, q.image_id))
    batch = adapter.build_batch(loaded, [loaded.settings.format_prompt(q.question)], [image])
    t1 = time.perf_counter()
    clock.start()
    vision.active = True  # count the tower's tokens once per sample: in generate's prefill
    answer = adapter.generate(loaded, batch, new_tokens, new_tokens)[0]
    vision.active = False
    t2 = time.perf_counter()
    kept.append(
        (
            answer,
            _hooked_forward(adapter, loaded, batch, layers),
            adapter.vision_features(model, batch.inputs).float().mean(0).cpu(),
        )
    )
    _sync(device)
    t3 = time.perf_counter()
    prefill_end = clock.prefill_end or t2
    times["preprocess"] += t1 - t0
    times["prefill"] += (prefill_end - t1) + (t3 - t2)
    times["decode"] += t2 - prefill_end
    return int(batch.attention_mask.sum())


def _hooked_forward(adapter, loaded, batch, layers) -> dict:
    """Hidden states of the chosen layers at the last prompt token, and the projector's pooled input."""
    captured = {}

    def hook(module, args):
        captured["projector"] = adapter.pool_projector_input(args[0], batch).cpu()

    with forward_hooks(before=[(adapter.projector(loaded.model), hook)]):
        hidden = loaded.model(**batch.inputs, output_hidden_states=True).hidden_states
    return captured | {k: hidden[k + 1][0, -1].float().cpu() for k in layers}


# -- one family --------------------------------------------------------------------------------------
def load_benchmark_model(family, args, device, dtype, checkpoints: Path) -> tuple[LoadedModel, str]:
    settings = dict(max_new_tokens=args.new_tokens, device=str(device), dtype=str(dtype).removeprefix("torch."))
    if args.models == "full":
        spec = FULL_SIZE[family]
        name = f"random {spec.checkpoint}"
        return build_full_size(family, device, dtype, ModelSettings(name=family, model=name, **settings)), name
    from vlmstates.demo.tiny import build_tiny_checkpoint

    path = checkpoints / f"tiny-{family}"
    if not (path / "config.json").is_file():
        build_tiny_checkpoint(family, path)
    return load_model(ModelSettings(name=family, model=str(path), **settings)), f"tiny {family}"


def summarise(runs: list[Run], lm_params: int, vision_params: int, peak_tflops: float | None) -> dict:
    """The median run (by samples/s) of one configuration, with its derived figures."""
    ordered = sorted(runs, key=lambda r: r.samples_per_s)
    run = ordered[(len(ordered) - 1) // 2]
    flop = 2 * (lm_params * run.prompt_tokens + vision_params * run.vision_tokens)
    tflops = flop / run.breakdown_s["prefill"] / 1e12 if run.breakdown_s["prefill"] else None
    return dict(
        samples=run.samples,
        failed_samples=run.failed_samples,
        first_sample_error=run.first_sample_error,
        repeats=len(runs),
        samples_per_s=run.samples_per_s,
        samples_per_s_runs=[r.samples_per_s for r in runs],
        seconds=run.seconds,
        prompt_tokens=run.prompt_tokens,
        prompt_tokens_per_s=run.prompt_tokens / run.seconds,
        padding_share=1 - run.prompt_tokens / run.padded_tokens if run.padded_tokens else 0.0,
        vision_tokens=run.vision_tokens,
        prefill_tflop=flop / 1e12,
        prefill_tflops=tflops,
        roofline_share=tflops / peak_tflops if tflops is not None and peak_tflops else None,
        peak_memory_mb=run.peak_memory_mb,
        breakdown_s=run.breakdown_s,
    )


# -- configurations, each saved as it completes ------------------------------------------------------
def configurations(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(method, batch size) of one family, in the order they run: the engine with each decoding,
    prefill-only, the loop."""
    engine = [(engine_method(d), b) for d in args.decodings for b in args.batch_sizes]
    return engine + [(PREFILL_ONLY, b) for b in args.batch_sizes] + [("halp_loop", 1)]


def configuration_key(row: dict) -> tuple[str, str, int]:
    return row["family"], row["method"], row["batch_size"]


class Recorder:
    """Appends one JSON line per configuration to `path` the moment it completes (flushed and synced), so
    that a run cut short (a lease that ends, a crash) keeps every configuration measured before."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def save(self, record: dict) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())


def read_records(path: Path) -> list[dict]:
    """The JSON lines of `path`; a line cut short (a run killed while writing it) is dropped, with a note."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}: skipping an incomplete line (a run killed while writing it)", file=sys.stderr)
    return records


def latest_rows(records: list[dict]) -> list[dict]:
    """The configuration rows, the latest per (family, method, batch size), in their first order."""
    rows: dict[tuple, dict] = {}
    for r in records:
        if r.get("record") == "configuration":
            rows[configuration_key(r)] = r
    return list(rows.values())


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _free_after_failure(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark_family(family, args, device, dtype, workdir: Path, save=None, done=frozenset()) -> list[dict]:
    """Every configuration of one family not in `done` ((family, method, batch size) keys): each is passed to
    `save` as it completes; a configuration that fails is recorded with its error and the next one runs."""
    pending = [(m, b) for m, b in configurations(args) if (family, m, b) not in done]
    rows: list[dict] = []

    def record(method: str, batch_size: int, fields: dict) -> None:
        row = dict(record="configuration", family=family, method=method, batch_size=batch_size, **fields)
        rows.append(row)
        if save is not None:
            save(row)

    if not pending:
        return rows
    try:
        loaded, checkpoint = load_benchmark_model(family, args, device, dtype, workdir / "checkpoints")
    except Exception as error:  # no model: every pending configuration of the family is recorded failed
        traceback.print_exc()
        for method, size in pending:
            record(method, size, dict(status="failed", error=f"loading the model: {_error_text(error)}"))
        return rows
    tower = loaded.adapter.vision_tower(loaded.model)
    lm_params = parameter_count(loaded.adapter.decoder_blocks(loaded.model))
    vision_params = parameter_count(tower)
    model_fields = dict(
        model=checkpoint,
        lm_params=lm_params,
        vision_params=vision_params,
        attn_implementation=loaded.attn_implementation,
    )
    images_dir = workdir / "images"
    questions = synthetic_inputs(images_dir, args.samples, args.image_sizes, args.seed)
    halp_questions = questions[: args.halp_samples or len(questions)]
    out_dir = workdir / "out" / family
    out_dir.mkdir(parents=True, exist_ok=True)
    _warm_up(loaded, questions, images_dir, args, out_dir, tower, pending)

    for method, size in pending:
        print(f"  {family} {method} batch {size} ...", file=sys.stderr, flush=True)
        try:
            runs = [
                _measure(method, size, loaded, questions, halp_questions, images_dir, args, out_dir, tower)
                for _ in range(args.repeats)
            ]
        except Exception as error:  # recorded, and the next configuration runs
            traceback.print_exc()
            _free_after_failure(device)
            record(method, size, dict(model_fields, status="failed", error=_error_text(error)))
            continue
        record(
            method, size, dict(model_fields, status="ok", **summarise(runs, lm_params, vision_params, args.peak_tflops))
        )
    return rows


def _measure(method, size, loaded, questions, halp_questions, images_dir, args, out_dir, tower) -> Run:
    if method == "halp_loop":
        return run_halp_loop(loaded, halp_questions, images_dir, args.new_tokens, tower)
    if method == PREFILL_ONLY:
        return run_engine(loaded, questions, images_dir, size, args.new_tokens, out_dir, tower, answers=False)
    decoding = DECODING_OF_METHOD[method]
    return run_engine(loaded, questions, images_dir, size, args.new_tokens, out_dir, tower, decoding=decoding)


def _warm_up(loaded, questions, images_dir, args, out_dir, tower, pending) -> None:
    """Untimed first calls (they allocate, pick kernels, fill caches; compiled decoding compiles at the
    largest batch size, other shapes may compile again in their timed runs). A failure here is only reported:
    the configuration that meets it again records it."""
    largest = max((size for method, size in pending if method != "halp_loop"), default=1)
    decodings = dict.fromkeys([DYNAMIC] + [DECODING_OF_METHOD[m] for m, _ in pending if m in DECODING_OF_METHOD])

    def engine(decoding):
        return lambda: run_engine(
            loaded, questions[:largest], images_dir, largest, args.new_tokens, out_dir, tower, decoding=decoding
        )

    warm_ups = (
        *(engine(decoding) for decoding in decodings),
        lambda: run_halp_loop(loaded, questions[:1], images_dir, args.new_tokens, tower),
    )
    for warm_up in warm_ups:
        try:
            warm_up()
        except Exception as error:
            print(f"  warm-up failed ({_error_text(error)}); measuring anyway", file=sys.stderr, flush=True)
            _free_after_failure(loaded.device)


def with_ratios(rows: list[dict]) -> list[dict]:
    """The rows with `speedup_vs_halp_loop` (over the family's loop) and `speedup_vs_engine` (over the
    generating engine at the same batch size), where both sides completed; None otherwise."""
    speed = {configuration_key(r): r["samples_per_s"] for r in rows if r["status"] == "ok"}
    out = []
    for r in rows:
        loop = speed.get((r["family"], "halp_loop", 1))
        engine = speed.get((r["family"], ENGINE, r["batch_size"])) if r["method"] != "halp_loop" else None
        mine = speed.get(configuration_key(r))
        out.append(
            r
            | dict(
                speedup_vs_halp_loop=mine / loop if mine is not None and loop else None,
                speedup_vs_engine=mine / engine if mine is not None and engine else None,
            )
        )
    return out


# -- report ------------------------------------------------------------------------------------------
COLUMNS = (
    ("samples/s", "{:>9.2f}", "samples_per_s"),
    ("failed", "{:>6}", "failed_samples"),
    ("vs loop", "{:>7.2f}", "speedup_vs_halp_loop"),
    ("vs engine", "{:>9.2f}", "speedup_vs_engine"),
    ("prompt tok/s", "{:>12.0f}", "prompt_tokens_per_s"),
    ("pad", "{:>5.0%}", "padding_share"),
    ("TFLOP/s", "{:>8.4f}", "prefill_tflops"),
    ("roofline", "{:>8}", "roofline_share"),
    ("peak MB", "{:>8.0f}", "peak_memory_mb"),
)
STAGES = ("preprocess", "preprocess_wait", "prefill", "decode", "write")


def format_table(rows: list[dict]) -> str:
    """One line per configuration (rows as `with_ratios` gives them); a failed one shows its error."""
    header = ["family", "method", "batch"] + [name for name, _, _ in COLUMNS] + [f"{s} s" for s in STAGES]
    lines = [" | ".join(header)]
    for r in rows:
        cells = [f"{r['family']:<16}", f"{r['method']:<22}", f"{r['batch_size']:>5}"]
        if r["status"] != "ok":
            lines.append(" | ".join(cells + [f"FAILED: {r['error'].splitlines()[0][:200]}"]))
            continue
        for _, fmt, key in COLUMNS:
            value = r[key]
            if key == "roofline_share":
                value = "-" if value is None else f"{value:.1%}"
            elif value is None:
                value, fmt = "-", "{:>8}"
            cells.append(fmt.format(value))
        cells += [f"{r['breakdown_s'][s]:.2f}" for s in STAGES]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    from vlmstates import __version__

    # first: the rows measure the allocator the jobs run with, and naming the GPU initialises CUDA
    allocator = configure_cuda_allocator() if device.type == "cuda" else None
    return dict(
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            allocator=allocator,
        ),
        versions=dict(
            torch=str(torch.__version__),
            transformers=transformers.__version__,
            python=platform.python_version(),
            vlmstates=__version__,
            cuda=torch.version.cuda if device.type == "cuda" else None,
        ),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


#: Named sets of defaults (options given on the command line win). quick: fits 10 minutes on one GPU (not
#: measured there yet): the two most used families at full size, batch 1 and 32, every method.
PRESETS = {
    "quick": dict(
        families=["qwen2_5_vl", "gemma3"],
        models="full",
        batch_sizes=[1, 32],
        samples=64,
        halp_samples=16,
        new_tokens=32,
        repeats=1,
    )
}
#: Settings that change what a configuration measures: a --resume must keep them.
MEASURED_SETTINGS = (
    "models",
    "device",
    "dtype",
    "samples",
    "halp_samples",
    "new_tokens",
    "image_sizes",
    "repeats",
    "peak_tflops",
    "seed",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named set of defaults (PRESETS)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument(
        "--models",
        choices=("tiny", "full"),
        default="tiny",
        help="tiny checkpoints, or full-size architectures with random weights (FULL_SIZE)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="auto: bfloat16 on CUDA, float32 elsewhere",
    )
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument(
        "--decodings",
        nargs="+",
        choices=DECODINGS,
        default=[DYNAMIC],
        help="the engine's answer decodings to measure (the model entry's `decoding`); dynamic is method engine",
    )
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--halp-samples", type=int, default=None, help="samples for the HALP-style loop (default: all)")
    p.add_argument("--new-tokens", type=int, default=32, help="answer length, fixed (min = max new tokens)")
    p.add_argument("--image-sizes", nargs="+", type=parse_size, default=[(640, 480), (1024, 768)])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, for the roofline share")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workdir", type=Path, default=None, help="for checkpoints, images and outputs (default: a temporary folder)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmark.jsonl"),
        help="JSON lines: the run's environment, then one line per configuration as it completes",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="append to --out and skip the configurations it holds as ok (without it, --out is started anew)",
    )
    preset = p.parse_known_args(argv)[0].preset
    if preset is not None:
        p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _done_before(args: argparse.Namespace) -> set[tuple]:
    """--resume: the configurations --out holds as ok, after checking it measured the same thing."""
    records = read_records(args.out)
    settings = json.loads(json.dumps(_settings(args)))  # as JSON gives them back: tuples become lists
    for before in (r["settings"] for r in records if r.get("record") == "run"):
        changed = [k for k in MEASURED_SETTINGS if before.get(k) != settings[k]]
        if changed:
            raise SystemExit(
                f"--resume: {args.out} was measured with other {', '.join(changed)} "
                f"({', '.join(f'{k}={before.get(k)}' for k in changed)}); use the same options, or another --out"
            )
    return {configuration_key(r) for r in latest_rows(records) if r["status"] == "ok"}


def main(argv=None) -> list[dict]:
    """Runs the benchmark; returns the table's rows (from --out: this run's and, with --resume, earlier ones)."""
    args = parse_args(argv)
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    done = _done_before(args) if args.resume else set()
    if not args.resume:
        args.out.unlink(missing_ok=True)
    recorder = Recorder(args.out)
    recorder.save(
        dict(record="run")
        | environment(device, dtype)
        | dict(
            command=" ".join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
            settings=_settings(args),
        )
    )
    with tempfile.TemporaryDirectory(prefix="vlmstates-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        for family in args.families:
            print(f"benchmarking {family} ({args.models}) on {device} ...", file=sys.stderr, flush=True)
            benchmark_family(family, args, device, dtype, workdir, save=recorder.save, done=done)
            _free_after_failure(device)  # the model is gone: give its memory back before the next one
    rows = with_ratios(latest_rows(read_records(args.out)))
    print(format_table(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"written {args.out}" + (f"; {len(failed)} configurations failed" if failed else ""), file=sys.stderr)
    return rows
