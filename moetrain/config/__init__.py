"""Configuration: structured schemas (schema.py), composition from configs/ (compose.py), checks (validate.py)."""

from moetrain.config.schema import TrainConfig  # noqa: F401
from moetrain.config.validate import ConfigError, validate  # noqa: F401
