"""Encoder page: the frozen CNN's own ImageNet top-5 for the photo, a layer's most active
channels over the photo, and a feature visualisation of one channel."""
from __future__ import annotations

import streamlit as st

from app.services import NotAvailable
from app.services import figures
from app import ui

cur = ui.current()
st.title("Encoder")
if not ui.require_image(cur):
    st.stop()
model = ui.require_captioner(cur)
if model is None:
    st.stop()
st.caption(f"Encoder: {cur.model.encoder or model.encoder.name} (frozen, ImageNet-trained); the decoder reads its last "
           f"feature map as a {model.grid_side}×{model.grid_side} grid.")

left, right = st.columns([2, 3], gap="large")
left.image(cur.image, caption=cur.label, width="stretch")
with right:
    st.subheader("ImageNet top-5")
    top = ui.top5(cur.model.key, cur.digest, model, cur.full)
    st.dataframe([{"class": name, "probability": round(p, 4)} for name, p in top], hide_index=True, width="stretch",
                 column_config={"probability": st.column_config.ProgressColumn("probability", min_value=0.0,
                                                                              max_value=1.0, format="%.3f")})
    if cur.image.width != cur.image.height:
        st.caption("The photo is not square: these are the head's probabilities averaged over the whole photo (stretched "
                   "to a square, as the decoder reads it) and its central square, the framing ImageNet classifiers "
                   "learn from. Guided decoding reads the same.")

st.divider()
st.subheader("Top channels of a layer")
try:
    layers = ui.layers(cur.model.key, model)
except NotAvailable as e:
    st.info(str(e))
    st.stop()
names = [l.name for l in layers]
info = {l.name: l for l in layers}
c1, c2 = st.columns([3, 1])
layer = c1.selectbox("Layer", names, index=len(names) - 1, key="enc_layer",
                     format_func=lambda n: f"{n}  ({info[n].channels} ch, {info[n].height}×{info[n].width})")
k = c2.slider("Channels", 4, 16, 8, 4, key="enc_k")
with st.spinner("Running the encoder..."):
    chans = ui.channel_maps(cur.model.key, cur.digest, layer, k, model, cur.full)
cols = st.columns(4)
for i, ch in enumerate(chans):
    cols[i % 4].image(ch["overlay"], caption=f"channel {ch['channel']} · mean {ch['mean']:.2f}", width="stretch",
                      clamp=True)
st.markdown(figures.colour_scale_html("activation, each channel on its own: negative values set to 0, divided by the "
                                 "channel's 99.5th percentile and clipped to 1 (the same colour map as every map in "
                                 "the app)"), unsafe_allow_html=True)

st.divider()
st.subheader("Feature visualisation")
st.caption("An image optimised to excite one channel as much as possible (Olah et al. 2017, Distill): what the channel "
           "responds to, independent of this photo. It takes about a second at 64 steps on a CPU (the first one of a "
           "session a little longer).")
c1, c2, c3 = st.columns([2, 1, 1])
channel = c1.selectbox("Channel", [ch["channel"] for ch in chans], key=f"fv_channel-{layer}",
                       help="One of the most active channels above")
steps = c2.select_slider("Steps", [32, 64, 128], value=64, key="fv_steps")
go = c3.button("Visualise", key="fv_go", type="primary")
fv_key = (cur.model.key, layer, int(channel), int(steps))
if go:
    try:
        with st.spinner(f"Optimising an image for {layer} channel {channel}..."):
            ui.feature_vis(cur.model.encoder, layer, int(channel), int(steps), cur.model.key, model)
        st.session_state.setdefault("fv_done", {})[fv_key] = True
    except NotAvailable as e:
        st.info(str(e))
if st.session_state.get("fv_done", {}).get(fv_key):
    fv = ui.feature_vis(cur.model.encoder, layer, int(channel), int(steps), cur.model.key, model)
    st.image(fv.image, caption=f"{layer}, channel {channel} ({fv.source}, {fv.seconds:.1f} s)", width=256)
