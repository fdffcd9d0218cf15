"""Keras layers that gpu-mdf ships for models Keras's own layers cannot express.

``PositionEmbedding``: a learned position embedding, the one piece of a vision
transformer (patches by a strided Conv2D, position embedding, MultiHeadAttention,
MLP) that ``keras.layers`` lacks. It has the semantics of
``keras_hub.layers.PositionEmbedding`` (which the converter also accepts): it
returns the first ``T`` rows of its ``(sequence_length, features)`` table broadcast
to the shape of its ``(batch, T, features)`` input, to be added to it::

    x = layers.Reshape((16, 64))(layers.Conv2D(64, 7, strides=7)(images))
    x = x + PositionEmbedding(16)(x)

Importing this module imports Keras and registers the class (as
``gpu_mdf>PositionEmbedding``), so saved models that use it load with
``keras.models.load_model``; the converter imports it before loading any model.
"""

from __future__ import annotations

from .tfquiet import keras as _keras

keras = _keras("gpu_mdf.layers")
ops = keras.ops

__all__ = ["PositionEmbedding"]


@keras.saving.register_keras_serializable(package="gpu_mdf")
class PositionEmbedding(keras.layers.Layer):
    """A learned ``(sequence_length, features)`` table, returned broadcast to the input's
    shape (its first ``T`` rows for an input of ``T`` steps)."""

    def __init__(self, sequence_length: int, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if int(sequence_length) < 1:
            raise ValueError(f"sequence_length must be at least 1, not {sequence_length!r}")
        self.sequence_length = int(sequence_length)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(f"PositionEmbedding needs inputs (..., steps, features) with known features, "
                             f"not {input_shape}")
        self.position_embeddings = self.add_weight(
            name="embeddings", shape=(self.sequence_length, int(input_shape[-1])),
            initializer=self.initializer, trainable=True)

    def call(self, inputs):
        shape = ops.shape(inputs)
        table = ops.slice(ops.convert_to_tensor(self.position_embeddings), (0, 0), (shape[-2], shape[-1]))
        return ops.broadcast_to(table, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"sequence_length": self.sequence_length,
                       "initializer": keras.initializers.serialize(self.initializer)})
        return config
