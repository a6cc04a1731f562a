"""The HDF5 schema: the one module that knows how embeddings are laid out on disk.

Columnar layout, row i = sample i:
  strings   question_id, image_id, question, ground_truth_answer, answer, status, error
  ints      vision_token_position, query_token_position, num_prompt_tokens, num_image_tokens
            (and paper_vision_token_position in a file with paper positions)
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
STATUS_OK = "ok"
STATUS_FAILED = "failed"

#: File attribute: the answer's effective generation settings (JSON of GenerationConfig fields).
GENERATION_CONFIG_ATTR = "generation_config"
#: File attribute: false for a prefill-only file (the model entry's `answers: false`), whose answers are empty.
ANSWERS_ATTR = "answers"
#: File attribute: true when the file also holds PAPER_VISION_TOKEN vectors and the PAPER_VISION_POSITION column.
PAPER_POSITIONS_ATTR = "paper_positions"
#: File attribute of a family with a pixel budget (vlmstates.extraction.image_budget): JSON {min_pixels, max_pixels},
#: the bounds the processor resized every image to (the config's, else the checkpoint's).
IMAGE_BUDGET_ATTR = "image_budget"

# Attributes that must agree between shards of one merged file.
SHARD_INVARIANT_ATTRS = (
    "model",
    "revision",
    "family",
    "layers",
    "num_decoder_layers",
    "hidden_size",
    "vision_hidden_size",
    "dtype",
    "max_new_tokens",
    GENERATION_CONFIG_ATTR,
    "prompt_template",
    PAPER_POSITIONS_ATTR,
    IMAGE_BUDGET_ATTR,
    "config_hash",
    "schema_version",
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
    PAPER_VISION_POSITION: "where the HALP paper's code took the last image token for this family (vlmstates.extraction.positions.PAPER_VISION_RULES), in the sample's own prompt, padding excluded, the prompt length measured as at batch 1; not necessarily an image token",
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
        for key, dim in vector_dims.items():
            data = np.full((n, dim), np.nan, dtype=np.float32)
            for i, r in enumerate(results):
                if key in r.vectors:
                    data[i] = r.vectors[key]
            f.create_dataset(key, data=data)
        f.attrs["schema_version"] = SCHEMA_VERSION
        for name, value in {"semantics": SEMANTICS, **attrs}.items():
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
        return list(self.attrs.get("layers", []))

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


def read_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    with h5py.File(path, "r") as f:
        missing = [c for c in STRING_COLUMNS + INT_COLUMNS if c not in f]
        if missing:
            raise ValueError(f"{path}: not an embeddings file of this schema (missing {', '.join(missing)})")
        table = pd.DataFrame({c: f[c].asstr()[()] for c in STRING_COLUMNS})
        for c in INT_COLUMNS:
            table[c] = f[c][()]
        if PAPER_VISION_POSITION in f:
            table[PAPER_VISION_POSITION] = f[PAPER_VISION_POSITION][()]
        attrs = {name: decode_attr(value) for name, value in f.attrs.items()}
        dims = vector_dims(f)
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
        for key in reference.representation_keys():
            out.create_dataset(key, data=np.concatenate([s.load(key) for s in shards]))
        for name, value in reference.attrs.items():
            out.attrs[name] = _to_attr(value)
        out.attrs["num_shards"] = len(shards)
        out.attrs["created"] = pd.Timestamp.now(tz="UTC").isoformat()
        for name in ("device", "created"):
            out.attrs[f"shard_{name}s"] = json.dumps([str(s.attrs.get(name, "")) for s in shards])
    return Path(out_path)


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
