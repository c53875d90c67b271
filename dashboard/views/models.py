"""Models: the catalogue as a lineage graph and one row per variant (what it is, what it costs)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import ui
from dashboard.render import human_bytes, human_count, lineage_dot
from slimserve.protocol import ModelCard


def row(card: ModelCard) -> dict[str, object]:
    sparsity = None
    if card.params_total and card.params_nonzero is not None:
        sparsity = 1 - card.params_nonzero / card.params_total
    return {
        "variant": card.id,
        "deployed": card.deployed,
        "why not deployed": None if card.deployed else (card.reason or "unknown"),
        "step": card.step,
        "parent": card.parent,
        "runtime": card.runtime,
        "params": human_count(card.params_total),
        "non-zero params": human_count(card.params_nonzero),
        "sparsity": sparsity,
        "size": human_bytes(card.bytes),
        "perplexity": card.perplexity,
        "agreement": card.agreement,
        "replicas": card.replicas,
        "device": card.device,
    }


def page() -> None:
    st.title("Models")
    listing = ui.models()
    if listing is None:
        return
    if listing.message:
        st.info(listing.message, icon=":material/info:")
    if not listing.data:
        return
    profile = f" (profile `{listing.profile}`)" if listing.profile else ""
    n_up = sum(c.deployed for c in listing.data)
    st.caption(f"{len(listing.data)} variants{profile}, {n_up} deployed; dashed = not deployed.")
    st.graphviz_chart(lineage_dot(listing.data))
    frame = pd.DataFrame([row(c) for c in listing.data])
    st.dataframe(
        frame,
        hide_index=True,
        column_config={
            "why not deployed": st.column_config.TextColumn(width="medium"),
            "sparsity": st.column_config.NumberColumn(format="percent"),
            "perplexity": st.column_config.NumberColumn(format="%.2f"),
            "agreement": st.column_config.NumberColumn(
                format="percent", help="top-1 next-token agreement with the teacher"
            ),
        },
    )


page()
