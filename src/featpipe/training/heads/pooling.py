"""Heads that pool over time: mean, segments (TSN-style segment means), attention and transformer."""

from __future__ import annotations

from featpipe.runtime.keras_import import import_keras
from featpipe.training.heads.config import HeadConfig
from featpipe.training.heads.layers import (
    KeyPaddingMask,
    MaskedAttentionPooling,
    MaskedAverage,
    SegmentMeans,
    SinusoidalPositionEncoding,
)

keras = import_keras()
layers = keras.layers


def transformer_stack(x, mask, config: HeadConfig):
    attention_mask = KeyPaddingMask(name="attention_mask")(mask)
    key_dim = max(1, config.units // config.num_heads)
    for i in range(config.layers):
        attended = layers.MultiHeadAttention(
            num_heads=config.num_heads, key_dim=key_dim, dropout=config.dropout, name=f"mha_{i}"
        )(x, x, attention_mask=attention_mask)
        attended = layers.Dropout(config.dropout, name=f"mha_dropout_{i}")(attended)
        x = layers.LayerNormalization(epsilon=1e-6, name=f"mha_norm_{i}")(
            layers.Add(name=f"mha_add_{i}")([x, attended])
        )
        ff = layers.Dense(2 * config.units, activation="relu", name=f"ff_in_{i}")(x)
        ff = layers.Dense(config.units, name=f"ff_out_{i}")(ff)
        ff = layers.Dropout(config.dropout, name=f"ff_dropout_{i}")(ff)
        x = layers.LayerNormalization(epsilon=1e-6, name=f"ff_norm_{i}")(layers.Add(name=f"ff_add_{i}")([x, ff]))
    pooled = MaskedAverage(name="masked_mean")(x, mask=mask)
    return layers.Dropout(config.dropout, name="pooled_dropout")(pooled)


def mean_head(x, mask, config: HeadConfig):
    x = MaskedAverage(name="masked_mean")(x, mask=mask)
    x = layers.Dense(config.units, activation="relu", name="hidden")(x)
    return layers.Dropout(config.dropout, name="hidden_dropout")(x)


def segments_head(x, mask, config: HeadConfig):
    x = SegmentMeans(config.segments, name="segment_means")(x, mask=mask)
    x = layers.Flatten(name="segments_flat")(x)
    x = layers.Dropout(config.dropout, name="segments_dropout")(x)
    for i in range(config.layers - 1):  # layers 1: linear classifier; more: a small MLP
        x = layers.Dense(config.units, activation="relu", name=f"segments_hidden_{i}")(x)
        x = layers.Dropout(config.dropout, name=f"segments_hidden_dropout_{i}")(x)
    return x


def attention_head(x, mask, config: HeadConfig):
    # Attention pooling alone is permutation-invariant; the positional encoding makes the
    # head see frame order (so it is not a second "mean" control model).
    h = layers.Dense(config.units, activation="tanh", name="projection")(x)
    h = SinusoidalPositionEncoding(name="position")(h)
    scores = layers.Dense(config.units, activation="tanh", name="score_hidden")(h)
    scores = layers.Dense(1, name="score")(scores)
    x = MaskedAttentionPooling(name="attention_pool")(h, scores, mask=mask)
    return layers.Dropout(config.dropout, name="pooled_dropout")(x)


def transformer_head(x, mask, config: HeadConfig):
    x = layers.Dense(config.units, name="projection")(x)
    x = SinusoidalPositionEncoding(name="position")(x)
    x = layers.Dropout(config.dropout, name="input_dropout")(x)
    return transformer_stack(x, mask, config)
