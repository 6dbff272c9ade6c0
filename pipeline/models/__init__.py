"""ITM models: the interface (`ITMModel`), the registry/factory, and the model families.

Every model module is found by discovery (pipeline.models.registry.discover): adding a
family is one module plus one YAML, with no import line here.
"""
from pipeline.models.base import ITMModel
from pipeline.models.features import Encoded
from pipeline.models.registry import (create_model, list_models, model_class, model_config,
                                      model_from_config, new_model, register_model)

__all__ = ["Encoded", "ITMModel", "create_model", "list_models", "model_class", "model_config",
           "model_from_config", "new_model", "register_model"]
