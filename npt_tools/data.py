"""Training text: the builtin corpus, hub datasets and local files through `datasets`, packed into token windows
(deterministic and resumable from a position), and the held-out text evaluation runs on."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import re
from pathlib import Path

import torch

from npt_tools.arguments import TrainArgs
from npt_tools.cli import UserError, fail, first_line
from npt_tools.models import load_tokenizer_or_fail

EVAL_DOCS_STREAM = 8  # documents held out at the head of a stream
LOCAL_EXTS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def builtin_texts() -> list[str]:
    """The English reference text of pydoc_data.topics, cut into documents of whole paragraphs (~2k chars)."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        cur = ""
        for para in re.split(r"\n\s*\n", topics[key]):
            para = para.strip()
            if not para:
                continue
            if cur and len(cur) + len(para) > 2000:
                docs.append(cur)
                cur = ""
            cur = f"{cur}\n\n{para}" if cur else para
        if cur:
            docs.append(cur)
    return docs


def load_text_dataset(name: str, split: str, streaming: bool, text_column: str):
    """A `datasets` Dataset / IterableDataset with a text column; user errors for the obvious mistakes."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # its error logs would repeat our one line
    if name == "builtin":
        ds = datasets.Dataset.from_dict({"text": builtin_texts()})
        text_column = "text"
        return (ds.to_iterable_dataset() if streaming else ds), text_column
    path = Path(name).expanduser()
    try:
        if path.suffix.lower() in LOCAL_EXTS or path.exists() or name.startswith((".", "/", "~")):
            if not path.exists():
                fail(f"dataset {name!r} not found (give builtin, a hub dataset name, or a local "
                     f".txt/.jsonl/.json/.parquet file)")
            if path.is_file() and path.suffix.lower() not in LOCAL_EXTS:
                fail(f"dataset file {name!r} has an unknown type: use .txt, .jsonl, .json or .parquet")
            if path.is_file():
                if path.stat().st_size == 0:
                    fail(f"dataset {name!r} is empty")
                ds = datasets.load_dataset(LOCAL_EXTS[path.suffix.lower()], data_files=str(path), split="train",
                                           streaming=streaming)
            else:
                ds = datasets.load_dataset(str(path), split=split, streaming=streaming)
        else:
            ds = datasets.load_dataset(name, split=split, streaming=streaming)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError...)
        fail(f"cannot load dataset {name!r} (split {split!r}): {dataset_error(e)}")
    return ds, text_column


def dataset_error(e: BaseException) -> str:
    """What was wrong with a dataset, from the error datasets raises (its generation error wraps the cause)."""
    cause = e.__cause__ or e.__context__ if type(e).__name__ == "DatasetGenerationError" else None
    if cause is None:
        return first_line(e)
    if type(cause).__name__ == "SchemaInferenceError":
        return "it holds no records (no line of text, no JSON object)"
    if type(cause).__name__ == "ArrowInvalid" and "JSON" in str(cause):
        return f"it is not JSON records: a .json holds a list of objects, a .jsonl one object per line ({first_line(cause)})"
    return first_line(cause)


def check_text_column(ds, text_column: str, name: str):
    """Refuse a dataset without the text column or without any non-empty text, or one that cannot be read
    (a stream only fails here, on its first records: bad UTF-8, a corrupt file)."""
    try:
        first = _first_text(ds, text_column, name)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (UnicodeDecodeError, ArrowInvalid, DatasetGenerationError...)
        fail(f"cannot read dataset {name!r}: {dataset_error(e)}")
    if first is None:
        fail(f"dataset {name!r} is empty (no non-empty text in column {text_column!r})")


def _first_text(ds, text_column: str, name: str) -> str | None:
    first, other = None, None
    for ex in ds:
        if text_column not in ex:
            fail(f"dataset {name!r} has no column {text_column!r} (columns: {', '.join(ex)}); "
                 f"choose one with --text_column")
        t = ex[text_column]
        if isinstance(t, str) and t.strip():
            first = t
            break
        if t is not None and not isinstance(t, str):
            other = other or type(t).__name__
    if first is None and other is not None:
        fail(f"dataset {name!r}: column {text_column!r} holds {other} values, not text; choose a text column with "
             "--text_column")
    return first


class TextStream:
    """Documents -> tokens (+eos) packed into windows of max_length; deterministic and resumable.

    A position is (epoch, doc, offset): the next window starts at token `offset` of document `doc`
    of epoch `epoch` (non-streaming datasets are shuffled per epoch with seed + epoch).
    """

    def __init__(self, ds, text_column, tokenizer, max_length, seed, shuffle, epochs=None):
        self.ds, self.col, self.tok, self.max_length = ds, text_column, tokenizer, max_length
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.eos = tokenizer.eos_token_id
        self.streaming = not hasattr(ds, "__len__")

    def _docs(self, epoch, start):
        if self.streaming:
            it = self.ds.skip(start) if start else self.ds
            for i, ex in enumerate(it, start):
                yield i, ex[self.col]
        else:
            order = list(range(len(self.ds)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            for i in range(start, len(order)):
                yield i, self.ds[order[i]][self.col]

    def _tokens(self, text):
        ids = self.tok(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) and text.strip() else []
        return ids + ([self.eos] if ids and self.eos is not None else [])

    def windows(self, position=(0, 0, 0)):
        """Yields (window token ids, position after it)."""
        epoch, doc, offset = position
        while self.epochs is None or epoch < self.epochs:
            buf, produced = [], False
            for i, text in self._docs(epoch, doc):
                ids = self._tokens(text)
                at = offset if i == doc else 0
                while at < len(ids):
                    chunk = ids[at:at + self.max_length - len(buf)]
                    buf += chunk
                    at += len(chunk)
                    if len(buf) == self.max_length:
                        produced = True
                        yield buf, ((epoch, i, at) if at < len(ids) else (epoch, i + 1, 0))
                        buf = []
            if len(buf) >= 2:
                produced = True
                yield buf, (epoch + 1, 0, 0)
            if not produced and doc == 0 and offset == 0:
                return  # an epoch without a single sequence: cycling it would never end
            epoch, doc, offset = epoch + 1, 0, 0


def collate(windows, pad_id):
    """Right-padded batch of token windows with its attention mask."""
    length = max(len(w) for w in windows)
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), length), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, :len(w)] = torch.tensor(w)
        mask[i, :len(w)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def count_windows(stream: TextStream) -> int:
    one = TextStream(stream.ds, stream.col, stream.tok, stream.max_length, stream.seed, False, epochs=1)
    return sum(1 for _ in one.windows())


@dataclasses.dataclass
class Data:
    """Training text and held-out windows, checked before the model loads."""
    stream: TextStream
    eval_windows: list[list[int]]
    pad_id: int
    windows_per_epoch: int | None  # counted only when --num_epochs sets the length (--max_steps <= 0)


def load_data(args: TrainArgs) -> Data:
    """The tokenizer, the dataset split into training documents and held-out text, as token windows."""
    tokenizer = load_tokenizer_or_fail(args.model_name, args.trust_remote_code)
    ds, text_column = load_text_dataset(args.dataset_name, args.dataset_split, args.streaming, args.text_column)
    check_text_column(ds, text_column, args.dataset_name)
    train_ds, eval_ds = split_held_out(ds, text_column, args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    stream = TextStream(train_ds, text_column, tokenizer, args.max_length, args.seed, shuffle=not args.streaming,
                        epochs=None if args.max_steps > 0 else math.ceil(args.num_epochs))  # max_steps: cycle
    eval_windows = []
    if args.eval_steps:
        held_out = TextStream(eval_ds, text_column, tokenizer, args.max_length, args.seed, False, epochs=1)
        eval_windows = list(itertools.islice((w for w, _ in held_out.windows()), args.eval_samples))
        if not eval_windows:
            fail(f"dataset {args.dataset_name!r} has no held-out text to evaluate on: use --eval_steps 0")
    n_windows = None
    if args.max_steps <= 0:
        n_windows = count_windows(stream)
        if n_windows == 0:
            fail(f"dataset {args.dataset_name!r} yields no sequence of at least 2 tokens")
    return Data(stream, eval_windows, pad_id, n_windows)


def held_out_count(n_docs: int) -> int:
    """How many documents at the tail of a (non-streaming) dataset are held out for evaluation."""
    return max(1, min(n_docs // 50, 64)) if n_docs >= 2 else 0


def builtin_held_out_windows(tokenizer, length: int, count: int) -> list[list[int]]:
    """Up to `count` token windows of `length` from the builtin corpus's held-out documents (those training
    never sees), packed as training packs them."""
    docs = builtin_texts()
    held = [{"text": d} for d in docs[len(docs) - held_out_count(len(docs)):]]
    stream = TextStream(held, "text", tokenizer, length, seed=0, shuffle=False, epochs=1)
    return [w for w, _ in itertools.islice(stream.windows(), count)]


def split_held_out(ds, text_column: str, args: TrainArgs):
    """(training documents, held-out documents): the head of a stream, or the tail of a dataset."""
    if args.streaming:
        eval_ds, train_ds = ds.take(EVAL_DOCS_STREAM), ds.skip(EVAL_DOCS_STREAM)
        if args.num_samples > 0:
            train_ds = train_ds.take(args.num_samples)
        if next(iter(train_ds), None) is None:
            fail(f"dataset {args.dataset_name!r} has too little text: nothing left after holding out "
                 f"{EVAL_DOCS_STREAM} documents for eval")
        return train_ds, eval_ds
    ds = ds.filter(lambda ex: isinstance(ex[text_column], str) and bool(ex[text_column].strip()))
    n_eval = held_out_count(len(ds))
    if n_eval == 0 and args.eval_steps:
        fail(f"dataset {args.dataset_name!r} has {len(ds)} document: evaluation holds documents out, so give at "
             "least 2, or use --eval_steps 0")
    # lists, not ranges: datasets refuses an empty range that starts at len(ds)
    eval_ds, train_ds = ds.select(list(range(len(ds) - n_eval, len(ds)))), ds.select(list(range(len(ds) - n_eval)))
    if args.num_samples > 0:
        train_ds = train_ds.select(range(min(args.num_samples, len(train_ds))))
    if len(train_ds) == 0:
        fail(f"dataset {args.dataset_name!r} has too little text: nothing left after holding out eval text")
    return train_ds, eval_ds
