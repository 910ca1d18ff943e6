"""The demo's material: built-in tasks and models, the training harness and the paired comparison.

Used by ``python -m auxwrap demo``, the command line and ``benchmarks/``; ``import auxwrap`` does not import
it. :mod:`~auxwrap.demo.data` makes the datasets (rendered scenes, digit pairs: nothing downloaded),
:mod:`~auxwrap.demo.experiments` trains one method on one task, :mod:`~auxwrap.demo.compare` runs many and
compares them with paired differences, :mod:`~auxwrap.demo.models` builds timm and torchvision models by name.
"""
