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
    "regression": "collapse_jax.families.regression.study",
    "kde": "collapse_jax.families.kde.study",
    "vae": "collapse_jax.families.vae.study",
    "lm": "collapse_jax.families.lm.study",
}

#: Study name -> one-line description (each study module's ``DESCRIPTION``; kept here so that
#: listing the studies imports none of them).
DESCRIPTIONS = {
    "discrete": "K-state distribution refitted from M samples each generation (Wright–Fisher)",
    "gaussian": "Gaussian refitted (mean, covariance) from M samples each generation (Theorem 3.1)",
    "gmm": "Gaussian mixture refitted by EM to its own samples (the paper's GMM experiment)",
    "regression": "Linear regression (OLS / ridge) refitted on labels made by its predecessor",
    "kde": "Gaussian kernel density estimate refitted to its own samples (Collapse or Thrive)",
    "vae": "Convolutional VAEs trained recursively on their own decoded MNIST digits",
    "lm": "OPT fine-tuned generation after generation on its own beam-search text",
}


def load_study(name: str):
    """Import a study module by name; a clear error for unknown names."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])
