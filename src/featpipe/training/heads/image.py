"""The image head (cnn-lstm): a small CNN per raw frame, then a masked LSTM over the frames."""

from __future__ import annotations

from featpipe.runtime.keras_import import import_keras
from featpipe.training.heads.config import HeadConfig
from featpipe.training.heads.recurrent import lstm, recurrent_stack

keras = import_keras()
layers = keras.layers

MIN_IMAGE_SIZE = 8  # three 2x2 max-poolings: 8 -> 4 -> 2 -> 1


def cnn_frames(x, config: HeadConfig):
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    for filters in (32, 64, 128):
        x = layers.TimeDistributed(
            layers.Conv2D(filters, 3, padding="same", activation="relu"), name=f"conv_{filters}"
        )(x)
        x = layers.TimeDistributed(layers.MaxPooling2D(2), name=f"pool_{filters}")(x)
    return layers.TimeDistributed(layers.GlobalAveragePooling2D(), name="frame_vector")(x)


def cnn_lstm_head(x, mask, config: HeadConfig):
    return recurrent_stack(x, mask, config, lstm)
