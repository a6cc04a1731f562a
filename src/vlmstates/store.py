"""The HDF5 schema: the one module that knows how embeddings are laid out on disk.

Columnar layout, row i = sample i:
  strings   question_id, image_id, question, ground_truth_answer, answer, status, error
  ints      vision_token_position, query_token_position, num_prompt_tokens, num_image_tokens
            (and paper_vision_token_position in a file with paper positions)
            batch_size: the rows of the batch the sample ran in (0: it did not run; a file written before
            this column existed has none)
  vectors   vision_only_representation [N, Dv]
            {vision_token,query_token,multimodal,paper_vision_token}_representation/layer_k [N, D]
File attributes describe the model and the exact semantics of every vector.
Failed samples keep their row (status "failed", the error text) with NaN vectors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from vlmstates.atomic import atomic_path
from vlmstates.errors import VlmstatesError

SCHEMA_VERSION = 1

STRING_COLUMNS = ("question_id", "image_id", "question", "ground_truth_answer", "answer", "status", "error")
INT_COLUMNS = ("vision_token_position", "query_token_position", "num_prompt_tokens", "num_image_tokens")
# The vector datasets' names: one vision-only vector per sample, and per decoder layer k the
# representations stored as "<name>/layer_k" (`layer_key`, read back by `parse_key`).
VISION_ONLY = "vision_only_representation"
VISION_TOKEN = "vision_token_representation"
QUERY_TOKEN = "query_token_representation"
MULTIMODAL = "multimodal_representation"
#: VT at the position the HALP paper's code used (the model entry's `paper_positions: true`).
PAPER_VISION_TOKEN = "paper_vision_token_representation"
LAYERED_REPRESENTATIONS = (VISION_TOKEN, QUERY_TOKEN, MULTIMODAL, PAPER_VISION_TOKEN)
#: The int column of a file with paper positions (file attribute PAPER_POSITIONS_ATTR true), -1 in failed rows.
PAPER_VISION_POSITION = "paper_vision_token_position"
#: The int column of the batch size each row ran in (0 in failed rows): on a GPU, low-precision vectors
#: depend on it (kernels and GEMM shapes differ with the batch). Optional on reading: older files lack it.
BATCH_SIZE_COLUMN = "batch_size"
#: Int columns that came later: files written before them still read (without the column).
OPTIONAL_INT_COLUMNS = (PAPER_VISION_POSITION, BATCH_SIZE_COLUMN)
STATUS_OK = "ok"
STATUS_FAILED = "failed"

# -- file attributes: the names of every attribute an embeddings file carries, declared once here --------
# What was run (written by the engine, vlmstates.extraction.engine.Extractor.attributes):
MODEL_ATTR = "model"  #: the checkpoint: hub id or local folder, as the config's models.<key>.model
REVISION_ATTR = "revision"
FAMILY_ATTR = "family"
#: JSON: what every position and vector means (`file_semantics`)
SEMANTICS_ATTR = "semantics"
LAYERS_ATTR = "layers"
NUM_DECODER_LAYERS_ATTR = "num_decoder_layers"
HIDDEN_SIZE_ATTR = "hidden_size"
VISION_HIDDEN_SIZE_ATTR = "vision_hidden_size"
IMAGE_TOKEN_ID_ATTR = "image_token_id"
DTYPE_ATTR = "dtype"
#: False for a prefill-only file (the model entry's `answers: false`), whose answers are empty.
ANSWERS_ATTR = "answers"
MAX_NEW_TOKENS_ATTR = "max_new_tokens"
#: The answer's effective generation settings (JSON of GenerationConfig fields).
GENERATION_CONFIG_ATTR = "generation_config"
PROMPT_TEMPLATE_ATTR = "prompt_template"
#: Whether the file holds MULTIMODAL vectors (the model entry's `multimodal_representation`).
MULTIMODAL_ATTR = "multimodal_representation"
#: True when the file also holds PAPER_VISION_TOKEN vectors and the PAPER_VISION_POSITION column.
PAPER_POSITIONS_ATTR = "paper_positions"
TRUST_REMOTE_CODE_ATTR = "trust_remote_code"
DEVICE_ATTR = "device"
ATTN_IMPLEMENTATION_ATTR = "attn_implementation"
TRANSFORMERS_VERSION_ATTR = "transformers_version"
TORCH_VERSION_ATTR = "torch_version"
PYTHON_VERSION_ATTR = "python_version"
PACKAGE_VERSION_ATTR = "package_version"
#: ModelSettings.config_hash(): the settings that change the recorded numbers
CONFIG_HASH_ATTR = "config_hash"
# Written by `write_embeddings`:
SCHEMA_VERSION_ATTR = "schema_version"
# A shard's (vlmstates.extraction.shards): which slice of the dataset it holds, and when it was written.
SHARD_ATTR = "shard"
SHARD_SIZE_ATTR = "shard_size"
#: a hash of the shard's question ids
SHARD_QUESTIONS_ATTR = "shard_questions"
CREATED_ATTR = "created"
# A merged file's (`merge_shards`): its shards' count, and each shard's machine and creation time
# (shard_values_attr).
NUM_SHARDS_ATTR = "num_shards"
#: File attributes of the machine the vectors were computed on: the device's name (the GPU's, or the CPU's
#: architecture), torch's CUDA and cuDNN versions ("" without CUDA), and the attention implementation each
#: sub-model ran with (JSON: "model" for the top config, then its sub-configs' names, e.g. text_config).
DEVICE_NAME_ATTR = "device_name"
CUDA_VERSION_ATTR = "cuda_version"
CUDNN_VERSION_ATTR = "cudnn_version"
ATTENTION_IMPLEMENTATIONS_ATTR = "attn_implementations"
#: Attributes that may differ between the shards of one merged file (shards run on different nodes): the
#: merged file lists each shard's value under shard_values_attr(name), and keeps the value itself only where
#: all agree.
SHARD_MACHINE_ATTRS = (DEVICE_ATTR, DEVICE_NAME_ATTR, CUDA_VERSION_ATTR, CUDNN_VERSION_ATTR, TORCH_VERSION_ATTR)
#: The merged attribute's value where the shards' values differ.
MIXED_ATTR_VALUE = "mixed: see {name}"
#: File attribute: where the questions came from (JSON: the dataset source(s) with kind, path or Hub id, config,
#: split, revision, file SHA-256 or dataset fingerprint, and column map; vlmstates.sources), "{}" when unknown.
DATASET_SOURCE_ATTR = "dataset_source"
#: File attribute of a family with a pixel budget (vlmstates.extraction.image_budget): JSON {min_pixels, max_pixels},
#: the bounds the processor resized every image to (the config's, else the checkpoint's).
IMAGE_BUDGET_ATTR = "image_budget"


#: The attributes whose every shard's value a merged file lists, under shard_values_attr(name).
PER_SHARD_LISTED_ATTRS = (*SHARD_MACHINE_ATTRS, CREATED_ATTR)


def shard_values_attr(name: str) -> str:
    """The merged file's attribute listing each shard's value of attribute `name` (JSON list), e.g. shard_devices."""
    return f"shard_{name}s"


#: Attributes that must agree between shards of one merged file.
SHARD_INVARIANT_ATTRS = (
    MODEL_ATTR,
    REVISION_ATTR,
    FAMILY_ATTR,
    LAYERS_ATTR,
    NUM_DECODER_LAYERS_ATTR,
    HIDDEN_SIZE_ATTR,
    VISION_HIDDEN_SIZE_ATTR,
    DTYPE_ATTR,
    MAX_NEW_TOKENS_ATTR,
    GENERATION_CONFIG_ATTR,
    PROMPT_TEMPLATE_ATTR,
    PAPER_POSITIONS_ATTR,
    DATASET_SOURCE_ATTR,
    CONFIG_HASH_ATTR,
    SCHEMA_VERSION_ATTR,
    # the kernels are part of the numbers: one file runs with one attention implementation per sub-model
    ATTENTION_IMPLEMENTATIONS_ATTR,
    IMAGE_BUDGET_ATTR,
)

SEMANTICS = {
    "query_token_position": "index of the last prompt token (the generation prompt's last token) in the sample's own prompt, padding excluded",
    "vision_token_position": "index of the last image-placeholder token (the model config's image token id) in the sample's own prompt, padding excluded",
    "layer_k": "output of decoder block k (0-based); equals output_hidden_states[k+1] for k < n-1, the last block's output before the final norm",
    "vision_only_representation": "input of the vision-to-language projector, mean-pooled over the sample's image patches",
    "multimodal_representation": "mean over all non-pad prompt tokens of decoder block k's output",
    "answer": "greedy decoding from the same generate() call whose prefill the vectors were captured from, with the settings of attribute generation_config (the checkpoint's generation_config.json, the config's generation overrides, do_sample false, one beam; sampling-only fields, which greedy decoding ignores, left out); special tokens skipped",
}
#: The answer's semantics in a prefill-only file (attribute answers false).
PREFILL_ONLY_ANSWER = "empty: prefill-only extraction (the model entry's answers: false); the vectors were captured from the prefill forward of a generate() call limited to one new token (attribute generation_config), which was discarded, so no answer was decoded"

#: The paper-position entries of the semantics of a file with paper positions (attribute paper_positions true).
PAPER_POSITIONS_SEMANTICS = {
    PAPER_VISION_POSITION: "where the HALP paper's code took the last image token for this family (vlmstates.extraction.paper_positions.PAPER_VISION_RULES), in the sample's own prompt, padding excluded, the prompt length measured as at batch 1; not necessarily an image token",
    PAPER_VISION_TOKEN: "decoder block k's output at paper_vision_token_position, for comparison with vision_token_representation",
}


def file_semantics(family_semantics: str, answered: bool = True, paper_positions: bool = False) -> dict:
    """The `semantics` attribute: the common definitions (the answer's for a prefill-only file, the paper
    positions' when recorded) and, under "family", what VT and VF hold in this family."""
    answer = {} if answered else {"answer": PREFILL_ONLY_ANSWER}
    paper = PAPER_POSITIONS_SEMANTICS if paper_positions else {}
    return {**SEMANTICS, **answer, **paper, "family": family_semantics}


_STRING_DTYPE = h5py.string_dtype("utf-8")
_LAYER_KEY = re.compile(r"^layer_(\d+)$")


def layer_key(representation: str, layer: int) -> str:
    return f"{representation}/layer_{layer}"


def parse_key(key: str) -> tuple[str, int | None]:
    """A vector dataset's name read back: (representation, layer), the layer None for VISION_ONLY."""
    if key == VISION_ONLY:
        return VISION_ONLY, None
    representation, _, name = key.partition("/")
    found = _LAYER_KEY.match(name)
    if representation not in LAYERED_REPRESENTATIONS or not found:
        raise ValueError(f"{key!r} is not a vector of this schema ({VISION_ONLY} or <representation>/layer_k)")
    return representation, int(found[1])


@dataclass
class SampleResult:
    """Everything recorded for one question; vectors keyed as in the file (see `layer_key`)."""

    question_id: str
    image_id: str
    question: str
    ground_truth_answer: str
    answer: str = ""
    status: str = STATUS_OK
    error: str = ""
    vision_token_position: int = -1
    query_token_position: int = -1
    num_prompt_tokens: int = 0
    num_image_tokens: int = 0
    #: the paper code's vision position (PAPER_VISION_POSITION), None when not recorded
    paper_vision_token_position: int | None = None
    #: the rows of the batch the sample ran in (BATCH_SIZE_COLUMN), 0 if it did not run
    batch_size: int = 0
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def failed(cls, question_id, image_id, question, ground_truth_answer, error: str) -> SampleResult:
        return cls(question_id, image_id, question, ground_truth_answer, status=STATUS_FAILED, error=error)


def _to_attr(value):
    if isinstance(value, (dict, list, tuple)) and not (
        isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value)
    ):
        return json.dumps(value)
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # str subclasses (torch's version string) have no HDF5 type
    return value


def decode_attr(value):
    """A file attribute as Python: integer arrays as lists of int, numpy integers as int, bytes as str."""
    if isinstance(value, np.ndarray):
        return [int(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, bytes):
        return value.decode()
    return value


def write_embeddings(
    path: str | Path,
    results: Sequence[SampleResult],
    vector_dims: dict[str, int],
    attrs: dict,
) -> Path:
    """Write `results` in dataset order; `vector_dims` names every vector dataset and its width.

    Written under a temporary name and renamed, so a killed writer never leaves a truncated file.
    """
    n = len(results)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for column in STRING_COLUMNS:
            f.create_dataset(column, data=[str(getattr(r, column)) for r in results], dtype=_STRING_DTYPE)
        for column in INT_COLUMNS:
            f.create_dataset(column, data=np.array([getattr(r, column) for r in results], dtype=np.int64))
        if attrs.get(PAPER_POSITIONS_ATTR):
            paper = [-1 if r.paper_vision_token_position is None else r.paper_vision_token_position for r in results]
            f.create_dataset(PAPER_VISION_POSITION, data=np.array(paper, dtype=np.int64))
        f.create_dataset(BATCH_SIZE_COLUMN, data=np.array([r.batch_size for r in results], dtype=np.int64))
        for key, dim in vector_dims.items():
            data = np.full((n, dim), np.nan, dtype=np.float32)
            for i, r in enumerate(results):
                if key in r.vectors:
                    data[i] = r.vectors[key]
            f.create_dataset(key, data=data)
        f.attrs[SCHEMA_VERSION_ATTR] = SCHEMA_VERSION
        for name, value in {SEMANTICS_ATTR: SEMANTICS, **attrs}.items():
            f.attrs[name] = _to_attr(value)
    return Path(path)


@dataclass
class Embeddings:
    """A columnar embeddings file read back: scalar columns as a table, vectors loaded on demand."""

    path: Path
    table: pd.DataFrame
    attrs: dict
    vector_dims: dict[str, int]

    @property
    def layers(self) -> list[int]:
        return list(self.attrs.get(LAYERS_ATTR, []))

    @property
    def generation_config(self) -> dict | None:
        """The answer's effective generation settings (None in files written before they were recorded)."""
        value = self.attrs.get(GENERATION_CONFIG_ATTR)
        return json.loads(value) if value else None

    def representation_keys(self) -> list[str]:
        """Vector dataset names: the vision-only one first, then each representation by layer."""
        return sorted(self.vector_dims, key=_representation_sort_key)

    def load(self, key: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            data = f[key]
            return data[()] if rows is None else data[rows]


def _representation_sort_key(key: str):
    representation, layer = parse_key(key)
    if layer is None:
        return (0, "", -1)
    return (1 + LAYERED_REPRESENTATIONS.index(representation), representation, layer)


def vector_dims(group: h5py.Group) -> dict[str, int]:
    """The vectors under `group` (a columnar file, or one question's group of the seed layout) and their
    widths, in `representation_keys` order; other members are not vectors and are left out."""
    dims = {}
    if VISION_ONLY in group:
        dims[VISION_ONLY] = int(group[VISION_ONLY].shape[-1])
    for representation in LAYERED_REPRESENTATIONS:
        for name, data in group.get(representation, {}).items():
            if _LAYER_KEY.match(name):
                dims[f"{representation}/{name}"] = int(data.shape[-1])
    return {key: dims[key] for key in sorted(dims, key=_representation_sort_key)}


class EmbeddingsFileError(VlmstatesError, ValueError):
    """A file cannot be read as an embeddings file; the message names it, in one line."""


_WRITTEN_BY_US = "give an embeddings file that vlmstates wrote (results/<model>/embeddings.h5, or a shard)"


def check_columnar(f: h5py.File, path: str | Path) -> None:
    """Refuse a file that lacks a column of this schema (a seed-layout part, another program's HDF5)."""
    missing = [c for c in STRING_COLUMNS + INT_COLUMNS if c not in f]
    if missing:
        raise EmbeddingsFileError(
            f"{path}: not an embeddings file of this schema (missing {', '.join(missing)}); {_WRITTEN_BY_US}"
        )


def read_table(f: h5py.File, rows: slice = slice(None)) -> pd.DataFrame:
    """The scalar columns of an open columnar file (the string ones first, then the int ones), for `rows`
    only: each column is read from disk for that slice alone."""
    table = pd.DataFrame({c: f[c].asstr()[rows] for c in STRING_COLUMNS})
    optional = tuple(c for c in OPTIONAL_INT_COLUMNS if c in f)
    for c in INT_COLUMNS + optional:
        table[c] = f[c][rows]
    return table


def read_attrs(f: h5py.File) -> dict:
    return {name: decode_attr(value) for name, value in f.attrs.items()}


def read_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsFileError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            check_columnar(f, path)
            table = read_table(f)
            attrs = read_attrs(f)
            dims = vector_dims(f)
    except EmbeddingsFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as error:  # not HDF5, truncated, or columns of other types
        reason = " ".join(str(error).split())
        raise EmbeddingsFileError(f"{path}: unreadable as an embeddings file ({reason}); {_WRITTEN_BY_US}") from error
    return Embeddings(path=path, table=table, attrs=attrs, vector_dims=dims)


def read_results(path: str | Path) -> list[SampleResult]:
    """The rows of a file as `SampleResult`s, vectors included (to resume from saved progress)."""
    emb = read_embeddings(path)
    vectors = {key: emb.load(key) for key in emb.representation_keys()}
    results = []
    for i, row in enumerate(emb.table.itertuples(index=False)):
        values = {c: getattr(row, c) for c in STRING_COLUMNS} | {c: int(getattr(row, c)) for c in INT_COLUMNS}
        ok = values["status"] == STATUS_OK
        if PAPER_VISION_POSITION in emb.table and ok:
            values[PAPER_VISION_POSITION] = int(getattr(row, PAPER_VISION_POSITION))
        if BATCH_SIZE_COLUMN in emb.table:
            values[BATCH_SIZE_COLUMN] = int(getattr(row, BATCH_SIZE_COLUMN))
        results.append(SampleResult(**values, vectors={k: v[i] for k, v in vectors.items()} if ok else {}))
    return results


class MergeError(VlmstatesError, ValueError):
    """A shard cannot be merged; the message names the shard and the problem."""


def merge_shards(shard_paths: Sequence[str | Path], expected_question_ids: Sequence[str], out_path: str | Path) -> Path:
    """Concatenate shards in order after checking they cover `expected_question_ids` exactly once, in order."""
    shards = []
    for shard in map(Path, shard_paths):
        try:
            shards.append(read_embeddings(shard))
        except (OSError, ValueError, KeyError) as error:
            raise MergeError(f"shard {shard} is unreadable: {error}") from error
    if not shards:
        raise MergeError("no shards to merge")
    reference = shards[0]
    for shard in shards:
        _check_shard_agrees(shard, reference)
        _check_shard_vectors(shard)
    _check_coverage(shards, list(expected_question_ids))

    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as out:
        for column in STRING_COLUMNS:
            values = np.concatenate([s.table[column].to_numpy(dtype=object) for s in shards])
            out.create_dataset(column, data=values.tolist(), dtype=_STRING_DTYPE)
        for column in INT_COLUMNS:
            out.create_dataset(column, data=np.concatenate([s.table[column].to_numpy(np.int64) for s in shards]))
        if reference.attrs.get(PAPER_POSITIONS_ATTR):
            out.create_dataset(
                PAPER_VISION_POSITION,
                data=np.concatenate([s.table[PAPER_VISION_POSITION].to_numpy(np.int64) for s in shards]),
            )
        out.create_dataset(BATCH_SIZE_COLUMN, data=np.concatenate([_batch_sizes(s) for s in shards]))
        for key in reference.representation_keys():
            out.create_dataset(key, data=np.concatenate([s.load(key) for s in shards]))
        for name, value in reference.attrs.items():
            out.attrs[name] = _to_attr(value)
        out.attrs[NUM_SHARDS_ATTR] = len(shards)
        out.attrs[CREATED_ATTR] = pd.Timestamp.now(tz="UTC").isoformat()
        for name in PER_SHARD_LISTED_ATTRS:
            values = [str(s.attrs.get(name, "")) for s in shards]
            out.attrs[shard_values_attr(name)] = json.dumps(values)
            if name in SHARD_MACHINE_ATTRS and len(set(values)) > 1:
                out.attrs[name] = MIXED_ATTR_VALUE.format(name=shard_values_attr(name))
    return Path(out_path)


def _batch_sizes(shard: Embeddings) -> np.ndarray:
    """The shard's batch-size column; zeros (not recorded) for a shard written before it existed."""
    if BATCH_SIZE_COLUMN in shard.table:
        return shard.table[BATCH_SIZE_COLUMN].to_numpy(np.int64)
    return np.zeros(len(shard.table), dtype=np.int64)


def _check_shard_agrees(shard: Embeddings, reference: Embeddings) -> None:
    for name in SHARD_INVARIANT_ATTRS:
        if shard.attrs.get(name) != reference.attrs.get(name):
            raise MergeError(
                f"shard {shard.path}: attribute {name!r} is {shard.attrs.get(name)!r} "
                f"but {reference.path} has {reference.attrs.get(name)!r}"
            )
    if shard.vector_dims != reference.vector_dims:
        raise MergeError(
            f"shard {shard.path}: vectors {shard.vector_dims} differ from {reference.path}'s {reference.vector_dims}"
        )


def _check_shard_vectors(shard: Embeddings) -> None:
    ok = (shard.table["status"] == STATUS_OK).to_numpy()
    for key in shard.representation_keys():
        data = shard.load(key)
        if data.shape[0] != len(shard.table):
            raise MergeError(f"shard {shard.path}: {key} has {data.shape[0]} rows, the table {len(shard.table)}")
        bad = ok & ~np.isfinite(data).all(axis=1)
        if bad.any():
            first = shard.table["question_id"].to_numpy()[bad][:3].tolist()
            raise MergeError(
                f"shard {shard.path}: {key} has non-finite values in {int(bad.sum())} rows with status ok "
                f"(question_id {', '.join(first)})"
            )


def _check_coverage(shards: Sequence[Embeddings], expected: list[str]) -> None:
    found = [qid for s in shards for qid in s.table["question_id"]]
    if found == expected:
        return
    owner = {}
    for s in shards:
        for qid in s.table["question_id"]:
            if qid in owner:
                raise MergeError(f"question_id {qid!r} appears twice: in {owner[qid]} and {s.path}")
            owner[qid] = s.path
    missing = [qid for qid in expected if qid not in owner]
    if missing:
        raise MergeError(f"{len(missing)} validated questions are in no shard (first: {', '.join(missing[:5])})")
    unexpected = [qid for qid in found if qid not in set(expected)]
    if unexpected:
        raise MergeError(
            f"question_ids not in the validated dataset: {', '.join(unexpected[:5])} (in {owner[unexpected[0]]})"
        )
    position = {qid: i for i, qid in enumerate(found)}
    for a, b in zip(expected, expected[1:]):
        if position[a] > position[b]:
            raise MergeError(f"question {b!r} comes before {a!r} ({owner[b]}): shards are out of dataset order")


def iter_layers(keys: Iterable[str], representation: str) -> list[int]:
    """The layers that `keys` hold of `representation`, in order."""
    return sorted(layer for name, layer in map(parse_key, keys) if name == representation)
