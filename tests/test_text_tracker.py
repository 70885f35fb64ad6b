"""serve.server.TextTracker: streamed text deltas are final (never retracted), hold back what could
still become a stop sequence or a half-decoded UTF-8 character, and add up to the final text."""
from __future__ import annotations

from serve.server import TextTracker

# a toy byte-level vocabulary: id -> bytes; "é" is two bytes (ids 3 and 4), decoded with replacement
VOCAB = {0: b"Hel", 1: b"lo", 2: b" wor", 3: b"\xc3", 4: b"\xa9", 5: b"ld", 6: b"ST", 7: b"OP"}


def decode(ids: list[int]) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def stream(ids: list[int], stops: tuple[str, ...], text_end: int | None = None) -> list[str]:
    """The deltas a stream sends: one per token, then the final one."""
    tr = TextTracker(decode, stops)
    out = [tr.delta(ids[:k], final=False) for k in range(1, len(ids) + 1)]
    return out + [tr.delta(ids, final=True, text_end=text_end)]


def test_no_stops_sends_each_token_at_once():
    assert stream([0, 1, 2, 5], ()) == ["Hel", "lo", " wor", "ld", ""]


def test_holds_back_as_many_characters_as_a_stop_could_still_need():
    # a 4-character stop: the last 3 characters wait until they can no longer start it
    assert stream([0, 1, 2, 5], ("STOP",)) == ["", "He", "llo ", "wo", "rld"]


def test_a_half_decoded_character_is_not_sent():
    # id 3 alone decodes to U+FFFD: nothing is sent until id 4 completes "é"
    deltas = stream([0, 3, 4, 5], ())
    assert deltas == ["Hel", "", "é", "ld", ""]
    assert "\ufffd" not in "".join(deltas)


def test_no_character_of_a_stop_is_streamed():
    # "OP" completes the stop "STOP" in "Hello worSTOP": the token's event comes before the engine
    # sets text_end, so the tracker must cut at the stop itself (it once streamed the "S")
    ids = [0, 1, 2, 6, 7]
    deltas = stream(ids, ("STOP",), text_end=len("Hello wor"))
    assert deltas == ["", "He", "llo ", "wo", "", "r"]
    assert "".join(deltas) == "Hello wor"


def test_the_earliest_of_several_stops_ends_the_text():
    deltas = stream([0, 1, 2, 5], ("STOP", " wor"), text_end=len("Hello"))
    assert deltas == ["", "He", "", "", "llo"]


def test_deltas_add_up_to_the_final_text_and_never_repeat():
    ids = [0, 1, 3, 4, 2, 5, 1]
    for stops in [(), ("x",), ("ab",), ("STOP", "zzz")]:
        deltas = stream(ids, stops)
        assert "".join(deltas) == decode(ids), stops


def test_a_split_character_does_not_use_up_the_hold_back_of_a_stop():
    """"好的\\n用户" with the stop "\\n用户", the "用" arriving byte by byte: while it is half decoded the
    "\\n" before it could still start the stop, so it is not sent (it was: U+FFFD took its place in the
    hold-back), and the stream equals the unary text, "好的"."""
    data = "好的\n用户：".encode()
    vocab = dict(enumerate(bytes([b]) for b in data))   # one byte per token

    def dec(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
    tr = TextTracker(dec, ("\n用户",))
    ids = list(vocab)
    sent = [tr.delta(ids[:k], final=False) for k in range(1, len(ids) + 1)]
    stop_at = dec(ids).find("\n用户")
    sent.append(tr.delta(ids, final=True, text_end=stop_at))
    assert "".join(sent) == "好的" and "\n" not in "".join(sent)
