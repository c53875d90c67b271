"""Chat: talk to one variant; replies stream in token by token, with TTFT and tokens/s."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import Any

import streamlit as st

from dashboard import ui
from dashboard.client import ChatStream, IngressClient, IngressError, Sampling
from dashboard.render import escaped_stream, seconds
from slimserve.protocol import MAX_TOKENS_CAP

HISTORY = "chat_history"


def open_stream(
    client: IngressClient, model: str, messages: list[dict[str, str]], sampling: Sampling
) -> tuple[ChatStream, Iterator[str], int]:
    """Start a reply, dropping the oldest turns while the ingress refuses the conversation.

    GPT-2 contexts are short (128 tokens in the tiny profile) and only the server can count
    tokens, so a 400 is the signal that the history no longer fits. Returns the stream, its
    deltas (first one already fetched) and how many messages were left out.
    """
    for drop in range(0, len(messages), 2):  # whole user/assistant turns; the last user stays
        stream = client.chat_stream(model, messages[drop:], sampling)
        deltas = iter(stream)
        try:
            first = next(deltas, None)
        except IngressError as e:
            if e.kind == "bad_request" and drop + 2 < len(messages):
                continue
            raise
        return stream, chain([first] if first else [], deltas), drop
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def reply(client: IngressClient, model: str, sampling: Sampling, history: list[dict]) -> None:
    """Stream one assistant reply under the last user message and add it to the history."""
    messages = [{"role": m["role"], "content": m["content"]} for m in history]
    with st.chat_message("assistant"):
        try:
            stream, deltas, dropped = open_stream(client, model, messages, sampling)
        except IngressError as e:
            ui.show_error(e, f"asking {model}")
            return
        box, error = st.empty(), None
        try:
            with box.container():
                st.write_stream(escaped_stream(deltas))
        except IngressError as e:
            error = e
        # the streamed Markdown (escaped) is replaced by plain text once the reply is complete
        if stream.text:
            box.text(stream.text)
        else:
            box.caption("(empty reply)")
        stats = stream.stats
        meta = [model, f"TTFT {seconds(stats.ttft_s)}"]
        if stats.tokens_per_s is not None:
            meta.append(f"{stats.tokens_per_s:.1f} tokens/s")
        meta.append(f"{stats.completion_tokens} tokens")
        if stats.finish_reason:
            meta.append(f"finish: {stats.finish_reason}")
        if dropped:
            meta.append(f"{dropped} older messages left out to fit the context")
        if error is not None:
            meta.append("interrupted")
            ui.show_error(error, f"streaming from {model}")
        st.caption(" · ".join(meta))
    if stream.text:
        history.append({"role": "assistant", "content": stream.text, "meta": " · ".join(meta)})


def page() -> None:
    st.title("Chat")
    listing = ui.models()
    ready = ui.deployed(listing) if listing else []
    if not ready:
        return
    cards = {c.id: c for c in ready}
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    model = left.selectbox("variant", list(cards), key="chat_model")
    history: list[dict[str, Any]] = st.session_state.setdefault(HISTORY, [])
    if right.button("Clear conversation", icon=":material/delete:", key="chat_clear"):
        history.clear()
    context = cards[model].context_length or MAX_TOKENS_CAP
    sampling = ui.sampling_controls(
        "chat", temperature=0.8, max_tokens=48, cap=max(1, min(MAX_TOKENS_CAP, context - 1))
    )
    for message in history:
        with st.chat_message(message["role"]):
            st.text(message["content"])  # model output is text, never Markdown or HTML
            if message.get("meta"):
                st.caption(message["meta"])
    prompt = st.chat_input(f"Message {model}", key="chat_prompt")
    if prompt:
        history.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            st.text(prompt)
        reply(ui.client(), model, sampling, history)


page()
