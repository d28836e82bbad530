"""Records through a data format plugin: what a format's reader makes of each row, and token ids.

:func:`read_records` reads any table :mod:`distillzoo.data.tables` knows through the
format registered under a name (``dolly``, ``alpaca``, ``chat``, ``preference``, a
plugin's); every error names the file and line (or row) of the record and the field.
Token ids are kept as int32 (Qwen's ids exceed 65,535, so no 16-bit store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from distillzoo.errors import DataError, DistillzooError, UnknownNameError, did_you_mean

IGNORE_INDEX = -100
TOKEN_DTYPE = torch.int32


def data_format(name: str):
    """The reader registered under ``name`` through the ``register_data_formats`` hook."""
    from distillzoo.hooks.manager import components

    formats = components("data_formats")
    if name not in formats:
        raise UnknownNameError(f"unknown data format {name!r}. Available: {', '.join(sorted(formats))}."
                               + did_you_mean(name, formats))
    return formats[name].obj


def format_records(name: str) -> str:
    """``"instruction"`` or ``"preference"``: what the records of data format ``name`` hold (as registered;
    the manager refuses any other value at registration)."""
    from distillzoo.hooks.manager import components

    data_format(name)  # an unknown name fails here, with the choices
    return components("data_formats")[name].details.get("records", "instruction")


def formats_of(records: str) -> list[str]:
    """The registered data formats whose records are ``records``."""
    from distillzoo.hooks.manager import components

    return sorted(n for n, c in components("data_formats").items() if c.details.get("records", "instruction") == records)


def read_records(path: str | Path, format: str, columns: dict | None = None) -> Iterator[tuple[str, dict]]:
    """``(where, fields)`` of each record as the format's reader returns them.

    ``path`` is JSONL, JSON, Parquet, Arrow or a datasets save_to_disk directory (see
    :mod:`distillzoo.data.tables`; ``where`` is ``file:line`` or ``file, row N``), and
    ``columns`` maps the format's field names to the dataset's column names.
    """
    from distillzoo.data.tables import read_rows

    reader = data_format(format)
    for where, record in read_rows(path, columns):
        try:
            yield where, reader(record)
        except DistillzooError as e:
            raise DataError(f"{where}: {e}") from None


def as_token_ids(ids: Sequence[int], vocab_size: int | None = None, where: str = "") -> Tensor:
    """int32 ids; a 16-bit store would wrap Qwen's ids above 65,535, so only int32/int64 are accepted."""
    if isinstance(ids, Tensor):
        if ids.dtype in (torch.uint16, torch.int16, torch.uint8, torch.int8):
            raise DataError(f"{where}: token ids stored as {ids.dtype} cannot hold Qwen's ids (vocab 151,936 > 65,535); "
                            "store them as int32")
        out = ids.to(TOKEN_DTYPE)
    else:
        out = torch.tensor(list(ids), dtype=TOKEN_DTYPE)
    if vocab_size is not None and out.numel() and (int(out.min()) < 0 or int(out.max()) >= vocab_size):
        raise DataError(f"{where}: token id {int(out.max()) if int(out.max()) >= vocab_size else int(out.min())} is "
                        f"outside the vocab [0, {vocab_size})")
    return out


def check_max_length(max_length: int | None, what: str = "max_length") -> None:
    """A DataError unless ``max_length`` is None or a positive number of tokens."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise DataError(f"{what} must be a positive number of tokens (or None), got {max_length!r}")
