"""Stop strings on streamed text (zaya_jax.infer.serve.text), on a one-character-per-token vocabulary."""

import pytest

pytest.importorskip("fastapi")

from zaya_jax.infer.serve.text import ChoiceText  # noqa: E402

VOCAB = "<>abcdefghijklmnopqrstuvwxyz =+\n0123456789"
EOS = 0  # "<": a special token, decoded as nothing


def decode(tokens):
    return "".join(VOCAB[t] for t in tokens if t != EOS)


def ids(text):
    return [VOCAB.index(c) for c in text]


def stream(text, stops, chunk, stop_reason="max_new_tokens"):
    choice, out, tokens = ChoiceText(decode, stops), [], ids(text)
    for i in range(0, len(tokens), chunk):
        last = i + chunk >= len(tokens)
        out.append(choice.feed(tokens[i:i + chunk], stop_reason if last else None))
        if choice.finish_reason:
            break
    return choice, out


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_the_stop_string_is_cut_and_never_streamed(chunk):
    choice, deltas = stream("abc == xyz = 12", ["= x", "zz"], chunk)
    assert "".join(deltas) == "abc =" and choice.finish_reason == "stop"
    assert choice.tokens_used == len("abc == x")  # the token that completed the stop string
    # A prefix of a stop string is held back while it might still become one, then released.
    choice, deltas = stream("abc =+ def", ["= x"], chunk)
    assert "".join(deltas) == "abc =+ def" and choice.finish_reason == "length"
    if chunk == 1:
        assert deltas[4] == "" and deltas[5] == "=+"  # "abc =" ... held "=" until "+" ruled it out


def test_stop_token_and_no_stops():
    choice = ChoiceText(decode, [])
    assert choice.feed(ids("ab"), None) == "ab"
    assert choice.feed(ids("c") + [EOS], "stop_token") == "c"
    assert choice.finish_reason == "stop" and choice.tokens_used == 4
    assert choice.feed(ids("d"), "cancelled") == ""  # nothing after the end
    choice = ChoiceText(decode, ["\n"])
    assert choice.feed(ids("ab"), "cache_full") == "ab" and choice.finish_reason == "length"


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 100])
def test_a_stop_string_ending_in_a_split_character_stops_at_any_chunking(chunk):
    """Byte tokens: the stop string's last character (4 bytes) arrives over several feeds; where it stops
    does not depend on how the tokens are grouped (the server's --decode-steps)."""
    def byte_decode(tokens):
        return bytes(tokens).decode("utf-8", errors="replace")

    choice, out, tokens = ChoiceText(byte_decode, ["ok\U0001F600"]), [], list("say ok\U0001F600 more".encode())
    for i in range(0, len(tokens), chunk):
        out.append(choice.feed(tokens[i:i + chunk], None))
        if choice.finish_reason:
            break
    assert "".join(out) == "say " and choice.finish_reason == "stop"
    assert choice.tokens_used == len("say ok\U0001F600".encode())
