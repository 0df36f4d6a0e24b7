"""Recurrent heads (gru, lstm, bilstm): a masked recurrent stack over every frame or over segment means."""

from __future__ import annotations

from featpipe.runtime.keras_import import import_keras
from featpipe.training.heads.config import HeadConfig
from featpipe.training.heads.layers import AnyRealStep, SegmentMeans

keras = import_keras()
layers = keras.layers


def gru(config: HeadConfig, return_sequences: bool, index: int):
    return layers.GRU(config.units, return_sequences=return_sequences, name=f"gru_{index}")


def lstm(config: HeadConfig, return_sequences: bool, index: int):
    return layers.LSTM(config.units, return_sequences=return_sequences, name=f"lstm_{index}")


def bilstm(config: HeadConfig, return_sequences: bool, index: int):
    return layers.Bidirectional(lstm(config, return_sequences, index), name=f"bilstm_{index}")


def recurrent_stack(x, mask, config: HeadConfig, cell):
    for i in range(config.layers):
        last = i == config.layers - 1
        x = cell(config, return_sequences=not last, index=i)(x, mask=mask)
        x = layers.Dropout(config.dropout, name=f"dropout_{i}")(x)
    return x


def recurrent_head(cell):
    def build(x, mask, config: HeadConfig):
        if config.pooled_steps:  # a short sequence of segment means: less per-frame noise, order kept
            x = SegmentMeans(config.pooled_steps, name="pooled_steps")(x, mask=mask)
            mask = AnyRealStep(config.pooled_steps, name="pooled_mask")(mask)
        return recurrent_stack(x, mask, config, cell)

    return build
