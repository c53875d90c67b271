"""Streamlit pieces every page shares: ingress settings, the client, failure messages.

Every failure a page can meet arrives as an `IngressError`; `show_error` turns its kind into
one sentence that says what happened and what to do, so no page ever shows a traceback.
"""

from __future__ import annotations

import httpx
import streamlit as st

from dashboard.client import IngressClient, IngressError, Sampling, Settings, with_overrides
from dashboard.render import escape_markdown
from slimserve.protocol import ModelCard, ModelList

# Tests put an `httpx.MockTransport` here to stand in for the ingress (None = real network).
TRANSPORT: httpx.BaseTransport | None = None

_HINTS = {
    "unreachable": "Is the ingress running? `make demo` (or `make serve`) starts it; check the "
    "URL in the sidebar.",
    "timeout": "The ingress is up but slow to answer: try fewer tokens, or raise "
    "`SLIMSERVE_TIMEOUT`.",
    "unauthorized": "This ingress needs an API key: set `SLIMSERVE_API_KEY` or type it in the "
    "sidebar.",
    "overloaded": "The ingress is busy or a replica is down; try again shortly.",
    "not_found": "The variant may not be deployed: see the Models page.",
    "server": "The ingress failed on this request; its log has the details.",
    "protocol": "The ingress answered something this dashboard does not understand "
    "(version mismatch?).",
    "bad_request": "",
}
_TITLES = {
    "unreachable": "Cannot reach the ingress",
    "timeout": "The ingress timed out",
    "unauthorized": "Not authorised",
    "overloaded": "The ingress is overloaded",
    "not_found": "Not found",
    "server": "The ingress reported an error",
    "protocol": "Unexpected answer",
    "bad_request": "The request was refused",
}


def settings() -> Settings:
    """Environment settings, with the sidebar's overrides for this session."""
    base = Settings.from_env()
    return with_overrides(
        base, st.session_state.get("ingress_url"), st.session_state.get("api_key")
    )


def client() -> IngressClient:
    return IngressClient(settings(), transport=TRANSPORT)


def sidebar() -> None:
    """Ingress URL / API key overrides and a one-line health check, in the sidebar."""
    base = Settings.from_env()
    with st.sidebar:
        with st.expander("Ingress", expanded=False):
            st.text_input("URL", value=base.url, key="ingress_url")
            st.text_input(
                "API key", type="password", key="api_key", help="default: SLIMSERVE_API_KEY"
            )
        try:
            health = client().health()
            status = health.get("status", "ok")
            st.caption(f":green[●] ingress {status} at `{settings().url}`")
        except IngressError as e:
            st.caption(f":red[●] ingress {e.kind.replace('_', ' ')} at `{settings().url}`")


def show_error(err: IngressError, doing: str) -> None:
    """One clear message for a failed call; `doing` says what the page was trying to do."""
    title = _TITLES.get(err.kind, "Error")
    status = f" (HTTP {err.status})" if err.status else ""
    # the message may quote server text (or a prompt): escaped, it is shown, never interpreted
    text = f"**{title}{status}** while {doing}: {escape_markdown(err.message)}"
    if err.retry_after:
        text += f" Retry after {err.retry_after:g} s."
    hint = _HINTS.get(err.kind, "")
    if err.kind == "overloaded":
        st.warning(f"{text}  \n{hint}", icon=":material/hourglass_top:")
    else:
        st.error(f"{text}  \n{hint}" if hint else text, icon=":material/error:")


def models() -> ModelList | None:
    """The catalogue from `/v1/models`, or None after showing why it could not be read."""
    try:
        return client().models()
    except IngressError as e:
        show_error(e, "listing the models")
        return None


def deployed(listing: ModelList) -> list[ModelCard]:
    """Variants that can answer now; explains in the page when there are none."""
    ready = [c for c in listing.data if c.deployed]
    if not ready:
        why = listing.message or "no variant is deployed: build them with `make demo`."
        st.info(f"Nothing to talk to yet: {why}", icon=":material/info:")
    return ready


def sampling_controls(key: str, *, temperature: float, max_tokens: int, cap: int) -> Sampling:
    """Temperature, top-p, top-k, max tokens and seed in one row; `key` keeps pages apart."""
    cols = st.columns(5)
    temp = cols[0].slider("temperature", 0.0, 2.0, temperature, 0.05, key=f"{key}_temp")
    top_p = cols[1].slider("top-p", 0.05, 1.0, 1.0, 0.05, key=f"{key}_top_p")
    top_k = cols[2].number_input("top-k (0 = off)", 0, 1000, 0, key=f"{key}_top_k")
    max_tok = cols[3].number_input("max tokens", 1, cap, min(max_tokens, cap), key=f"{key}_max")
    seed = cols[4].number_input("seed (empty = random)", 0, 2**31 - 1, None, key=f"{key}_seed")
    return Sampling(
        max_tokens=int(max_tok),
        temperature=float(temp),
        top_p=float(top_p),
        top_k=int(top_k),
        seed=None if seed is None else int(seed),
    )
