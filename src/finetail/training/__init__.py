"""Training: the recipe, the engine's parts and the training job (``finetail train``)."""
