"""Text between two vocabularies: what a base's token spells, and how a small pair of another tokenizer
family spells it (proxy.cross carries the pair's offset over with these).

Every token is read as the bytes it adds to a text (a byte-level token's own bytes, a byte-fallback token's
byte, any other token's text as its tokenizer decodes it after a word), so that half characters and
leading spaces (Metaspace's "▁", a word-level tokenizer's joins) meet on both sides. Special tokens spell
nothing; a base's end ids stand for the small pair's.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

from core.vocabulary import id_to_token

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
END = -1  # a spelling's last piece that stands for the small pair's end of text


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _backend(tokenizer) -> dict:
    """The fast tokenizer's own description (its model, pre-tokenizer and decoder), {} without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _decoder_types(spec: dict) -> set[str]:
    decoder = spec.get("decoder") or {}
    return {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}


def special_ids(tokenizer) -> set[int]:
    """Ids that spell no text: the special tokens and the added special tokens (chat markers)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if added.special}
    return ids


def token_bytes(tokenizer, table: list[str], byte_level: bool) -> list[bytes | None]:
    """What each id adds to a text, as bytes, mid-text (after a word); None for special tokens. `table`: the
    tokenizer's token strings by id; `byte_level`: its decoder is GPT-2's byte-level one."""
    specials = special_ids(tokenizer)
    decoder = _byte_decoder() if byte_level else None
    anchor_ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    anchor = tokenizer.decode(anchor_ids, clean_up_tokenization_spaces=False)
    out: list[bytes | None] = []
    for i, token in enumerate(table):
        if i in specials or token is None:
            out.append(None)
            continue
        if byte_level and all(ch in decoder for ch in token):
            out.append(bytes(decoder[ch] for ch in token))
            continue
        match = BYTE_TOKEN.match(token)
        if match:
            out.append(bytes([int(match.group(1), 16)]))
            continue
        text = tokenizer.decode(anchor_ids + [i], clean_up_tokenization_spaces=False)
        out.append(text[len(anchor):].encode() if text.startswith(anchor) else text.encode())
    return out


class Vocabulary:
    """One tokenizer's ids as bytes, and its spelling of a byte string mid-text."""

    def __init__(self, tokenizer, ends: list[int]):
        self.tokenizer = tokenizer
        table, spec = id_to_token(tokenizer), _backend(tokenizer)
        self.bytes = token_bytes(tokenizer, table, "ByteLevel" in _decoder_types(spec))
        self.word_level = (spec.get("model") or {}).get("type") == "WordLevel"
        self.ends = sorted(set(ends))
        self.index: dict[bytes, int] = {}  # bytes -> the id that spells them (the first, byte tokens last)
        for i, data in enumerate(self.bytes):
            if data and (data not in self.index or BYTE_TOKEN.match(str(table[self.index[data]]))):
                self.index[data] = i
        self.longest = max((len(b) for b in self.index), default=1)
        self.raw = {token: i for i, token in enumerate(table) if token is not None}
        self.longer: dict[bytes, list[int]] = {}  # a proper prefix of tokens -> the tokens
        for i, data in enumerate(self.bytes):
            for n in range(1, len(data or b"")):
                self.longer.setdefault(data[:n], []).append(i)
        self._primers = [(p, tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ("\n", "a", "")]
        self.spell = lru_cache(maxsize=1 << 16)(self._spell)
        pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
        # the tokenizer's own word splits, where it has any (Metaspace with split=False, as Llama-2's, has none)
        self._pre = pre if pre is not None and len(pre.pre_tokenize_str("a b")) > 1 else None
        self.words = lru_cache(maxsize=1 << 16)(self._words)

    def _words(self, data: bytes) -> tuple[bytes, ...]:
        """`data` cut where this tokenizer starts a word (its pre-tokenizer's splits, else before each space):
        no token runs across such a cut, so a word's spelling is final once the next one starts."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return (data,)
        if self._pre is not None:
            starts = [start for _, (start, _) in self._pre.pre_tokenize_str(text)]
        else:
            starts = [i for i, ch in enumerate(text) if ch == " " and (i == 0 or text[i - 1] != " ")]
        cuts = sorted({0, *[s for s in starts if 0 < s < len(text)], len(text)})
        return tuple(text[a:b].encode() for a, b in zip(cuts, cuts[1:])) or (data,)

    def _spell(self, data: bytes) -> tuple[int, ...] | None:
        """The ids this tokenizer writes `data` with mid-text (its own tokenization, where the bytes are text
        and the ids give them back), else the longest tokens that match; None where nothing spells it."""
        if not data:
            return ()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and not text.strip() and not self.tokenizer(text, add_special_tokens=False)["input_ids"]:
            return ()  # spaces a word-level tokenizer writes as nothing
        if text is not None:
            for primer, head in self._primers:
                ids = self.tokenizer(primer + text, add_special_tokens=False)["input_ids"]
                if ids[: len(head)] != head or len(ids) == len(head):
                    continue
                ids = tuple(ids[len(head):])
                spelt = [self.bytes[i] for i in ids]
                if None not in spelt and _same_text(b"".join(spelt), data, self.word_level):
                    return ids
        return self._longest_match(data)

    def _longest_match(self, data: bytes) -> tuple[int, ...] | None:
        ids, at = [], 0
        while at < len(data):
            for n in range(min(self.longest, len(data) - at), 0, -1):
                token = self.index.get(data[at : at + n])
                if token is not None:
                    ids.append(token)
                    at += n
                    break
            else:
                return None
        return tuple(ids)


def _same_text(a: bytes, b: bytes, spaceless: bool = True) -> bool:
    """Equal, or (`spaceless`: a word-level tokenizer, whose words carry the space that joins them) equal
    but for spaces."""
    return a == b or spaceless and a.replace(b" ", b"") == b.replace(b" ", b"")


def _half_character(data: bytes) -> bool:
    """Whether the bytes end inside a UTF-8 character (which the next bytes complete)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.reason == "unexpected end of data"
    return False


class Bridge:
    """A base's vocabulary and a small pair's: each base token's spelling in the small pair's ids, which base
    tokens a small token begins, and whether a small token can run past the end of a base token."""

    def __init__(self, base: Vocabulary, small: Vocabulary, base_stops: list[int], end_id: int | None = None):
        self.base, self.small = base, small
        self.base_stops = [i for i in base_stops if i < len(base.bytes)]
        self.end_id = end_id  # the base's end id that the small pair's own end tokens (none of the base's) mean
        # a base token the small vocabulary has too (the same token, spelling the same): that id, so a pair of
        # the base's own tokenizer reads the base's very ids
        self.same = {c: small.raw[token] for token, c in base.raw.items()
                     if token in small.raw and small.bytes[small.raw[token]] == base.bytes[c]}
        self.starts: dict[int, list[int]] = {}  # small id -> base ids whose spelling starts with it
        # the small tokenizer has every base token as its own (the base's tokenizer, maybe with tokens added):
        # the small models read the base's very ids, as in the same-tokenizer engine
        self.identical = all(self.same.get(c) == c for c, data in enumerate(base.bytes) if data is not None)
        for c in range(len(base.bytes)):
            spelt = self.spelling(b"", c)
            if spelt and spelt[0]:
                self.starts.setdefault(spelt[0][0], []).append(c)
        self.first = lru_cache(maxsize=1 << 16)(self._first)
        self.candidate = lru_cache(maxsize=1 << 18)(self._candidate)
        self.covers = lru_cache(maxsize=1 << 16)(self._covers)

    def spelling(self, pending: bytes, c: int) -> tuple[tuple[int, ...], bytes] | None:
        """How the small pair writes the pending bytes and then base token c: (ids, the word still open),
        where the last ids spell that word (which the next base token may carry on); None where it cannot."""
        if self.identical:
            return ((self.same[c],), b"") if c in self.same else None
        data = self.base.bytes[c]
        return None if data is None else self.spell_text(pending + data)

    def spell_text(self, data: bytes) -> tuple[tuple[int, ...], bytes] | None:
        """The small ids of a text, word by word in the small tokenizer's own tokens, and its last word."""
        ids: list[int] = []
        words = self.small.words(data)
        for word in words:
            spelt = self.small.spell(word)
            if spelt is None:
                # half a character (a byte-level base's token) that the small vocabulary writes only whole: wait
                return ((), data) if _half_character(data) else None
            ids.extend(spelt)
        return tuple(ids), words[-1]

    def _candidate(self, pending: bytes, c: int) -> tuple[tuple[int, ...], bytes, list] | None:
        """What scoring base token c after the pending bytes reads (`candidate`, cached): (the small ids
        spelling them, the word left open, the cuts: [(index in the ids, the small tokens that write the rest
        in one)]); None where the small vocabulary cannot write it. An end id: the pending text, then END."""
        if c in self.base_stops:
            head = self.spell_text(pending) if pending else ((), b"")
            cover = self.end_cover(c)
            return None if head is None or not cover else ((*head[0], END), b"", [(len(head[0]), cover)])
        plan = self.spelling(pending, c)
        if plan is None or not plan[0]:
            return None
        ids, word = plan
        return ids, word, self._cuts(ids, word, c)

    def _cuts(self, ids: tuple[int, ...], word: bytes, c: int) -> list[tuple[int, list[int]]]:
        """Where the text may go on from in one small token: after the ids before each piece of the open word,
        a token that writes the rest of the word (and maybe more) in one. The last piece's cover holds the
        piece itself (for a pair of the base's tokenizer: the base's own token, and nothing else)."""
        last = len(ids) - 1
        if self.identical:
            return [(last, [ids[-1]])]
        cuts = [(last, [ids[-1], *[t for t in self.covers(self.small.bytes[ids[-1]], c) if t != ids[-1]]])]
        if not word:
            return cuts
        held = len(self.small.spell(word) or ())
        lengths = [len(self.small.bytes[i] or b"") for i in ids]
        if held < 2 or sum(lengths[-held:]) != len(word):  # (a word-level tokenizer's spaces): the last cut only
            return cuts
        rest = lengths[last]
        for n in range(last - 1, len(ids) - held - 1, -1):  # the cuts before the open word's earlier pieces
            rest += lengths[n]
            cover = self.covers(word[len(word) - rest:], c)
            if cover:
                cuts.append((n, cover))
        return cuts

    def _covers(self, rest: bytes, c: int) -> list[int]:
        """Small tokens that write `rest` (which ends where base token c ends) in one (`covers`, cached): the
        one that is `rest`, and those that run on past c's end where the base has no longer token (the base,
        writing that text, would end a token there too)."""
        end = self.base.bytes[c] or b""
        out = [self.small.index[rest]] if rest in self.small.index else []
        for t in self.small.longer.get(rest, ()):
            grown = end + self.small.bytes[t][len(rest) : len(rest) + 1]
            if grown not in self.base.longer and grown not in self.base.index:
                out.append(t)
        return out

    def end_cover(self, c: int) -> list[int]:
        """The small ids that mean what base stop id c means: the same token where the small vocabulary has it;
        at the base's end id also the pair's ends the base has not (a chat expert's end of turn), as the
        same-tokenizer engine folds them in (proxy.combine.shared_logits); none for the base's other stops."""
        if c in self.same:
            cover = [self.same[c]]
        else:  # the pair's ends stand for the base's end id alone (its other stops would count them again)
            cover = list(self.small.ends) if c == self.end_id else []
        if c == self.end_id:
            theirs = set(self.same.values())
            cover += [e for e in self.small.ends if e not in theirs and e not in cover]
        return cover

    def _first(self, data: bytes) -> int | None:
        """The base token a text that goes on with `data` starts with."""
        ids = self.base.spell(data)
        return ids[0] if ids else None

    def proposals(self, pending: bytes, small_ids: list[int]) -> set[int]:
        """Base tokens where the small pair's likely next tokens (after the pending bytes) go."""
        out: set[int] = set()
        for t in small_ids:
            if t in self.small.ends:
                out.update(self.base_stops)
                continue
            data = self.small.bytes[t] if t < len(self.small.bytes) else None  # past it: vocabulary padding
            if not data:
                continue
            if not pending:
                out.update(self.starts.get(t, ()))
            elif not (data.startswith(pending) and len(data) > len(pending)):
                continue
            first = self.first(data[len(pending):])
            if first is not None:
                out.add(first)
        return out
