"""Model families: each folder holds its kernel or model, metrics, closed forms and study.

Every study module has the same protocol: ``NAME``, ``DESCRIPTION``, ``Config`` (a frozen
dataclass, a comment per field), ``validate``, ``add_arguments``, ``config_from_args``,
``demo_config`` and ``run(config, out_dir, *, progress)``.
"""

from __future__ import annotations

import importlib

from collapse_jax.core.errors import ConfigError

#: Study name -> module implementing the study protocol.
STUDIES = {
    "discrete": "collapse_jax.families.discrete.study",
    "gaussian": "collapse_jax.families.gaussian.study",
    "gmm": "collapse_jax.families.gmm.study",
    "vae": "collapse_jax.families.vae.study",
    "lm": "collapse_jax.families.lm.study",
}


def load_study(name: str):
    """Import a study module by name; a clear error for unknown names."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])
