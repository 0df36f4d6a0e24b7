"""Mask-aware sequence classifiers for the stage-two trainer, one module per family.

Every model takes two inputs, ``"features"`` ``(B, T, *feature_shape)`` float32 and ``"mask"``
``(B, T)`` bool (True exactly for real frames; real frames first, padding after), and returns
softmax probabilities ``(B, n_classes)``.

Mask-awareness is a hard guarantee for every head: predictions do not change when the values at
padded steps change, or when more padded steps are appended. It is obtained in two layers:

* the padded steps of the input are replaced by zeros first (:class:`ZeroPadded`), so even
  NaN/inf garbage at padded steps cannot leak through a ``0 * x`` product;
* every temporal operation is masked: the frame mask is passed EXPLICITLY to every recurrent
  layer (``layer(x, mask=mask)``, never relying on Keras' implicit mask propagation), attention
  keys are masked, and all pooling (mean, attention) only sees real steps.

Only ``keras.ops`` / ``keras.layers`` are used (no TensorFlow calls, no ``Lambda`` layers), so
models run on the TensorFlow, JAX and PyTorch backends and save to ``.keras`` files that
``keras.saving.load_model`` reads in safe mode. The small custom layers below are registered
under the ``featpipe`` package: import :mod:`featpipe.training.heads.layers` before loading a model file.

The modules: :mod:`~featpipe.training.heads.config` (HeadConfig, no Keras), :mod:`~featpipe.training.heads.layers`
(the custom layers and loss), :mod:`~featpipe.training.heads.recurrent`, :mod:`~featpipe.training.heads.pooling`
(mean, segments, attention, transformer), :mod:`~featpipe.training.heads.image` (cnn-lstm on raw frames),
:mod:`~featpipe.training.heads.shortcut` (fitting the frozen segment-mean classifier) and
:mod:`~featpipe.training.heads.registry` (the HEADS registry and :func:`~featpipe.training.heads.registry.build_head`).
"""
