"""`preprocess`: text -> Megatron indexed dataset (PREFIX_text_document.bin/.idx is Megatron-LM's name;
here the output is exactly OUTPUT_PREFIX.bin / OUTPUT_PREFIX.idx), written with megatron-core's
IndexedDatasetBuilder so megatron's GPTDataset reads it.

Inputs: .jsonl / .json (one JSON object per line, text under --json-key), .parquet (text in column
--json-key; read row group by row group; a directory of .parquet files is one dataset, files in sorted
order) or plain text (.txt and anything else: one document per paragraph, paragraphs separated by blank lines).
The output is written next to its final name and renamed at the end, so an interrupted run leaves
no half-written dataset behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from megatron_patch.errors import UserError

BATCH = 256  # documents per tokenizer call (the fast tokenizer parallelises inside a batch)


def iter_documents(path: Path, json_key: str = "text") -> Iterator[tuple[str | None, int]]:
    """(document text, bytes of input consumed) for a .jsonl file or a paragraph-separated text file;
    text is None for input that holds no document (blank lines, null parquet cells)."""
    if path.suffix == ".parquet":
        from megatron_patch.data.parquet import iter_parquet_documents

        yield from iter_parquet_documents(path, json_key)
        return
    if path.suffix in (".jsonl", ".json"):
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line:
                    yield None, len(raw)
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}); one JSON object per line expected") from None
                if not isinstance(obj, dict) or json_key not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise UserError(f"{path}:{lineno}: no {json_key!r} key (found {keys}); pass --json-key")
                text = obj[json_key]
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: {json_key!r} is {type(text).__name__}, expected a string")
                yield text, len(raw)
        return
    paragraph: list[str] = []
    consumed = 0
    with path.open("rb") as f:
        for raw in f:
            consumed += len(raw)
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line.strip():
                paragraph.append(line.strip())
            elif paragraph:
                yield " ".join(paragraph), consumed
                paragraph, consumed = [], 0
    yield (" ".join(paragraph) if paragraph else None), consumed


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Input files; a directory stands for the .parquet files under it (sorted)."""
    from megatron_patch.data.parquet import parquet_files

    paths: list[Path] = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            paths += parquet_files(p)
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"--input {p}: file not found")
    return paths


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise UserError(f"--tokenizer {path}: not a directory (give the HF model directory holding tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"--tokenizer {path}: cannot load a tokenizer ({err})") from None


def preprocess(inputs: list[str], tokenizer_dir: str, output_prefix: str, json_key: str = "text",
               append_eod: bool = False, progress: bool | None = None, force: bool = False) -> dict:
    """Tokenize `inputs` into OUTPUT_PREFIX.bin/.idx; returns counts (documents, tokens, dtype)."""
    import numpy
    from tqdm import tqdm

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    paths = expand_inputs(inputs)
    _check_output(Path(output_prefix), paths, force)
    tok = load_tokenizer(tokenizer_dir)
    vocab = len(tok)
    eod = tok.eos_token_id
    if append_eod and eod is None:
        raise UserError(f"--append-eod: the tokenizer in {tokenizer_dir} has no eos token")
    dtype = DType.optimal_dtype(vocab)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = out.with_name(out.name + f".bin.tmp-{os.getpid()}")
    tmp_idx = out.with_name(out.name + f".idx.tmp-{os.getpid()}")
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    stats = {"documents": 0, "tokens": 0, "empty": 0, "dtype": numpy.dtype(dtype).name, "vocab_size": vocab}

    def flush(batch: list[str]) -> None:
        if not batch:
            return
        for ids in tok(batch, add_special_tokens=False)["input_ids"]:
            if append_eod:
                ids = ids + [eod]
            if not ids:
                stats["empty"] += 1
                continue
            builder.add_document(ids, [len(ids)])
            stats["documents"] += 1
            stats["tokens"] += len(ids)

    total = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
               disable=None if progress is None else not progress, dynamic_ncols=True)  # None: bar on a terminal only
    try:
        for path in paths:
            batch: list[str] = []
            for text, nbytes in iter_documents(path, json_key):
                bar.update(nbytes)
                if text is None:
                    continue
                if text.strip():
                    batch.append(text)
                else:
                    stats["empty"] += 1
                if len(batch) >= BATCH:
                    flush(batch)
                    batch = []
            flush(batch)
        if stats["documents"] == 0:
            raise UserError(f"no non-empty documents in {', '.join(map(str, paths))}")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, out.with_name(out.name + ".bin"))
        os.replace(tmp_idx, out.with_name(out.name + ".idx"))
    finally:
        bar.close()
        for leftover in (tmp_bin, tmp_idx):
            if leftover.exists():
                leftover.unlink()
    return stats


def _check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """PREFIX.bin/.idx may not be an input; an existing pair is replaced only with --force and only if it is
    a Megatron indexed dataset (what this command writes): never someone's other file."""
    files = [out.with_name(out.name + ext) for ext in (".bin", ".idx")]
    for f in files:
        if any(f.resolve() == p.resolve() for p in inputs):
            raise UserError(f"output {f} is the input {f}: choose another --output-prefix")
    existing = [f for f in files if f.exists()]
    if existing and not force:
        raise UserError(f"output {existing[0]} already exists (pass --force to replace it, or choose another "
                        "--output-prefix)")
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER

    idx = files[1]
    if idx.is_file():
        with open(idx, "rb") as f:
            ours = f.read(len(_INDEX_HEADER)) == _INDEX_HEADER
    else:
        ours = False
    if existing and (not ours or any(not f.is_file() for f in existing)):
        raise UserError(f"output {existing[0]} exists and is not a Megatron indexed dataset: --force replaces only "
                        "an earlier .bin/.idx pair; choose another --output-prefix")


def run(args) -> int:
    if args.sft:
        from megatron_patch.data.sft import run as run_sft

        return run_sft(args)
    if args.seq_length is not None or args.drop_long:
        raise UserError("--seq-length/--drop-long apply to --sft data only")
    stats = preprocess(args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
                       append_eod=args.append_eod, force=args.force)
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens "
          f"({stats['dtype']}, vocab {stats['vocab_size']}; {stats['empty']} empty skipped)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("preprocess", help="tokenize text into a Megatron indexed dataset (.bin/.idx)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, nargs="+",
                   help=".jsonl (one JSON object per line), .parquet or a directory of .parquet files (text column "
                        "--json-key), or plain text (one document per paragraph)")
    p.add_argument("--tokenizer", required=True, help="HF model/tokenizer directory")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-key", default="text", help="JSON field / parquet column holding the text (default: text)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the eos token")
    p.add_argument("--sft", action="store_true", help="instruction data (.json list / .jsonl of instruction/input/"
                   "output/difficulty or chat messages): tokens + answer-only loss mask (see megatron_patch/data/sft.py)")
    p.add_argument("--seq-length", type=int, default=None, metavar="N",
                   help="--sft: cut samples longer than N tokens (counted in the summary)")
    p.add_argument("--drop-long", action="store_true", help="--sft: drop samples longer than --seq-length instead")
    p.add_argument("--force", action="store_true", help="replace an existing PREFIX.bin/.idx written by preprocess")
    p.set_defaults(func=run)


def indexed_from_text(path: str, tokenizer_dir: str, cache_dir: str | None = None) -> str:
    """A Megatron prefix for a text/jsonl file tokenized with tokenizer_dir, made once and reused: cached under
    cache_dir (default $MP_DATA_CACHE or the temp dir) by the contents of both. Safe when every rank of a
    torchrun calls it at once: preprocess writes temp names and renames (identical content either way)."""
    import hashlib
    import tempfile

    src = Path(path)
    if not src.is_file():
        raise UserError(f"--data-path {path}: file not found")
    digest = hashlib.sha256(src.read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        f = Path(tokenizer_dir) / name
        if f.is_file():
            digest.update(name.encode() + f.read_bytes())
    root = Path(cache_dir or os.environ.get("MP_DATA_CACHE") or tempfile.gettempdir()) / "megatron_patch_data"
    prefix = root / f"{src.stem}-{digest.hexdigest()[:16]}"
    if not Path(str(prefix) + ".idx").is_file():  # .idx is renamed into place last
        preprocess([str(src)], tokenizer_dir, str(prefix), append_eod=True, progress=False)
    return str(prefix)
