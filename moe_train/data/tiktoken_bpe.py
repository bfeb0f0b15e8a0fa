"""tiktoken's BPE engine, fed the vocabulary and merges of a Hugging Face tokenizer.json: a faster
encoder than `tokenizers` for the tokenizers it provably reproduces token for token (the line-level
byte BPEs `train_bpe` makes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# `train_bpe`'s pre-tokenizer (words are lines, each "\n" kept with the text before it) as JSON, and
# the same split as a regex: at any position the first branch takes everything up to and including
# the next "\n", the second, when no "\n" is left, the rest.
LINE_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"String": "\n"}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
LINE_PATTERN = r"[^\n]*\n|[^\n]+"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (the one `tokenizers`' ByteLevel uses): printable bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _merge_by_rank(piece: bytes, ranks: dict[bytes, int], stop: int = 1) -> list[bytes]:
    """tiktoken's rule, in Python: join the adjacent pair whose concatenation has the lowest rank
    (the leftmost on ties) until `stop` parts remain or no concatenation is a token."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > stop:
        best, at = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _unsupported(spec: dict) -> str | None:
    """Why tiktoken cannot reproduce this tokenizer.json, or None when it can (apart from the merges,
    checked by `_merges_are_canonical`)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"model {model.get('type')}, not BPE"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"model.{key} is set"
    if model.get("byte_fallback"):
        return "byte_fallback BPE"
    for key in ("normalizer", "truncation", "padding"):
        if spec.get(key) is not None:
            return f"it has a {key}"
    if spec.get("pre_tokenizer") != LINE_PRE_TOKENIZER:
        return "its pre-tokenizer is not the line-level byte split"
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":  # ByteLevel only trims offsets
        return f"post-processor {post.get('type')}"
    added = [t["content"] for t in spec.get("added_tokens", [])]
    for t in spec.get("added_tokens", []):
        if t["single_word"] or t["lstrip"] or t["rstrip"] or not t["content"]:
            return f"added token {t['content']!r} has matching options"
    # tiktoken finds added tokens leftmost-first, `tokenizers` leftmost-longest in two passes: the
    # same matches as long as no two occurrences can overlap
    for a in added:
        for b in added:
            if (a != b and a in b) or any(b.startswith(a[i:]) for i in range(1, len(a))):
                return f"added tokens {a!r} and {b!r} can overlap"
    return None


def _merges_are_canonical(merges: list[tuple[bytes, bytes]], ranks: dict[bytes, int]) -> str | None:
    """None when tiktoken, ranking each merged token by its merge's position, reproduces merge-list BPE
    on every input; else the first token that breaks it.

    Both engines repeatedly join the lowest-ranked adjacent pair (leftmost on ties); `tokenizers`
    considers only listed merges, tiktoken any pair whose concatenation is a token. Every listed merge
    is a tiktoken candidate of the same rank, so the engines can only part when tiktoken joins a pair
    (x, y) into a token t whose listed merge is another pair. x and y then cover exactly t's bytes, and
    since nothing outside that span joined anything inside it, tiktoken made the same merges inside it
    as it makes on t's bytes alone: on them it reaches [x, y] before its last merge. So it suffices that
    tiktoken on each token's bytes ends at that token's listed pair. (Then tiktoken's shortcut, a piece
    that is a token is taken whole, gives what the merges give too.)"""
    for left, right in merges:
        token = left + right
        # stopping at two parts, the token itself is never looked up: as if it were not in `ranks`
        reached = _merge_by_rank(token, ranks, stop=2)
        if reached != [left, right]:
            return f"{token!r} is reached as {reached}, merged as {[left, right]}"
    return None


def _ranks(spec: dict) -> tuple[dict[bytes, int], dict[str, int], np.ndarray] | str:
    """tiktoken's (mergeable ranks, added tokens' ranks, ids by rank) for a tokenizer.json, or why
    tiktoken could encode differently from `tokenizers`."""
    reason = _unsupported(spec)
    if reason is not None:
        return reason
    to_char = bytes_to_unicode()
    to_byte = {c: b for b, c in to_char.items()}

    def as_bytes(token: str) -> bytes | None:
        return bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) else None

    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    if any(to_char[b] not in vocab for b in range(256)):
        return "a byte has no token"  # `tokenizers` would drop it or give unk
    ranks = {bytes([b]): b for b in range(256)}
    rank_ids = [vocab[to_char[b]] for b in range(256)]
    pairs = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        pair = (as_bytes(left), as_bytes(right))
        if None in pair or left + right not in vocab:
            return f"merge {left!r} {right!r} is outside the byte alphabet or makes no token"
        if pair[0] + pair[1] in ranks:
            return f"two merges make {left + right!r}"
        ranks[pair[0] + pair[1]] = len(rank_ids)
        rank_ids.append(vocab[left + right])
        pairs.append(pair)
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    if model.get("ignore_merges"):  # a whole word in the vocabulary is taken as it is
        if any(t not in added and as_bytes(t) not in ranks for t in vocab):
            return "ignore_merges with tokens no merge makes"
    reason = _merges_are_canonical(pairs, ranks)
    if reason is not None:
        return reason
    special = {content: len(rank_ids) + i for i, content in enumerate(added)}
    return ranks, special, np.array([*rank_ids, *added.values()], dtype=np.int64)


class TiktokenBPE:
    """Encodes documents with tiktoken, giving the ids `tokenizers` gives for the same tokenizer.json.

    tiktoken's ranks: the 256 bytes first, then each merge's token at 256 + its position in the merge
    list (the merge priority); added tokens after those. `ids[rank]` maps back to the file's ids."""

    def __init__(self, path: Path, ranks: dict[bytes, int], added: dict[str, int], ids: np.ndarray):
        import tiktoken

        self.path = path
        self.ids = ids
        self.encoding = tiktoken.Encoding(
            f"line-bpe:{path}", pat_str=LINE_PATTERN, mergeable_ranks=ranks, special_tokens=added
        )

    @classmethod
    def load(cls, path: str | Path) -> TiktokenBPE | None:
        """The engine for `path`, or None (and the reason logged) where it could encode differently
        from `tokenizers`: the caller then keeps `tokenizers`."""
        path = Path(path)
        built = _ranks(json.loads(path.read_text(encoding="utf-8")))
        if isinstance(built, str):
            log.info("%s is encoded with tokenizers, not tiktoken: %s", path, built)
            return None
        return cls(path, *built)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of one text, added tokens in it included (as `tokenizers` finds them)."""
        return self.ids[self.encoding.encode_to_numpy(text, allowed_special="all")]
