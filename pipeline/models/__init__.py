"""ITM models: the interface (`ITMModel`), the registry/factory, and the model families.

Importing this package registers every model family below.
"""
from pipeline.models.base import ITMModel
from pipeline.models.registry import (create_model, list_models, model_config,
                                      model_from_config, register_model)

# model families (imported for their @register_model side effect)
from pipeline.models import vse_inf, vsepp, vsrn  # noqa: E402,F401

__all__ = ["ITMModel", "create_model", "list_models", "model_config", "model_from_config",
           "register_model"]
