"""Keras -> MDF: the graph walker and the layer translators, one module per family.

A built Sequential or functional model becomes one MDF graph (:mod:`.walker`): a layer
call is usually one node, whose computation is a chain of MDF functions from the
vocabulary modeci_mdf's ``EvaluableGraph`` understands: ``onnx::*`` ops (ONNX layouts,
so channels-last tensors are transposed around Conv and pooling) and plain arithmetic
expressions. Weights are node parameters stored exactly as Keras holds them (float32,
Keras layout); any re-layout is an MDF function that the gpu-mdf engine folds once.

The translators register themselves in the tables of :mod:`.registry` when their
family module is imported, and importing this package imports every family:
:mod:`.core`, :mod:`.activations`, :mod:`.reshaping`, :mod:`.resizing`,
:mod:`.merging`, :mod:`.normalization`, :mod:`.conv`, :mod:`.pooling`,
:mod:`.recurrent`, :mod:`.attention`, :mod:`.applications` and :mod:`.ops` (keras.ops
calls). Adding a layer kind is one function decorated with ``@translator("ClassName")``
in its family's module.
"""

from . import (  # noqa: F401  (each family registers its translators)
    activations,
    applications,
    attention,
    conv,
    core,
    merging,
    normalization,
    ops,
    pooling,
    recurrent,
    reshaping,
    resizing,
)
from .activations import SINGLE_OP_ACTIVATIONS, apply_activation
from .loading import load_keras_model
from .registry import (
    ACTIVATIONS,
    OP_TRANSLATORS,
    REFUSED_ACTIVATIONS,
    REFUSED_LAYERS,
    TRANSLATORS,
    NodeBuilder,
    Stack,
    activation,
    op_translator,
    safe_id,
    supported_layers,
    translator,
    weights,
)
from .walker import KerasGraphWalker, keras_to_mdf

__all__ = ["ACTIVATIONS", "OP_TRANSLATORS", "REFUSED_ACTIVATIONS", "REFUSED_LAYERS", "SINGLE_OP_ACTIVATIONS",
           "TRANSLATORS", "KerasGraphWalker", "NodeBuilder", "Stack", "activation", "apply_activation",
           "keras_to_mdf", "load_keras_model", "op_translator", "safe_id", "supported_layers", "translator",
           "weights"]
