"""Cloud-device data augmentation: a teacher LLM writes synthetic examples in each user's style.

* :func:`run_augment` / :class:`AugmentConfig` -- augment every user of a LaMP file
  (``--teacher openai`` over any OpenAI-compatible endpoint, or ``--teacher offline``).
* :mod:`.client` -- async OpenAI-compatible client (httpx + tenacity).
* :mod:`.filters` -- schema/label, length, injection, leakage, duplicates, relevance, balance.
* :mod:`.privacy` -- redaction before anything leaves, and the audit log.
* :mod:`.serve` -- ``cdcda serve-teacher``: a local HF causal LM behind an OpenAI-compatible API.

Nothing here knows about device formats.
"""

from .augmenter import (REPORT_NAME, SYNTHETIC_NAME, AugmentConfig, Interrupted, read_synthetic,
                        resolve_api_key, run_augment)
from .filters import FilterSettings

__all__ = ["AugmentConfig", "FilterSettings", "Interrupted", "run_augment", "read_synthetic", "resolve_api_key",
           "REPORT_NAME", "SYNTHETIC_NAME"]
