"""Compare: one prompt to several variants via `/compare`; outputs side by side, then numbers."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import ui
from dashboard.client import IngressError
from dashboard.render import escape_markdown, marked_markdown
from slimserve.protocol import CompareResponse, CompareResult

RESULT = "compare_result"
METRICS = {
    "tokens/s": "tokens_per_s",
    "latency (s)": "latency_s",
    "TTFT (s)": "ttft_s",
    "speedup vs teacher": "speedup",
    "agreement with teacher": "agreement",
}


def table(response: CompareResponse) -> pd.DataFrame:
    rows = [
        {
            "variant": r.model,
            "latency_s": r.latency_s,
            "ttft_s": r.ttft_s,
            "tokens_per_s": r.tokens_per_s,
            "speedup": r.speedup,
            "agreement": r.agreement,
            "tokens": r.completion_tokens,
            "error": r.error,
        }
        for r in response.results
    ]
    return pd.DataFrame(rows)


def output(result: CompareResult, reference: CompareResult | None) -> None:
    """One variant's text; words that differ from the teacher's are highlighted."""
    is_ref = reference is not None and result.model == reference.model
    st.markdown(f"**{result.model}**" + (" · reference" if is_ref else ""))
    if result.error:
        st.error(escape_markdown(result.error), icon=":material/error:")
    elif not (result.text or "").strip():
        st.caption(f"(empty output: {result.completion_tokens} tokens of whitespace or nothing)")
    elif is_ref or reference is None or reference.text is None:
        st.text(result.text or "")
    else:
        # escaped model text; only our highlight directives are Markdown
        st.markdown(marked_markdown(reference.text, result.text or ""))


def show(response: CompareResponse) -> None:
    by_id = {r.model: r for r in response.results}
    reference = by_id.get(response.reference or "")
    if reference is None:
        st.info("The teacher is not among the results: nothing to mark differences against.")
    else:
        st.caption(f"Highlighted: words that differ from the teacher (`{reference.model}`).")
    width = min(3, max(1, len(response.results)))
    for start in range(0, len(response.results), width):
        for col, result in zip(
            st.columns(width), response.results[start : start + width], strict=False
        ):
            with col, st.container(border=True):
                output(result, reference)
    frame = table(response)
    st.dataframe(
        frame,
        hide_index=True,
        column_config={
            "latency_s": st.column_config.NumberColumn("latency (s)", format="%.3f"),
            "ttft_s": st.column_config.NumberColumn("TTFT (s)", format="%.3f"),
            "tokens_per_s": st.column_config.NumberColumn("tokens/s", format="%.1f"),
            "speedup": st.column_config.NumberColumn("speedup", format="%.2f×"),
            "agreement": st.column_config.NumberColumn("agreement", format="percent"),
        },
    )
    label = st.radio("chart", list(METRICS), horizontal=True, key="compare_metric")
    column = METRICS[label]
    if frame[column].notna().any():
        st.bar_chart(frame, x="variant", y=column, y_label=label, x_label="", sort=False)
    if response.machine:
        st.caption("measured on " + ", ".join(f"{k}: {v}" for k, v in response.machine.items()))


def page() -> None:
    st.title("Compare")
    listing = ui.models()
    ready = ui.deployed(listing) if listing else []
    if not ready:
        return
    ids = [c.id for c in ready]
    with st.form("compare_form"):
        prompt = st.text_area("prompt", "The Python standard library", key="compare_prompt")
        chosen = st.multiselect("variants", ids, default=ids, key="compare_models")
        sampling = ui.sampling_controls("compare", temperature=0.0, max_tokens=32, cap=512)
        warmup = st.checkbox("warm up each variant first (untimed)", True, key="compare_warmup")
        submitted = st.form_submit_button("Compare", icon=":material/compare_arrows:")
    if submitted:
        if not chosen or not prompt.strip():
            st.warning("Pick at least one variant and write a prompt.")
            return
        try:
            with st.spinner(f"Running {len(chosen)} variants…"):
                response = ui.client().compare(prompt, chosen, sampling, warmup=warmup)
            st.session_state[RESULT] = response
        except IngressError as e:
            ui.show_error(e, "comparing the variants")
            st.session_state.pop(RESULT, None)
            return
    if RESULT in st.session_state:
        show(st.session_state[RESULT])


page()
