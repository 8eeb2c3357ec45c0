"""datatrove 0.10.1 hashes shingles as str with xxhash, which xxhash 4.x refuses (it takes
bytes only). Importing this module gives datatrove the UTF-8 encoding that xxhash 3.x
did internally. A module, not a lambda: datatrove's worker processes unpickle the hash
function by reference and import it from here (PYTHONPATH=benchmarks)."""

import datatrove.utils.hashes.xxhash as _datatrove_xxhash
import xxhash


def _bytes(data: str | bytes) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


def xxhash64(data: str | bytes) -> int:
    return xxhash.xxh64_intdigest(_bytes(data))


def xxhash32(data: str | bytes) -> int:
    return xxhash.xxh32_intdigest(_bytes(data))


_datatrove_xxhash.xxhash64 = xxhash64
_datatrove_xxhash.xxhash32 = xxhash32
