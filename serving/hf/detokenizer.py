"""Token ids to text, one token at a time, and stop strings.

Decoding only a window of recent tokens (vLLM's / TGI's incremental detokenization) keeps the cost
per token constant, where decoding the whole completion at every token would grow with its length.
A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives, so it
waits, unless the token is the last. A stop string may arrive over several tokens, so the text
handed out holds back a tail that could still grow into one: a client never receives part of a
stop string that later ends the completion.
"""

from __future__ import annotations

from typing import Any

from genloop.serving.hf.sequence import Sequence


def advance_text(tokenizer: Any, seq: Sequence, final: bool) -> str:
    """Decode ``seq``'s newest token; return the text safe to send (no partial character or stop string).

    A stop string found cuts the text before it and finishes ``seq`` with "stop"; ``final`` (the
    token is the last) hands out everything held back.
    """
    ids = seq.output_ids
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        seq.text += full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    if not seq.max_stop:
        return _flush(seq)
    # As vLLM: no stop string counts until min_tokens tokens are out (eos is held back by the sampler).
    hits = [i for i in (seq.text.find(s, seq.sent) for s in seq.params.stop) if i >= 0] \
        if len(ids) > seq.params.min_tokens else []
    if hits:
        seq.text = seq.text[: min(hits)]
        seq.finish_reason = "stop"
        return _flush(seq)
    if final:
        return _flush(seq)
    # Hold back a tail that could still grow into a stop string.
    held = max(
        (k for s in seq.params.stop for k in range(min(len(s) - 1, len(seq.text)), 0, -1)
         if seq.text.endswith(s[:k])),
        default=0,
    )
    end = max(seq.sent, len(seq.text) - held)
    delta, seq.sent = seq.text[seq.sent:end], end
    return delta


def _flush(seq: Sequence) -> str:
    """All of ``seq``'s text not yet sent."""
    delta, seq.sent = seq.text[seq.sent:], len(seq.text)
    return delta
