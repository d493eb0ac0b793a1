"""Training: the recipe, the engine's parts and the training job (``finetail train``).

- :mod:`.recipe`: ``TrainConfig`` (the recipe), ``lr_at``, the loss and shot constants; no torch.
- :mod:`.batches`: one ``BatchSource`` interface, uint8 arrays on the device or a file manifest.
- :mod:`.sampling`: how an epoch's images are drawn (instance, square-root, class-balanced)
  and the held-out slice of the training set; numpy and torch only.
- :mod:`.checkpoint`: the ``Checkpointer`` (atomic save, resume key, mid-epoch point, SIGTERM).
- :mod:`.optim`: SGD, without importing torch's compiler stack.
- :mod:`.loop`: ``train_one_epoch``, ``evaluate``, ``train`` -> ``TrainResult``.
- :mod:`.job`: what ``finetail train`` does: spec -> recipe -> ``train`` -> run record -> model file.

This package's ``__init__`` imports nothing, so ``finetail.training.recipe`` stays torch-free.
"""
